"""`python -m lorafuse.bench` / `lorafuse-bench`: parse options, run, print the table, write JSON and a plot."""

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..argtypes import dropout_probability, non_negative_int, positive_float, positive_int
from ..inspect.estimate import MACHINES
from . import environment
from .providers import PROVIDERS
from .report import format_table, to_json, write_json
from .run import Config, run
from .shapes import PRESETS, parse_shapes
from .steps import MODES

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Short names, accepted everywhere (lorafuse.inspect's spelling).
_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

#: (shapes, tokens, dtype) when not given: LLM projections on a GPU; small ones in fp32 on a CPU, where
#: the point is that the benchmark runs, not its numbers.
_DEFAULTS = {"cuda": (["llama-7b"], 8192, "bfloat16"), "cpu": (["small"], 512, "float32")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lorafuse.bench",
        description="Time and memory of LoRA (or, with --dora, DoRA) linear layers on identical weights: the "
                    "frozen base linear (the floor), lorafuse, the unfused reference, PEFT and a two-GEMM addmm "
                    "layer (LoRA only).")
    parser.add_argument("--shapes", nargs="+", metavar="SHAPE",
                        help=f"presets ({', '.join(PRESETS)}; M is --tokens) or M,K,N triples "
                             "(default: llama-7b on a GPU, small on a CPU)")
    parser.add_argument("--tokens", type=positive_int,
                        help="M for presets: batch x sequence (default 8192 on a GPU, 512 on a CPU)")
    parser.add_argument("--rank", type=positive_int, nargs="+", metavar="R",
                        help="LoRA rank r (default 16; several only with --static)")
    parser.add_argument("--alpha", type=positive_float, default=32.0,
                        help="lora_alpha > 0; scaling is alpha / r (default 32)")
    parser.add_argument("--dropout", type=dropout_probability, nargs="+", metavar="P",
                        help="lora_dropout in [0, 1) (default 0, and 0.1 with --static; several only with --static)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES) + sorted(_ALIASES),
                        help="default bfloat16 on a GPU and with --static, float32 on a CPU")
    parser.add_argument("--mode", choices=MODES, default="train",
                        help="fwd: training forward; bwd: its backward; train: both; infer: eval forward, "
                             "unmerged and merged (default train)")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS), metavar="NAME",
                        help=f"any of {', '.join(PROVIDERS)} (default: all)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default cuda when available")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help="CPU: untimed calls before timing (default 2); a GPU uses do_bench's 25 ms")
    parser.add_argument("--repeats", type=positive_int, default=10,
                        help="CPU: timed calls (default 10); a GPU uses do_bench's 100 ms")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the weights and inputs")
    parser.add_argument("--json", metavar="PATH", help="write every measurement, environment and config as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of time and memory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--static", action="store_true",
                        help="no timing: compile the training step's kernels and a plain Triton GEMM pair for --arch "
                             "and print the time estimated from the compiled code (tensor, issue and memory terms, "
                             "the config each kernel would use, dropout draws per element, the ratio to the plain "
                             "GEMM pair); default shapes 8192,4096,4096 and 8192,4096,11008")
    parser.add_argument("--arch", choices=sorted(MACHINES), default="sm_90",
                        help="--static: the GPU to compile for (default sm_90, an H100)")
    parser.add_argument("--adapter-dtype", choices=("fp32",),
                        help="--static: fp32 adapters on the fp16/bf16 model (PEFT's default; default: the model's "
                             "dtype)")
    parser.add_argument("--dora", action="store_true",
                        help="DoRA layers (use_dora) instead of LoRA's, on the same weights plus a magnitude: "
                             "FusedDoRALinear, the unfused DoRA oracle and PEFT's use_dora=True (the addmm layer "
                             "has no DoRA); with --static, a FusedDoRALinear's training step")
    return parser


def _one(values, default, option, parser):
    """The single value of an nargs="+" option outside --static."""
    if values is None:
        return default
    if len(values) > 1:
        parser.error(f"{option}: one value unless --static, got {len(values)}")
    return values[0]


def unwritable(path) -> Optional[str]:
    """Why `path` cannot be written, or None when it can: tested before the benchmark runs (minutes on a GPU
    grid), leaving no file behind. Missing parent folders are fine where they can be created."""
    path = Path(path)
    if path.is_dir():
        return "it is a directory"
    if path.exists():
        try:
            with open(path, "ab"):  # for writing, without truncating what is there
                pass
        except OSError as err:
            return str(err)
        return None
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as err:
        return f"no file can be created in {ancestor}: {err}"
    return None


def config_from_args(args, parser) -> Config:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    shapes, tokens, dtype = _DEFAULTS[device]
    try:
        parsed = parse_shapes(args.shapes or shapes, tokens=args.tokens or tokens)
    except (TypeError, ValueError) as exc:
        parser.error(f"--shapes: {exc}")
    providers = tuple(dict.fromkeys(args.providers))
    dtype = _ALIASES.get(args.dtype, args.dtype) or dtype
    return Config(shapes=tuple(parsed), providers=providers, mode=args.mode,
                  rank=_one(args.rank, 16, "--rank", parser), alpha=args.alpha,
                  dropout=_one(args.dropout, 0.0, "--dropout", parser), dtype=_DTYPES[dtype], device=device,
                  warmup=args.warmup, repeats=args.repeats, seed=args.seed, dora=args.dora)


