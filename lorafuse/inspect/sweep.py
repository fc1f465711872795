"""Every variant the launchers can produce, compiled for every target in worker processes, checked by the rules.

A variant is an arch, a dtype (fp32 with TF32 off or on; fp16/bf16 with adapters in fp32 too), a rank, a dropout,
bias or not and the gradients the backward computes. Many variants share compiled kernels (bias only changes
the forward GEMM, the gradients only the backward kernels), so each distinct compile (worker.compile_key) runs
once, whichever variants need it.

Compiles run in `python -m lorafuse.inspect.worker` processes, `jobs` at a time: a compiler that aborts or
hangs loses one config (reported as a failed compile), not the sweep, and the workers import the kernels
without the TRITON_INTERPRET the test process sets. Triton's on-disk cache (~/.triton/cache, or
TRITON_CACHE_DIR) makes a second sweep over unchanged kernels take seconds per hundred configs.

`python -m lorafuse.inspect.sweep [--all | --half] [--jobs N] [--json PATH]` prints the variants that break a rule.
"""

import argparse
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .compile import KernelReport
from .rules import STRICT_MAX_RANK, launch_findings
from .targets import ARCHS
from .worker import MISSING_TOOL, WORKER_FAILED

#: (dtype, adapter dtype or None for dtype's, tf32): fp32 runs on FMA unless torch allows TF32, so both are
#: variants; fp32 adapters on an fp16/bf16 model (PEFT's default) run the low-rank products in fp32.
DTYPE_VARIANTS = (("fp16", None, False), ("bf16", None, False), ("fp16", "fp32", False), ("bf16", "fp32", False),
                  ("fp32", None, False), ("fp32", None, True), ("fp64", None, False))
RANKS = (1, 16, 64, 256)
DROPOUTS = (0.0, 0.1)
#: Every non-empty set of gradients (a backward computes at least one).
GRAD_SETS = tuple(grads for n in (3, 2, 1) for grads in itertools.combinations(("dx", "dA", "dB"), n))
#: llama-7b's q_proj at 8192 tokens: (M, K, N).
LLAMA_7B = (8192, 4096, 4096)
#: A compile that takes longer is killed and reported as failed (a cold fp64 config takes ~10 s).
JOB_TIMEOUT_S = 600


@dataclasses.dataclass(frozen=True)
class Variant:
    arch: str
    dtype: str
    rank: int
    dropout: float
    bias: bool
    grads: tuple
    tf32: bool = False
    adapter_dtype: Optional[str] = None
    M: int = LLAMA_7B[0]
    K: int = LLAMA_7B[1]
    N: int = LLAMA_7B[2]
    dora: bool = False  # a FusedDoRALinear's step (its weight-norm launch, DoRA's forward and backward)

    @property
    def label(self) -> str:
        """`sm_90-bf16-r16-p0.1-bias-dx,dA,dB` (`...-dora` for DoRA): used as the pytest id."""
        dtype = self.dtype + ("-fp32adapters" if self.adapter_dtype else "") + ("-tf32" if self.tf32 else "")
        return (f"{self.arch}-{dtype}-r{self.rank}-p{self.dropout:g}-{'bias' if self.bias else 'nobias'}-"
                f"{','.join(self.grads)}" + ("-dora" if self.dora else ""))


#: DoRA's gradient sets: a layer's whole step, and a first layer's (no dx). The magnitude's gradient is always
#: computed (its dm launches the same either way).
DORA_GRAD_SETS = (("dx", "dA", "dB"), ("dA", "dB"))


def all_variants() -> list:
    """The whole space: 4 archs x 7 dtype variants x 4 ranks x 2 dropouts x bias x 7 gradient sets for LoRA, and
    for DoRA the same with DORA_GRAD_SETS."""
    return [Variant(arch, dtype, rank, dropout, bias, grads, tf32, adapter_dtype, dora=dora)
            for dora, grad_sets in ((False, GRAD_SETS), (True, DORA_GRAD_SETS))
            for arch in ARCHS for dtype, adapter_dtype, tf32 in DTYPE_VARIANTS for rank in RANKS for dropout in DROPOUTS
            for bias in (True, False) for grads in grad_sets]


def half_precision_variants() -> list:
    """The variants where every config must fit (rules.py): fp16/bf16, adapters in their dtype or in fp32, at
    r <= 64, on every arch, with every dropout, bias and gradient set (1344 LoRA variants, 384 DoRA ones)."""
    return [variant for variant in all_variants() if variant.dtype in ("fp16", "bf16")
            and variant.rank <= STRICT_MAX_RANK]


