"""Compile-only inspection of lorafuse's kernels for GPUs this machine does not have (see compile.py)."""

from .compile import DTYPES, KernelReport, inspect_problem, problem_launches
from .targets import ARCHS, compiling_for

__all__ = ["ARCHS", "DTYPES", "KernelReport", "compiling_for", "inspect_problem", "problem_launches"]