def _notes(config, env) -> list:
    notes = [f"{_method(config)} layers; device: {env['device']}; lorafuse backend: {env['lorafuse_backend']}; "
             f"dtype {str(config.dtype).replace('torch.', '')}; r={config.rank}, alpha={config.alpha:g}, "
             f"dropout={config.dropout:g}; mode {config.mode}"]
    if config.dora and config.dropout > 0 and "peft" in config.providers and config.mode != "infer":
        notes.append("DoRA with dropout: PEFT's training forward also rescales W @ dropout(x), one more x @ W^T "
                     "product than lorafuse's and the reference's (a different function; agreement is checked "
                     "with dropout off, where all of them are the same).")
    if env["device_type"] == "cpu":
        notes.append("No GPU: CPU timings (perf_counter) of small shapes; peak memory is not tracked on a CPU "
                     "(n/a). These numbers say nothing about the Triton kernels.")
    if env["lorafuse_backend"] == "triton-interpreter":
        notes.append("TRITON_INTERPRET=1: lorafuse runs its kernels in Triton's interpreter, so its times are "
                     "those of an interpreter; unset it (or LORAFUSE_BACKEND=torch) for the PyTorch path.")
    return notes


def _method(config) -> str:
    return "DoRA" if config.dora else "LoRA"


def run_static_from_args(args, parser) -> int:
    """--static: the estimate from compiled code (lorafuse.bench.static); nothing is timed."""
    from .static import DEFAULT_SHAPES, check_compilable, run_static

    for option, value in (("--device", args.device), ("--plot", args.plot)):
        if value is not None:
            parser.error(f"{option} does not apply to --static, which compiles for --arch and times nothing")
    try:
        shapes = parse_shapes(args.shapes, tokens=args.tokens or 8192) if args.shapes else list(DEFAULT_SHAPES)
    except (TypeError, ValueError) as exc:
        parser.error(f"--shapes: {exc}")
    dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(args.dtype, args.dtype) or "bf16"
    if dtype not in ("bf16", "fp16"):
        parser.error(f"--dtype {args.dtype} with --static: the estimate models tensor-core tiles, bf16 or fp16")
    try:
        check_compilable()
    except RuntimeError as exc:
        parser.error(str(exc))
    try:
        run_static(arch=args.arch, dtype=dtype, ranks=list(dict.fromkeys(args.rank or [16])),
                   dropouts=list(dict.fromkeys(args.dropout or [0.1])), shapes=shapes, json_path=args.json,
                   adapter_dtype=args.adapter_dtype, dora=args.dora)
    except ValueError as exc:  # a kernel the model cannot time (an FMA loop): say which, no traceback
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """Run the benchmark; 0 when every provider that could run agreed with the oracle, 1 otherwise."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        problem = path and unwritable(path)
        if problem:
            parser.error(f"argument {flag}: cannot write {path}: {problem}")
    if args.static:
        return run_static_from_args(args, parser)
    if args.adapter_dtype is not None:
        # Timed, fp32 adapters would need every provider to hold them (the addmm layer cannot) and PEFT's
        # autocast_adapter_dtype to match: not done yet.
        parser.error("--adapter-dtype applies to --static only: the timed benchmark runs its adapters in --dtype")
    config = config_from_args(args, parser)
    env = environment.describe(config.device)
    for note in _notes(config, env):
        print(note)
    records = run(config, progress=not args.no_progress)
    print(format_table(records))
    if config.mode == "infer":
        print("saved: not measured in infer mode (under no_grad autograd keeps nothing).", end=" ")
    else:
        print("saved = bytes autograd keeps for backward after one training forward (unique storages, parameters "
              "excluded); beyond x = the same less the input x's storage.", end=" ")
    print("Outputs were checked against a float64 oracle with dropout off before timing.")
    if args.json:
        write_json(args.json, to_json(environment=env, config=config, records=records))
        print(f"wrote {args.json}")
    if args.plot and not any(r.status == "ok" for r in records):
        print(f"no provider was timed, so {args.plot} was not written", file=sys.stderr)
    elif args.plot:
        from .plot import write_plot

        write_plot(args.plot, records, title=f"{_method(config)}, {env['device']} ({env['lorafuse_backend']}), "
                                             f"{config.mode}, {str(config.dtype).replace('torch.', '')}, "
                                             f"r={config.rank}, dropout={config.dropout:g}")
        print(f"wrote {args.plot}")
    failed = [r for r in records if r.status in ("mismatch", "error")]
    for r in failed:
        print(f"{r.label} on {r.M}x{r.K}->{r.N}: {r.status}: {r.reason}", file=sys.stderr)
    return 1 if failed else 0
