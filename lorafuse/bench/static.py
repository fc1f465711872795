"""`python -m lorafuse.bench --static`: the training step's time estimated from compiled code, not measured.

Compiles every autotune candidate of the four launches of a FusedLoRALinear training step (forward_xa, forward,
backward_dy, backward_dx) and of a plain Triton GEMM pair (x @ W^T and dy @ W, plain_gemm.py, the floor) for a
GPU this machine need not have, and estimates each from its SASS and TTGIR (lorafuse.inspect.estimate: tensor,
issue and memory terms). Reports per kernel the config the estimate picks, the train step over the plain pair,
the main loops side by side at the same tiles, the tensor-core work beyond the plain pair and LoRA's own math,
and the dropout draws per element of x.

Needs a process where TRITON_INTERPRET was unset when lorafuse.kernels was first imported.
"""

import dataclasses
import json
import os
from typing import Callable, Optional

import torch

from lorafuse.inspect.compile import DTYPES, compile_config, inspect_config, problem_launches
from lorafuse.inspect.estimate import choose, estimate_kernel, machine_for, tensor_kind
from lorafuse.inspect.targets import compiling_for

from .shapes import Shape

LABEL = "estimate from compiled code, not a measurement"
LORA_KERNELS = ("forward_xa", "forward", "backward_dy", "backward_dx")
#: What a FusedDoRALinear's step launches besides LoRA's four.
DORA_KERNELS = ("dora_norm",)
PLAIN_KERNELS = ("plain_x@W^T", "plain_dy@W")
#: (LoRA GEMM kernel, its plain counterpart, the LoRA config's tiles -> the plain GEMM's tiles). The dx kernel
#: is an (M, K) GEMM over N: its BLOCK_K is the plain GEMM's BLOCK_N and its BLOCK_N the plain BLOCK_K.
GEMM_PAIRS = (
    ("forward", "plain_x@W^T", lambda c: (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"])),
    ("backward_dx", "plain_dy@W", lambda c: (c["BLOCK_M"], c["BLOCK_K"], c["BLOCK_N"])),
)
DEFAULT_SHAPES = (Shape(8192, 4096, 4096), Shape(8192, 4096, 11008))


def _tiles(kernel: str, config: dict) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) in plain-GEMM terms, to match configs across kernels."""
    for lora, plain, to_plain in GEMM_PAIRS:
        if kernel == lora:
            return (*to_plain(config), config["num_warps"], config["num_stages"])
        if kernel == plain:
            return (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["num_warps"], config["num_stages"])
    raise ValueError(f"kernel {kernel!r} is not a GEMM of GEMM_PAIRS")


def check_compilable() -> None:
    """Refuse (RuntimeError) where lorafuse.kernels was built by Triton's interpreter: it cannot compile."""
    from lorafuse.kernels import INTERPRETED

    if INTERPRETED:
        raise RuntimeError("--static compiles the kernels for a GPU target, but lorafuse.kernels was imported "
                           "with TRITON_INTERPRET set: run it in a process started without TRITON_INTERPRET")


def estimate_problem(arch: str, *, dtype: str, rank: int, dropout: float, shape: Shape, bias: bool = True,
                     tf32: bool = False, select: Optional[Callable[[str, dict], bool]] = None,
                     adapter_dtype: Optional[str] = None, dora: bool = False) -> dict:
    """Every candidate's estimate and the summary for one problem (a dict ready for JSON).

    select(kernel, config) -> bool keeps only some configs (tests compile one small config per kernel).
    adapter_dtype: "fp32" for fp32 adapters on the fp16/bf16 model (None: the model's dtype). dora: a
    FusedDoRALinear's step (the weight-norm launch added, DoRA's work in the others).
    """
    from .plain_gemm import plain_gemm_launches

    check_compilable()
    machine = machine_for(arch)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    M, K, N = shape
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    try:
        with compiling_for(arch) as target:
            launches = problem_launches(dtype=DTYPES[dtype], rank=rank, dropout=dropout, bias=bias, M=M, K=K, N=N,
                                        adapter_dtype=DTYPES[adapter_dtype] if adapter_dtype else None, dora=dora)
            launches += plain_gemm_launches(dtype=DTYPES[dtype], M=M, K=K, N=N)
            candidates = {}
            for launch in launches:
                # The weight norm has only low-rank products: LORA_PRECISION is its precision.
                kind = tensor_kind(dtype, launch.meta.get("PRECISION", launch.meta.get("LORA_PRECISION")))
                estimates = []
                for config in launch.candidate_configs():
                    as_dict = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                    if select is not None and not select(launch.name, as_dict):
                        continue
                    report = inspect_config(arch, launch, config, target)
                    # A second compile of the same config is the JIT cache's: it hands back the kernel just built.
                    ttgir = compile_config(launch, config).asm["ttgir"] if report.compiled else None
                    estimates.append(estimate_kernel(machine, launch, report, ttgir, kind=kind, x_elements=M * K))
                candidates[launch.name] = estimates
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return summarize(machine, candidates, dtype=dtype, rank=rank, dropout=dropout, shape=shape, bias=bias,
                     adapter_dtype=adapter_dtype, dora=dora)


def _loop_side(estimate) -> dict:
    """A main loop per TTGIR iteration (one BLOCK_K step): a SASS body that ptxas unrolled u times is divided by u."""
    unroll = estimate.loop["unroll"]
    return {"config": estimate.config, "unroll": unroll, "instructions": estimate.loop["instructions"] / unroll,
            "non_matrix": estimate.loop["non_matrix"] / unroll,
            "matrix": {op: n / unroll for op, n in estimate.loop["matrix"].items()},
            "by_class": {name: n / unroll for name, n in estimate.loop["by_class"].items()}}


def compare_loops(candidates: dict) -> list:
    """The LoRA GEMMs' main loops beside the plain GEMM's at the same tiles, every config both compiled, per
    BLOCK_K step."""
    rows = []
    for lora, plain, _ in GEMM_PAIRS:
        plain_by_tiles = {_tiles(plain, e.config): e for e in candidates.get(plain, []) if e.loop}
        for estimate in candidates.get(lora, []):
            other = plain_by_tiles.get(_tiles(lora, estimate.config))
            if estimate.loop is None or other is None:
                continue
            ours, theirs = _loop_side(estimate), _loop_side(other)
            rows.append({"kernel": lora, "plain": plain, "fits": estimate.fits and other.fits,
                         "lora": ours, "plain_loop": theirs, "same_matrix": ours["matrix"] == theirs["matrix"],
                         "non_matrix_ratio": ours["non_matrix"] / theirs["non_matrix"]})
    return rows


def summarize(machine, candidates: dict, *, dtype, rank, dropout, shape, bias, adapter_dtype=None,
              dora=False) -> dict:
    """The chosen config per kernel, the train step and its ratio to the plain GEMM pair."""
    M, K, N = shape
    kernels = (*DORA_KERNELS, *LORA_KERNELS) if dora else LORA_KERNELS
    chosen = {name: choose(estimates) for name, estimates in candidates.items()}
    missing = [name for name in (*kernels, *PLAIN_KERNELS) if name in candidates and chosen[name] is None]
    step = [chosen[name] for name in kernels if chosen.get(name) is not None]
    plain = [chosen[name] for name in PLAIN_KERNELS if chosen.get(name) is not None]
    complete = not missing and len(step) == len(kernels) and len(plain) == len(PLAIN_KERNELS)
    summary = {
        "label": LABEL, "arch": machine.arch, "dtype": dtype, "adapter_dtype": adapter_dtype or dtype,
        "dora": dora, "rank": rank, "dropout": dropout, "bias": bias,
        "shape": {"M": M, "K": K, "N": N}, "no_fitting_config": missing,
        "chosen": {name: estimate.to_json() for name, estimate in chosen.items() if estimate is not None},
        "candidates": {name: [_brief(e) for e in estimates] for name, estimates in candidates.items()},
        "main_loops": compare_loops(candidates),
    }
    if complete:
        step_s = sum(e.estimate_s for e in step)
        plain_s = sum(e.estimate_s for e in plain)
        plain_flops = sum(e.matrix_flops for e in plain)
        step_flops = sum(e.matrix_flops for e in step)
        lora_math = 6 * M * rank * (K + N)  # xa, xa@B^T; dxa, dB, dA, dxa@A: 2 M r (K or N) each
        if dora:
            lora_math += 2 * N * K * rank  # the weight norm's B @ A, one tile at a time
        summary.update({
            "train_step_s": step_s, "plain_pair_s": plain_s, "ratio": step_s / plain_s,
            "dropout_draws_per_element": {e.kernel: e.draws_per_element for e in step if e.draws_per_element},
            "matrix_flops": {"train_step": step_flops, "plain_pair": plain_flops, "lora_math": lora_math,
                             "beyond_plain_and_lora": (step_flops - plain_flops - lora_math) / plain_flops},
        })
    return summary


def _brief(estimate) -> dict:
    """One candidate, for the JSON's list of everything compiled."""
    data = {"config": estimate.config, "fits": estimate.fits, "registers": estimate.registers,
            "spill_bytes": estimate.spill_bytes, "shared_bytes": estimate.shared_bytes}
    if estimate.error:
        data["error"] = estimate.error
    if estimate.tensor_s is not None:
        data.update({"tensor_s": estimate.tensor_s, "issue_s": estimate.issue_s, "memory_s": estimate.memory_s,
                     "estimate_s": estimate.estimate_s, "bound": estimate.bound,
                     "loop_instructions": estimate.loop["instructions"], "loop_trips": estimate.loop["trips"]})
    return data


# ---- text -----------------------------------------------------------------------------------------------------

def _config_text(config: dict) -> str:
    short = {"BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK"}
    parts = [f"{short[key]}{value}" for key, value in config.items() if key in short]
    return " ".join(parts + [f"w{config['num_warps']}", f"s{config['num_stages']}"])


def _draws_text(value) -> str:
    if not value:
        return "-"
    return f"1/{1 / value:.3g}" if value < 1 else f"{value:.3g}"


_COLUMNS = (("kernel", "<12"), ("config (picked by the estimate)", "<31"), ("regs", ">4"), ("progs", ">6"),
            ("tensor us", ">9"), ("issue us", ">9"), ("memory us", ">9"), ("estimate", ">9"), ("bound", "<6"),
            ("draws/elem", ">10"))


def _row(*cells) -> str:
    cells = list(cells) + [""] * (len(_COLUMNS) - len(cells))
    return "  " + " ".join(f"{cell:{spec}}" for cell, (_, spec) in zip(cells, _COLUMNS)).rstrip()


def _us(seconds) -> str:
    return f"{seconds * 1e6:.1f}"


def format_problem(summary: dict) -> str:
    """One problem's table: the chosen config of each kernel, its terms, the train step and the plain pair."""
    shape = summary["shape"]
    adapters = f" ({summary['adapter_dtype']} adapters)" if summary["adapter_dtype"] != summary["dtype"] else ""
    method = "DoRA" if summary["dora"] else "LoRA"
    lines = [f"{shape['M']}x{shape['K']}->{shape['N']}  {method} {summary['dtype']}{adapters} r={summary['rank']} "
             f"dropout={summary['dropout']:g}  [{LABEL}]", _row(*(name for name, _ in _COLUMNS))]
    for name in (*DORA_KERNELS, *LORA_KERNELS, *PLAIN_KERNELS):
        data = summary["chosen"].get(name)
        if data is None:
            if name in summary["candidates"]:
                lines.append(_row(name, "no config fits (compiled, spill-free, within shared memory)"))
            continue
        lines.append(_row(name, _config_text(data["config"]), data["registers"], data["programs"],
                          _us(data["tensor_s"]), _us(data["issue_s"]), _us(data["memory_s"]),
                          _us(data["estimate_s"]), data["bound"], _draws_text(data["draws_per_element"])))
        if name == LORA_KERNELS[-1] and "train_step_s" in summary:
            lines.append(_row("train step", "", "", "", "", "", "", _us(summary["train_step_s"])))
    if "ratio" in summary:
        lines.append(_row("plain pair", "", "", "", "", "", "", _us(summary["plain_pair_s"])))
        flops = summary["matrix_flops"]
        lines.append(f"  train step / plain GEMM pair: {summary['ratio']:.3f}; tensor-core work beyond the plain pair "
                     f"and LoRA's own math: {flops['beyond_plain_and_lora'] * 100:+.2f}% of the plain pair")
    for row in summary["main_loops"]:
        if row["lora"]["config"] != summary["chosen"].get(row["kernel"], {}).get("config"):
            continue
        lora, plain = row["lora"], row["plain_loop"]
        same = "the same" if row["same_matrix"] else "DIFFERENT"
        lines.append(f"  main loop {row['kernel']} vs {row['plain']} at {_config_text(lora['config'])}: "
                     f"{lora['instructions']:g} vs {plain['instructions']:g} warp instructions per step, non-matrix "
                     f"{lora['non_matrix']:g} vs {plain['non_matrix']:g} "
                     f"({(row['non_matrix_ratio'] - 1) * 100:+.1f}%), matrix {same} "
                     f"({', '.join(f'{n:g} {op}' for op, n in lora['matrix'].items())})")
    return "\n".join(lines)


def run_static(*, arch: str, dtype: str, ranks, dropouts, shapes, json_path: Optional[str] = None,
               print_fn=print, adapter_dtype: Optional[str] = None, dora: bool = False) -> list:
    """Estimate every (shape, rank, dropout), print each table, write JSON when asked; the summaries."""
    machine = machine_for(arch)
    print_fn(f"Static estimate for {arch} ({machine.name}): {LABEL}. Model and limits: bench/README.md.")
    summaries = []
    for shape in shapes:
        for rank in ranks:
            for dropout in dropouts:
                summary = estimate_problem(arch, dtype=dtype, rank=rank, dropout=dropout, shape=shape,
                                           adapter_dtype=adapter_dtype, dora=dora)
                print_fn(format_problem(summary))
                summaries.append(summary)
    if json_path:
        write_json(json_path, machine=machine, summaries=summaries)
        print_fn(f"wrote {json_path}")
    return summaries


def write_json(path: str, *, machine, summaries: list) -> None:
    from . import environment

    record = {"label": LABEL, "machine": machine.to_json(), "model": _MODEL,
              "compiled_on": environment.describe("cpu"), "problems": summaries}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=1, default=_json_default)
        f.write("\n")


def _json_default(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


_MODEL = {
    "per_kernel": "max(tensor, issue, memory) for the config with the smallest estimate among those that fit",
    "tensor": "matrix FLOPs of the compiled instructions (HMMA/HGMMA shapes; UTC*MMA from TTGIR dot shapes) x "
              "tail / dense tensor peak of the dtype",
    "issue": "warp instructions (main loop x trips + the rest once) x tail / (SMs x 4 schedulers x clock)",
    "memory": "bytes of every tensor the kernel uses, read once, and of its outputs, written once / DRAM bandwidth; "
              "atomics resolve in L2 (atomic_bytes, not timed)",
    "tail": "ceil(programs / SMs) x SMs / programs, on the tensor and issue terms",
    "train_step": "forward_xa + forward + backward_dy + backward_dx; no overlap between kernels, no launch latency",
    "plain_pair": "plain Triton GEMMs x @ W^T and dy @ W (lorafuse/bench/plain_gemm.py) over the forward GEMM's "
                  "configs, each at the config with the smallest estimate",
    "draws_per_element": "philox calls (20 tt.mulhiui per call in the TTGIR, one element per counter) x programs / "
                         "(M x K)",
}
