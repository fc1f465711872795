"""Which modules of a model a `LoRAConfig` selects: name matching, architecture defaults, block indices.

The matching rules are PEFT's (a name matches a path equal to it or ending in "." + it; a regex must
match the whole path; rank/alpha pattern keys match the end of the path), so a config means the same
module set in lorafuse and in PEFT.
"""

import re
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch.nn as nn

from .config import ALL_LINEAR, LoRAConfig
from .layer import FusedLoRALinear

#: Default targets per architecture family, recognised by the layer names a model has. Order matters:
#: the first family with a name present wins.
DEFAULT_TARGETS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Llama / Qwen / Mistral", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("GPT-2", ("c_attn", "c_proj")),
    ("Megatron", ("linear_qkv", "linear_proj")),
)

#: Names of output heads that "all-linear" leaves alone when the model cannot name its own head
#: (transformers models can, through get_output_embeddings()).
HEAD_NAMES = ("lm_head", "output_layer", "output", "score", "classifier")


def is_conv1d(module: nn.Module) -> bool:
    """A transformers GPT-2 style Conv1D: weight (in_features, out_features), attribute nf."""
    # Duck-typed so that transformers is never imported just to answer "no".
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def unsupported_reason(module: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """None when `module` can become a FusedLoRALinear, else why not."""
    if isinstance(module, FusedLoRALinear):
        return "it already is a FusedLoRALinear (lorafuse keeps one adapter per layer)"
    if isinstance(parent, nn.MultiheadAttention):
        # MultiheadAttention reads out_proj.weight directly and never calls its forward.
        return "nn.MultiheadAttention reads its out_proj weight directly, so an adapter there would be ignored"
    if isinstance(module, nn.Linear) or is_conv1d(module):
        if not module.weight.dtype.is_floating_point:
            return f"its weight has dtype {module.weight.dtype} (quantized layers are not supported)"
        return None
    return "lorafuse adapts nn.Linear and transformers' Conv1D layers only"


def _parent(model: nn.Module, name: str) -> Optional[nn.Module]:
    return model.get_submodule(name.rpartition(".")[0]) if name else None


def adaptable_names(model: nn.Module) -> List[str]:
    """Paths of the modules that could take an adapter, in model order."""
    return [name for name, module in model.named_modules()
            if name and unsupported_reason(module, _parent(model, name)) is None]


def matches_names(names: Union[str, Sequence[str]], path: str) -> bool:
    """PEFT's rule: a regex string must match the whole path; a list entry must equal the path or
    end it after a dot."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == name or path.endswith("." + name) for name in names)


def layer_index(path: str, layers_pattern: Optional[Sequence[str]] = None) -> Optional[int]:
    """The block index in `path`: the first number that follows a named segment ("model.layers.3.mlp"
    → 3), or the number after one of `layers_pattern` ("h" in "transformer.h.3.attn")."""
    # Lazy prefixes pick the first index, not a nested one such as an MoE expert's.
    patterns = [re.escape(p) for p in layers_pattern] if layers_pattern else [r"[^.]+"]
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> List[str]:
    """Paths of the output head(s) that "all-linear" skips."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, nn.Module):
        return [name for name, module in model.named_modules() if module is head]
    return [name for name, _ in model.named_modules() if name.rpartition(".")[2] in HEAD_NAMES]


def default_target_modules(model: nn.Module) -> Tuple[str, ...]:
    """The targets of the first family in DEFAULT_TARGETS whose names the model's layers use."""
    leaves = {name.rpartition(".")[2] for name in adaptable_names(model)}
    for _family, names in DEFAULT_TARGETS:
        present = tuple(name for name in names if name in leaves)
        if present:
            return present
    raise ValueError(f"target_modules=None, but lorafuse knows no default for {type(model).__name__}: "
                     f"set target_modules to some of its linear layer names {_describe(leaves)}, "
                     f"or to {ALL_LINEAR!r}")


def _describe(names: Iterable[str]) -> str:
    names = sorted(set(names))
    return "[" + ", ".join(names) + "]" if names else "(the model has no nn.Linear or Conv1D layers)"


def _in_layers(config: LoRAConfig, path: str) -> bool:
    if config.layers_to_transform is None:
        return True
    return layer_index(path, config.layers_pattern) in config.layers_to_transform


def _matches_modules_to_save(config: LoRAConfig, path: str) -> bool:
    # A module and everything inside it: a module that trains fully needs no adapter.
    if not config.modules_to_save:
        return False
    return any(re.match(rf"(?:^|.*\.){re.escape(name)}(?:$|\.)", path) for name in config.modules_to_save)


def find_targets(model: nn.Module, config: LoRAConfig) -> List[str]:
    """Paths of the modules `config` adapts, in model order.

    Raises ValueError when nothing matches (naming the linear layers the model has) and TypeError when a
    matched module cannot take an adapter. With a list, names that match nothing give a warning.
    """
    targets = config.target_modules
    heads = set()
    if targets is None:
        targets = default_target_modules(model)
    elif targets == ALL_LINEAR:
        heads = set(output_head_names(model))
    selected, unmatched = [], set(targets) if isinstance(targets, tuple) else set()
    for path, module in model.named_modules():
        if not path:
            continue
        reason = unsupported_reason(module, _parent(model, path))
        if targets == ALL_LINEAR:
            if path in heads or reason is not None:
                continue
        elif not matches_names(targets, path):
            continue
        unmatched -= {name for name in unmatched if matches_names((name,), path)}
        if config.exclude_modules is not None and matches_names(config.exclude_modules, path):
            continue
        if _matches_modules_to_save(config, path) or not _in_layers(config, path):
            continue
        if reason is not None:
            raise TypeError(f"target_modules={_show(config.target_modules)} matched {path!r}, a "
                            f"{type(module).__name__}, which cannot take an adapter: {reason}")
        selected.append(path)
    if not selected:
        raise ValueError(f"target_modules={_show(config.target_modules)} matched no adaptable module "
                         f"(after exclude_modules, layers_to_transform and modules_to_save); the model's "
                         f"linear layer names are {_describe(n.rpartition('.')[2] for n in adaptable_names(model))}")
    if unmatched:
        warnings.warn(f"target_modules entries {sorted(unmatched)} match no module of {type(model).__name__}",
                      stacklevel=3)
    return selected


def find_modules_to_save(model: nn.Module, config: LoRAConfig) -> List[str]:
    """Paths of the outermost modules named by `config.modules_to_save`; ValueError when a name matches none."""
    if not config.modules_to_save:
        return []
    found = []
    for name in config.modules_to_save:
        paths = [path for path, _ in model.named_modules() if path and matches_names((name,), path)]
        if not paths:
            raise ValueError(f"modules_to_save entry {name!r} matches no module of {type(model).__name__}; "
                             f"its top-level modules are {_describe(n for n, _ in model.named_children())}")
        found.extend(paths)
    # Drop modules nested in another selected one: their parameters are already covered.
    found = sorted(set(found))
    return [path for path in found if not any(path.startswith(other + ".") for other in found)]


def pattern_value(patterns: Dict[str, Union[int, float]], path: str, default):
    """The value of the first key of `patterns` that matches the end of `path` (PEFT's rank_pattern rule)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _show(targets) -> str:
    return repr(list(targets)) if isinstance(targets, tuple) else repr(targets)


def lora_layers(model: nn.Module) -> List[Tuple[str, FusedLoRALinear]]:
    """(path, layer) of every FusedLoRALinear in `model`, in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, FusedLoRALinear)]


def extra_trainable_parameters(model: nn.Module, config: LoRAConfig) -> Dict[str, nn.Parameter]:
    """Parameters besides lora_A / lora_B that `config` trains and saves: biases ("all" or "lora_only")
    and every parameter of modules_to_save, by path."""
    selected = {}
    if config.bias == "all":
        selected.update((name, p) for name, p in model.named_parameters() if name.rpartition(".")[2] == "bias")
    elif config.bias == "lora_only":
        selected.update((f"{path}.bias", layer.bias) for path, layer in lora_layers(model) if layer.bias is not None)
    for path in find_modules_to_save(model, config):
        selected.update((f"{path}.{name}", p) for name, p in model.get_submodule(path).named_parameters())
    return selected
