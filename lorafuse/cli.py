"""`add_lora_arguments`: the usual LoRA switches for a training script's argparse parser.

Besides lorafuse's own spellings it takes those of the training frameworks lorafuse is dropped into, so their
command lines run unchanged: slime's `--lora-only-trainable`, and InfiniTrain's underscored flags, where
`--lora_rank N` both turns LoRA on and sets its rank (`--lora_rank 0`, InfiniTrain's default, turns it off).
"""

import argparse

from .argtypes import dropout_probability, non_negative_int, positive_float, positive_int
from .config import ALL_LINEAR, split_target_modules
from .targeting import describe_default_targets


class _TargetModules(argparse.Action):
    """Stores the names as a list; a bad combination is the parser's error, naming the flag."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, split_target_modules(values))
        except ValueError as err:
            raise argparse.ArgumentError(self, str(err)) from None


class _InfiniTrainRank(argparse.Action):
    """InfiniTrain's `--lora_rank N`: N > 0 turns LoRA on with rank N; 0 (its default) turns it off."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.use_lora = value > 0
        if value > 0:
            namespace.lora_r = value


def add_lora_arguments(parser):
    """Add --use-lora, --lora-r, --lora-alpha, --lora-dropout, --lora-target-modules, --lora-use-rslora,
    --lora-use-dora, --lora-adapter-dtype, --lora-save-path, --lora-load-path and --lora-only-trainable to `parser`
    (an ArgumentParser or argument group), in a "LoRA" group, with InfiniTrain's spellings as aliases: --lora_rank
    (see the module docstring), --lora_alpha, --lora_target_modules, --lora_save_path, --lora_load_path. Values are
    checked by the parser (a rank of 0, a dropout outside [0, 1), a non-finite alpha exit with status 2, naming the
    flag). Returns the group. Build the config with `LoRAConfig.from_args(args)`."""
    if isinstance(parser, argparse.ArgumentParser):
        group = parser.add_argument_group("LoRA", "low-rank adapters computed by lorafuse's fused kernels")
    elif isinstance(parser, argparse._ArgumentGroup):
        group = parser
    else:
        raise TypeError(f"parser must be an argparse.ArgumentParser or argument group, got {type(parser).__name__}")
    group.add_argument("--use-lora", action="store_true", help="train LoRA adapters instead of the full model")
    group.add_argument("--lora-r", type=positive_int, default=8, metavar="R", help="adapter rank (default: 8)")
    group.add_argument("--lora_rank", type=non_negative_int, action=_InfiniTrainRank, default=argparse.SUPPRESS,
                       metavar="N", help="InfiniTrain's spelling: --use-lora --lora-r N when N > 0; 0 turns LoRA off")
    group.add_argument("--lora-alpha", "--lora_alpha", type=positive_float, default=16.0, metavar="ALPHA",
                       help="scaling numerator: scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (default: 16)")
    group.add_argument("--lora-dropout", type=dropout_probability, default=0.0, metavar="P",
                       help="dropout on the adapter input, in [0, 1) (default: 0)")
    group.add_argument("--lora-target-modules", "--lora_target_modules", nargs="+", action=_TargetModules,
                       default=None, metavar="NAME",
                       help=f"module names to adapt (space- or comma-separated) or {ALL_LINEAR!r} alone; default: "
                            "the attention projections of the first family whose names the model has all of: "
                            f"{describe_default_targets()}")
    group.add_argument("--lora-use-rslora", action="store_true", help="rank-stabilised scaling alpha / sqrt(r)")
    group.add_argument("--lora-use-dora", action="store_true",
                       help="DoRA: also train a magnitude per output feature (PEFT's use_dora)")
    group.add_argument("--lora-adapter-dtype", choices=("auto", "base", "float32"), default="auto",
                       help="dtype of lora_A / lora_B: auto (PEFT's default) is float32 on float16/bfloat16 "
                            "layers and the layer's dtype otherwise; base is always the layer's")
    group.add_argument("--lora-save-path", "--lora_save_path", default=None, metavar="DIR",
                       help="directory to save the adapter in")
    group.add_argument("--lora-load-path", "--lora_load_path", default=None, metavar="DIR",
                       help="adapter directory to start from")
    group.add_argument("--lora-only-trainable", action="store_true",
                       help="slime's flag: train the adapters only. A config from these flags always does: the "
                            "base weights, biases and heads stay frozen")
    return group
