"""`python -m lorafuse.inspect`: compile a LoRA training step's kernels for a GPU this machine lacks, and report.

Prints a table (one row per kernel and autotune config) and the rules the launches break (lorafuse.inspect.rules);
`--json PATH` also writes everything as JSON. Compiles run in worker processes (lorafuse.inspect.worker).
Exit status: 0 when every launch satisfies the rules, 1 when one does not (or a tool is missing), 2 for a bad
option.
"""

import argparse
import json
import os
import sys

from ..argtypes import dropout_probability, positive_int
from .targets import ARCHS

_DTYPE_NAMES = ("fp16", "bf16", "fp32", "fp64")
_GRADS = ("dx", "dA", "dB")
_KERNELS = ("dora_norm", "forward_xa", "forward", "backward_dy", "backward_dx")


def _shape(text):
    parts = text.split(",")
    if len(parts) != 3 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"must be three positive integers M,K,N (x: MxK, y: MxN), got {text!r}")
    return tuple(int(part) for part in parts)


def _names(allowed):
    def parse(text):
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"must be a comma-separated subset of {','.join(allowed)}, got {text!r}"
                                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        return tuple(names)
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lorafuse.inspect",
        description="Compile every kernel and autotune config of a FusedLoRALinear training step for a GPU target "
                    "with Triton's own compiler (no GPU needed) and report registers, spills, shared memory, "
                    "matrix-core and load instructions.")
    parser.add_argument("--arch", required=True, choices=(*ARCHS, "all"),
                        help="target: " + ", ".join(f"{arch} ({ARCHS[arch][3]})" for arch in ARCHS) + "; all: each")
    parser.add_argument("--dtype", default="bf16", choices=_DTYPE_NAMES, help="x, W, A and B dtype (default bf16)")
    parser.add_argument("--adapter-dtype", choices=("fp32",), default=None,
                        help="lora_A/lora_B dtype when not --dtype's: fp32 on an fp16/bf16 model (PEFT's default)")
    parser.add_argument("--rank", type=positive_int, default=16, help="LoRA rank r (default 16)")
    parser.add_argument("--dropout", type=dropout_probability, default=0.1, help="lora_dropout p (default 0.1)")
    parser.add_argument("--no-bias", action="store_true", help="the base layer has no bias")
    parser.add_argument("--dora", action="store_true",
                        help="a FusedDoRALinear's step: adds the weight-norm kernel (dora_norm) and DoRA's work")
    parser.add_argument("--tf32", action="store_true", help="fp32 on TF32 matrix cores (torch's allow_tf32)")
    parser.add_argument("--shape", type=_shape, default=(8192, 4096, 4096),
                        help="M,K,N: tokens, in_features, out_features (default 8192,4096,4096: llama-7b q_proj)")
    parser.add_argument("--grads", type=_names(_GRADS), default=_GRADS,
                        help="gradients the backward computes (default dx,dA,dB; dA,dB for a first layer)")
    parser.add_argument("--kernels", type=_names(_KERNELS), default=None,
                        help=f"only these launches ({','.join(_KERNELS)}; default all)")
    parser.add_argument("--json", metavar="PATH", help="also write the reports as JSON to PATH (- for stdout)")
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1,
                        help="compiler worker processes (default: the number of cores)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tf32 and args.dtype != "fp32" and args.adapter_dtype != "fp32":
        parser.error(f"--tf32 applies to fp32 tiles (--dtype fp32 or --adapter-dtype fp32), got --dtype {args.dtype}")
    if args.adapter_dtype and args.dtype not in ("fp16", "bf16"):
        parser.error(f"--adapter-dtype fp32 applies to --dtype fp16 or bf16, got --dtype {args.dtype}")
    # Imported here: torch and Triton take seconds to import, and a bad option should not wait for them.
    from .compile import check_toolchain
    from .report import format_table, to_document
    from .sweep import Variant, run_sweep

    M, K, N = args.shape
    archs = list(ARCHS) if args.arch == "all" else [args.arch]
    variants = {arch: Variant(arch, args.dtype, args.rank, args.dropout, not args.no_bias, args.grads, args.tf32,
                              args.adapter_dtype, M, K, N, args.dora) for arch in archs}
    # The compiles run in worker processes (sweep.py): a compiler that aborts (an LLVM or ptxas crash) costs
    # the config it was compiling, which the table then names, instead of ending this command.
    try:
        for arch in archs:
            check_toolchain(arch)
        result = run_sweep(list(variants.values()), workers=args.jobs, kernels=args.kernels)
    except FileNotFoundError as error:  # a tool the wheel should ship is missing: name it, no traceback
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    runs = {arch: result.variant_reports(variant) for arch, variant in variants.items()}
    findings = {arch: result.findings[variant] for arch, variant in variants.items()}
    problem = dict(dtype=args.dtype, adapter_dtype=args.adapter_dtype, rank=args.rank, dropout=args.dropout,
                   bias=not args.no_bias, tf32=args.tf32, M=M, K=K, N=N, grads=list(args.grads),
                   dora=args.dora)
    document = to_document(runs, problem=problem, findings=findings)
    adapters = " (fp32 adapters)" if args.adapter_dtype else ""
    print(f"# triton {document['triton']}, torch {document['torch']}; {args.dtype}{adapters} r={args.rank} "
          f"dropout={args.dropout} bias={not args.no_bias} tf32={args.tf32} shape {M}x{K}->{N} "
          f"grads {','.join(args.grads)}" + (" DoRA" if args.dora else ""))
    print(format_table([report for reports in runs.values() for report in reports]))
    broken = [f"{arch}: {finding}" for arch in archs for finding in findings[arch]]
    print("\n" + ("\n".join(["rules broken:"] + broken) if broken else "every launch satisfies the rules"))
    if args.json == "-":
        json.dump(document, sys.stdout, indent=1)
        print()
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
            f.write("\n")
    return 1 if broken else 0