def representative_variants() -> list:
    """A subset for `make test` (about 2 minutes on 2 cores with a cold cache): ordinary LoRA training on each
    arch (bf16 with dropout, all gradients, adapters in bf16 and in fp32; fp16 at r=64 without dropout; a first
    layer at r=1 that needs no dx), each FMA or TF32 dtype on one arch, and DoRA on four archs."""
    every = ("dx", "dA", "dB")
    return [
        Variant("sm_90", "bf16", 16, 0.1, True, every),
        Variant("sm_90", "bf16", 16, 0.1, True, every, adapter_dtype="fp32"),
        Variant("gfx942", "bf16", 16, 0.1, True, every),
        Variant("sm_80", "fp16", 64, 0.0, True, every),
        Variant("sm_100", "bf16", 1, 0.1, False, ("dA", "dB")),
        Variant("sm_80", "fp32", 16, 0.1, True, every, tf32=True),
        Variant("sm_90", "fp32", 16, 0.0, False, ("dx", "dB")),
        Variant("gfx942", "fp64", 16, 0.1, True, every),
        # DoRA: its default (fp32 adapters) on sm_90, and where its pruning is arch-specific (sm_100's epilogue,
        # gfx942's dm).
        Variant("sm_90", "bf16", 16, 0.1, True, every, adapter_dtype="fp32", dora=True),
        Variant("sm_100", "bf16", 16, 0.1, True, every, dora=True),
        Variant("gfx942", "fp16", 64, 0.0, False, every, dora=True),
        # Two that broke the rules until stop 15: the weight norm in rank chunks (split precision at r > 64), and
        # dx's 32x32x32 tile on 4 stages (DoRA's only sm_80 candidate with fp32 adapters).
        Variant("sm_90", "bf16", 256, 0.1, True, ("dA", "dB"), adapter_dtype="fp32", dora=True),
        Variant("sm_80", "bf16", 1, 0.0, True, every, adapter_dtype="fp32", dora=True),
    ]


# ---- worker processes --------------------------------------------------------------------------------------

#: How a worker process is started.
WORKER_COMMAND = (sys.executable, "-m", "lorafuse.inspect.worker")


def _worker_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_worker(request: dict, count: int, *, on_answer) -> tuple:
    """Run one worker on `request` (expecting `count` answers); on_answer(index, answer) for each line.
    Returns (answers received, why it stopped early or None)."""
    process = subprocess.Popen(WORKER_COMMAND, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env())
    stderr_tail = []
    drain = threading.Thread(target=lambda: stderr_tail.extend(process.stderr), daemon=True)
    drain.start()
    killed = []

    def kill():
        killed.append(True)
        process.kill()

    process.stdin.write(json.dumps(request))
    process.stdin.close()
    received = 0
    while received < count:
        watchdog = threading.Timer(JOB_TIMEOUT_S, kill)
        watchdog.start()
        line = process.stdout.readline()
        watchdog.cancel()
        if not line:
            break
        on_answer(received, json.loads(line))
        received += 1
    process.stdout.close()
    code = process.wait()
    drain.join(timeout=10)
    if received == count and code == 0:
        return received, None
    last = next((line.strip() for line in reversed(stderr_tail) if line.strip()), "")
    if code == MISSING_TOOL:
        raise FileNotFoundError(last)
    if code == WORKER_FAILED:
        raise RuntimeError(f"a lorafuse.inspect.worker failed (not a compiler crash):\n{''.join(stderr_tail[-30:])}")
    if killed:
        return received, f"compile took over {JOB_TIMEOUT_S} s and was killed"
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    return received, f"compiler process died ({how}): {last}"[:400]


def plan_variants(variants: list) -> list:
    """Per variant (in a worker): [{"kernel": name, "configs": [{"config": dict, "key": str}]}]."""
    plans = [None] * len(variants)

    def keep(index, answer):
        plans[index] = answer

    received, problem = _run_worker({"mode": "plan", "variants": [dataclasses.asdict(v) for v in variants]},
                                    len(variants), on_answer=keep)
    if problem is not None:
        raise RuntimeError(f"planning the sweep failed after {received} of {len(variants)} variants: {problem}")
    return plans


