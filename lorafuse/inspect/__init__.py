"""Compile-only inspection of lorafuse's kernels for GPUs this machine does not have (docs/gpu_compile.md).

`inspect_problem` compiles a training step's kernels for a target (compile.py), `format_table` shows the
reports (report.py), `launch_findings` checks them (rules.py); `python -m lorafuse.inspect` does all three.
"""

from .compile import DTYPES, KernelReport, inspect_problem, problem_launches
from .report import format_table
from .rules import launch_findings
from .targets import ARCHS, compiling_for

__all__ = ["ARCHS", "DTYPES", "KernelReport", "compiling_for", "format_table", "inspect_problem", "launch_findings",
           "problem_launches"]
