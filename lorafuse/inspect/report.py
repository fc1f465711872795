"""KernelReports as a table for people and as a JSON document for tools."""

import collections
import datetime
import re
import subprocess
from pathlib import Path
from typing import Optional

from .rules import describe_config, matrix_instruction_count

_SOURCE_ROOT = Path(__file__).resolve().parents[2]


# ---- one-cell summaries ------------------------------------------------------------------------------------

def _load_width(op: str) -> int:
    """Bits one thread reads with a load opcode: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32,
    buffer_load_dwordx4 -> 128, buffer_load_ushort -> 16."""
    dwords = re.search(r"_dwordx(\d)$", op)
    if dwords:
        return 32 * int(dwords.group(1))
    if "byte" in op:
        return 8
    if "short" in op:
        return 16
    sized = re.fullmatch(r"[US]?(8|16|32|64|128|256)", op.split(".")[-1])
    return int(sized.group(1)) if sized else 32


def _widths(counts: dict) -> str:
    by_width = collections.Counter()
    for op, n in counts.items():
        by_width[_load_width(op)] += n
    return " ".join(f"{width}b*{n}" for width, n in sorted(by_width.items(), reverse=True))


def global_reads_summary(report) -> str:
    """How the kernel reads global memory: plain loads by width, cp.async (LDGSTS) by width, TMA (UTMALDG);
    on AMD global_load / buffer_load by width."""
    reads = report.global_reads
    plain = {op: n for op, n in reads.items() if op.startswith("LDG.") or op == "LDG"}
    cp_async = {op: n for op, n in reads.items() if op.startswith("LDGSTS")}
    tma = sum(n for op, n in reads.items() if op.startswith(("UTMALDG", "UBLKCP")))
    parts = []
    if plain:
        parts.append(f"LDG {_widths(plain)}")
    if cp_async:
        parts.append(f"cp.async {_widths(cp_async)}")
    if tma:
        parts.append(f"TMA*{tma}")
    for kind in ("global_load", "buffer_load"):
        amd = {op: n for op, n in reads.items() if op.startswith(kind)}
        if amd:
            parts.append(f"{kind} {_widths(amd)}")
    return ", ".join(parts) or "-"


def matrix_summary(report) -> str:
    """Matrix-core instructions by family and shape, e.g. `HGMMA.64x128x16*5` or `v_mfma_f32_32x32x8_bf16*34`."""
    if matrix_instruction_count(report) == 0:
        return "none"
    return " ".join(f"{op}*{n}" for op, n in report.matrix_instructions.items() if not op.startswith("WARPGROUP"))


#: A few instruction classes worth seeing beside the totals: shared-memory traffic, local memory (spills),
#: barriers. (opcode prefix, label) per machine-code dialect.
_CUDA_COUNTS = (("LDS", "lds"), ("LDSM", "ldsm"), ("STS", "sts"), ("LDL", "ldl"), ("STL", "stl"),
                ("BAR", "bar"))
_AMD_COUNTS = (("ds_read", "ds_read"), ("ds_write", "ds_write"), ("scratch_", "scratch"),
               ("buffer_store", "buf_store"), ("s_barrier", "barrier"))


def instruction_summary(report) -> str:
    """Total instructions and a few classes, e.g. `1234 instr, lds 24, sts 12, ldl 0, stl 0, bar 18`."""
    counts = report.instruction_counts
    total = sum(counts.values())
    amd = any(op[:2] in ("v_", "s_") for op in counts)
    classes = _AMD_COUNTS if amd else _CUDA_COUNTS
    parts = [f"{total} instr"]
    for prefix, label in classes:
        # LDS must not count LDSM (ldmatrix), which has its own column.
        n = sum(count for op, count in counts.items()
                if op.split(".")[0] == prefix or (amd and op.startswith(prefix)))
        parts.append(f"{label} {n}")
    return ", ".join(parts)


# ---- the table ---------------------------------------------------------------------------------------------

_HEADER = ("arch", "kernel", "config", "result", "regs", "spill", "smem KiB", "matrix", "global reads",
           "instructions")


def _row(report) -> tuple:
    if not report.compiled:
        return (report.arch, report.kernel, describe_config(report.config), "ERROR", "", "", "", "", "", "")
    shared = f"{report.shared_bytes / 1024:.0f}/{report.shared_limit // 1024}"
    if report.fits:
        result = "fits"
    elif report.shared_bytes > report.shared_limit:
        result = "SMEM>"
    else:
        result = "SPILLS"
    return (report.arch, report.kernel, describe_config(report.config), result, str(report.registers),
            str(report.spill_bytes), shared, matrix_summary(report), global_reads_summary(report),
            instruction_summary(report))


def format_table(reports: list) -> str:
    """A fixed-width table, one row per kernel and config; a failed compile's error follows on its own line.

    result: `fits` (compiled, within shared memory, no spills), `SMEM>` (needs more shared memory than the
    arch has: the autotuner skips it at launch), `SPILLS` (local memory per thread), `ERROR`.
    """
    rows = [_HEADER] + [_row(report) for report in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
        elif not reports[index - 1].compiled:
            lines.append(f"    error: {reports[index - 1].error}")
    return "\n".join(lines)


# ---- JSON for tools ----------------------------------------------------------------------------------------

def _git(*args) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=_SOURCE_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _git_state() -> tuple:
    """(commit, dirty) of lorafuse's own checkout; (None, None) when installed elsewhere or without git.
    dirty: tracked files differ from the commit, so the commit only approximates the compiled code."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _SOURCE_ROOT:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return _git("rev-parse", "HEAD"), None if status is None else bool(status)


def versions() -> dict:
    import torch
    import triton

    import lorafuse

    commit, dirty = _git_state()
    return {"lorafuse": lorafuse.__version__, "git_commit": commit, "git_dirty": dirty, "triton": triton.__version__,
            "torch": torch.__version__}


def kernel_summary(reports: list) -> dict:
    """Per kernel: candidate configs, how many compiled, fit shared memory, fit without spills."""
    summary = {}
    for report in reports:
        entry = summary.setdefault(report.kernel, {"configs": 0, "compiled": 0, "within_shared": 0, "fits": 0})
        entry["configs"] += 1
        entry["compiled"] += report.compiled
        entry["within_shared"] += report.compiled and report.shared_bytes <= report.shared_limit
        entry["fits"] += report.fits
    return summary


def to_document(runs: dict, *, problem: dict, findings: dict) -> dict:
    """The JSON document: versions, the problem, and per arch the target, every KernelReport and the findings
    of lorafuse.inspect.rules. runs: arch -> reports; findings: arch -> list of sentences."""
    from .targets import ARCHS

    return {
        "tool": "lorafuse.inspect",
        **versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "problem": problem,
        "archs": {arch: {"target": ARCHS[arch][3], "summary": kernel_summary(reports),
                         "findings": findings.get(arch, []), "reports": [report.to_json() for report in reports]}
                  for arch, reports in runs.items()},
    }