def compile_jobs(jobs: list, *, workers: int, progress=None) -> list:
    """KernelReport dicts for `jobs`, compiled by `workers` worker processes at a time. A job whose process
    dies or hangs gets a failed report naming what happened; the jobs after it go to a fresh process.
    progress(done, total), if given, is called after each job."""
    results = [None] * len(jobs)
    # Chunks of at most 64 jobs: a worker's start (importing torch and Triton) is ~2 s, a cold compile ~1-3 s,
    # and three chunks per worker keep the workers busy until the end.
    chunk = max(1, min(64, math.ceil(len(jobs) / (workers * 3))))
    lock = threading.Lock()
    done = [0]

    def record(index, answer):
        results[index] = answer
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(jobs))

    def run_chunk(start):
        pending = list(range(start, min(start + chunk, len(jobs))))
        while pending:
            def keep(index, answer, pending=pending):
                record(pending[index], answer)

            received, problem = _run_worker({"mode": "compile", "jobs": [jobs[i] for i in pending]}, len(pending),
                                            on_answer=keep)
            if problem is None:
                return
            culprit = jobs[pending[received]]
            record(pending[received], KernelReport(
                arch=culprit["variant"]["arch"], kernel=culprit["kernel"], config=culprit["config"], compiled=False,
                error=problem).to_json())
            pending = pending[received + 1:]

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(run_chunk, range(0, len(jobs), chunk)))
    return results


# ---- the sweep ---------------------------------------------------------------------------------------------

def _report_from_json(data: dict) -> KernelReport:
    fields = {field.name for field in dataclasses.fields(KernelReport)}
    return KernelReport(**{name: value for name, value in data.items() if name in fields})


@dataclasses.dataclass
class SweepResult:
    findings: dict  # Variant -> list of broken rules (empty: fine)
    reports: dict  # compile key -> KernelReport
    plans: dict  # Variant -> its launches: [{"kernel": name, "configs": [{"config": dict, "key": str}]}]
    compiles: int  # distinct compiles the variants needed
    seconds: float

    def failing(self) -> dict:
        return {variant: found for variant, found in self.findings.items() if found}

    def variant_reports(self, variant) -> list:
        """The variant's KernelReports, launch by launch and config by config, in the launchers' order."""
        return [self.reports[c["key"]] for launch in self.plans[variant] for c in launch["configs"]]


def run_sweep(variants: list, *, workers=None, kernels=None, progress=None) -> SweepResult:
    """Compile every distinct (arch, kernel, config) the variants need and check each variant's launches.
    kernels: launch names to keep (None: all). progress(done, total): see compile_jobs."""
    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    plans = [[launch for launch in plan if kernels is None or launch["kernel"] in kernels]
             for plan in plan_variants(variants)]
    jobs, seen = [], {}
    for variant, plan in zip(variants, plans):
        for launch in plan:
            for candidate in launch["configs"]:
                if candidate["key"] not in seen:
                    seen[candidate["key"]] = len(jobs)
                    jobs.append({"variant": dataclasses.asdict(variant), "kernel": launch["kernel"],
                                 "config": candidate["config"]})
    reports = [_report_from_json(data) for data in compile_jobs(jobs, workers=workers, progress=progress)]
    by_key = {key: reports[index] for key, index in seen.items()}
    findings = {}
    for variant, plan in zip(variants, plans):
        findings[variant] = [finding for launch in plan
                             for finding in launch_findings([by_key[c["key"]] for c in launch["configs"]],
                                                            dtype=variant.dtype,
                                                            adapter_dtype=variant.adapter_dtype,
                                                            rank=variant.rank)]
    return SweepResult(findings=findings, reports=by_key, plans=dict(zip(variants, plans)), compiles=len(jobs),
                       seconds=time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorafuse.inspect.sweep",
                                     description="Compile every LoRA kernel variant for sm_80/sm_90/sm_100/gfx942 "
                                                 "and print the variants that break a rule.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true", help="the whole space (default: the make-test subset)")
    which.add_argument("--half", action="store_true",
                       help=f"the fp16/bf16 variants (adapters in fp32 too) at r <= {STRICT_MAX_RANK}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="worker processes (default: cores)")
    parser.add_argument("--json", metavar="PATH", help="write findings and every report as JSON")
    args = parser.parse_args(argv)
    if args.jobs is None or args.jobs <= 0:
        parser.error(f"--jobs must be a positive integer, got {args.jobs}")
    variants = all_variants() if args.all else half_precision_variants() if args.half else representative_variants()
    start = time.perf_counter()

    def progress(done, total):
        if done % 100 == 0 or done == total:
            print(f"compiled {done}/{total} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    result = run_sweep(variants, workers=args.jobs, progress=progress)
    failing = result.failing()
    for variant, found in failing.items():
        print(variant.label)
        for finding in found:
            print(f"    {finding}")
    print(f"{len(variants)} variants, {result.compiles} distinct compiles, {len(failing)} variants break a rule, "
          f"{result.seconds:.0f} s with {args.jobs} workers")
    if args.json:
        from .report import versions

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**versions(), "variants": len(variants), "compiles": result.compiles,
                       "seconds": round(result.seconds),
                       "failing": {variant.label: found for variant, found in failing.items()},
                       "reports": [report.to_json() for report in result.reports.values()]}, f, indent=1)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
