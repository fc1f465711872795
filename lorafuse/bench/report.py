"""The table printed at the end of a run and the JSON file that records it."""

import dataclasses
import json
from pathlib import Path

#: Bumped when a field changes meaning or goes away; tests/test_bench_cli.py checks the fields.
SCHEMA = "lorafuse-bench/1"

_HEADERS = ("provider", "shape (MxK->N)", "median ms (p20/p80)", "TFLOP/s", "x base", "x peft", "peak mem",
            "saved", "beyond x", "note")


def format_bytes(count) -> str:
    if count is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(r):
    shape = f"{r.M}x{r.K}->{r.N}"
    saved = "-" if r.saved_bytes is None else format_bytes(r.saved_bytes)
    beyond = "-" if r.saved_beyond_x_bytes is None else format_bytes(r.saved_beyond_x_bytes)
    if r.median_ms is None:
        return (r.label, shape, "-", "-", "-", "-", "-", saved, beyond, f"{r.status}: {r.reason}")
    timing = f"{r.median_ms:.3f} ({r.p20_ms:.3f}/{r.p80_ms:.3f})"
    return (r.label, shape, timing, f"{r.tflops:.2f}", _ratio(r.ratio_to_base), _ratio(r.ratio_to_peft),
            format_bytes(r.peak_bytes), saved, beyond, "")


def format_table(records) -> str:
    """A plain-text table, one row per record, columns padded to fit."""
    rows = [_HEADERS] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADERS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def config_dict(config) -> dict:
    values = dataclasses.asdict(config)
    values["shapes"] = [list(shape) for shape in config.shapes]
    values["providers"] = list(config.providers)
    values["dtype"] = str(config.dtype).replace("torch.", "")
    values["scaling"] = config.scaling
    return values


def to_json(*, environment, config, records) -> dict:
    """Everything a result needs to be traced and re-run: schema, environment, config, one entry per record."""
    return {
        "schema": SCHEMA,
        "environment": environment,
        "config": config_dict(config),
        "results": [dataclasses.asdict(r) for r in records],
    }


def write_json(path, document) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
