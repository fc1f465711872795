"""A compile worker for the sweep (sweep.py), run as `python -m lorafuse.inspect.worker` in its own process.

Reads one JSON request from stdin and writes one JSON line per answer:
- {"mode": "plan", "variants": [Variant dicts]}: per variant, its launches, each with the candidate configs
  of the variant's arch and the launch's compile key (equal keys compile to the same binary);
- {"mode": "compile", "jobs": [{"variant": ..., "kernel": ..., "config": ...}]}: one KernelReport per job,
  in order, each line written as soon as the job is compiled, so a crash loses only the job in flight.

Its own process because a compiler abort (a ptxas or LLVM crash, a segfault) must not take its caller down,
and because the kernels must be imported without TRITON_INTERPRET, which the test process sets.
"""

import json
import os
import sys
import traceback


def compile_key(arch: str, launch, config: dict) -> str:
    """What decides the binary: arch, kernel, meta-parameters, config, and every argument as Triton specialises
    it (tensors by dtype, ints by value, floats by type). Variants that differ elsewhere (bias for a backward
    kernel, the needed gradients for the forward) share a key and are compiled once."""
    import torch

    def argument(value):
        if isinstance(value, torch.Tensor):
            return str(value.dtype)
        if isinstance(value, bool) or isinstance(value, int):
            return value
        return type(value).__name__

    meta = {name: str(value) for name, value in sorted(launch.meta.items())}
    return json.dumps([arch, launch.name, meta, sorted(config.items()), [argument(a) for a in launch.args]])


def _launches(variant: dict):
    from .compile import DTYPES, problem_launches

    problem = {name: variant[name] for name in ("rank", "dropout", "bias", "M", "K", "N")}
    adapter = variant["adapter_dtype"]
    return problem_launches(dtype=DTYPES[variant["dtype"]], **problem, needs_dx="dx" in variant["grads"],
                            needs_dA="dA" in variant["grads"], needs_dB="dB" in variant["grads"],
                            adapter_dtype=DTYPES[adapter] if adapter else None, dora=variant.get("dora", False))


def _with_target(variant: dict, work):
    """work(target) inside compiling_for(variant's arch), with torch's TF32 flag as the variant has it."""
    import torch

    from .targets import compiling_for

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(variant["tf32"])
    try:
        with compiling_for(variant["arch"]) as target:
            return work(target)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def plan(variant: dict) -> list:
    from .compile import _config_dict

    def work(target):
        return [{"kernel": launch.name,
                 "configs": [{"config": _config_dict(config),
                              "key": compile_key(variant["arch"], launch, _config_dict(config))}
                             for config in launch.candidate_configs()]}
                for launch in _launches(variant)]

    return _with_target(variant, work)


def compile_job(job: dict) -> dict:
    import triton

    from .compile import inspect_config

    variant, wanted = job["variant"], dict(job["config"])

    def work(target):
        launch = next(launch for launch in _launches(variant) if launch.name == job["kernel"])
        config = triton.Config({name: value for name, value in wanted.items()
                                if name not in ("num_warps", "num_stages")},
                               num_warps=wanted["num_warps"], num_stages=wanted["num_stages"])
        return inspect_config(variant["arch"], launch, config, target).to_json()

    return _with_target(variant, work)


#: The exit status of a worker whose own code failed (an uncaught Python exception), as opposed to a compiler
#: that crashed the process (a signal): the sweep stops on it instead of blaming one config and going on.
WORKER_FAILED = 3
#: The exit status of a worker that found a tool missing (ptxas, nvdisasm, ld.lld); its last line names the file.
MISSING_TOOL = 4


def main() -> None:
    # Before anything imports lorafuse.kernels (see the module docstring); here, not at import time, so that
    # importing this module (sweep.py does, for WORKER_FAILED) leaves the importer's environment alone.
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        serve()
    except FileNotFoundError as missing:
        print(missing, file=sys.stderr)
        sys.exit(MISSING_TOOL)
    except Exception:
        traceback.print_exc()
        sys.exit(WORKER_FAILED)


def serve() -> None:
    # Answers go to the original stdout; anything else that prints (Triton prints ptxas logs) goes to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    request = json.load(sys.stdin)
    from .compile import check_not_interpreted, check_toolchain

    check_not_interpreted()
    if request["mode"] == "plan":
        for variant in request["variants"]:
            check_toolchain(variant["arch"])
            answers.write(json.dumps(plan(variant)) + "\n")
            answers.flush()
    elif request["mode"] == "compile":
        for job in request["jobs"]:
            answers.write(json.dumps(compile_job(job)) + "\n")
            answers.flush()
    else:
        raise ValueError(f"mode must be 'plan' or 'compile', got {request['mode']!r}")


if __name__ == "__main__":
    main()
