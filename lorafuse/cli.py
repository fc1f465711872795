"""`add_lora_arguments`: the usual LoRA switches for a training script's argparse parser."""

import argparse

from .config import ALL_LINEAR
from .targeting import describe_default_targets


def add_lora_arguments(parser):
    """Add --use-lora, --lora-r, --lora-alpha, --lora-dropout, --lora-target-modules, --lora-use-rslora,
    --lora-save-path and --lora-load-path to `parser` (an ArgumentParser or argument group), in a
    "LoRA" group. Returns the group. Build the config with `LoRAConfig.from_args(args)`."""
    if isinstance(parser, argparse.ArgumentParser):
        group = parser.add_argument_group("LoRA", "low-rank adapters computed by lorafuse's fused kernels")
    elif isinstance(parser, argparse._ArgumentGroup):
        group = parser
    else:
        raise TypeError(f"parser must be an argparse.ArgumentParser or argument group, got {type(parser).__name__}")
    group.add_argument("--use-lora", action="store_true", help="train LoRA adapters instead of the full model")
    group.add_argument("--lora-r", type=int, default=8, help="adapter rank (default: 8)")
    group.add_argument("--lora-alpha", type=float, default=16.0,
                       help="scaling numerator: scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (default: 16)")
    group.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default: 0)")
    group.add_argument("--lora-target-modules", nargs="+", default=None, metavar="NAME",
                       help=f"module names to adapt (space- or comma-separated) or {ALL_LINEAR!r}; default: the "
                            "attention projections of the first family whose names the model has all of: "
                            f"{describe_default_targets()}")
    group.add_argument("--lora-use-rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    group.add_argument("--lora-save-path", default=None, metavar="DIR", help="directory to save the adapter in")
    group.add_argument("--lora-load-path", default=None, metavar="DIR", help="adapter directory to start from")
    return group
