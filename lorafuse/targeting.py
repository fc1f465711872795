"""Which modules of a model a `LoRAConfig` selects: name matching, architecture defaults, block indices.

The matching rules are PEFT's (a name matches a path equal to it or ending in "." + it; a regex must
match the whole path; rank/alpha pattern keys match the end of the path), so a config means the same
module set in lorafuse and in PEFT.
"""

import re
import sys
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .config import ALL_LINEAR, LoRAConfig
from .layer import FusedLoRALinear
from .messages import listing
from .patterns import full_match, suffix_match

#: Default targets per architecture family: its attention projections, recognised by the layer names a
#: model has. A family is chosen only when every one of its names matches a linear layer (a model with
#: q_proj and v_proj alone is no Llama); the first such family wins. LoRAConfig's docstring and
#: add_lora_arguments' help list the same.
DEFAULT_TARGETS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Llama / Qwen / Mistral", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("Phi-3", ("qkv_proj", "o_proj")),
    # "attn.c_proj": GPT-2's MLP has a c_proj too.
    ("GPT-2", ("c_attn", "attn.c_proj")),
    ("Megatron", ("linear_qkv", "linear_proj")),
)

#: Names under which a model's output head is one of its direct children, for models that cannot name
#: their head themselves (transformers models can, through get_output_embeddings()). Only top-level
#: children count: inside a block, "output" or "classifier" is an ordinary projection.
HEAD_NAMES = ("lm_head", "output", "score", "classifier", "head")


#: Weight dtypes the fused kernels compute in. Anything else (fp8, the int8/uint8 storage of quantized
#: layers) would be run by F.linear in a dtype it was never meant for, or not at all.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _transformers_conv1d() -> Optional[type]:
    # Looked up, never imported: a model holding a Conv1D has imported transformers already, and a model
    # that has not cannot hold one.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(pytorch_utils, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Exactly transformers' Conv1D (GPT-2's layer, weight (in_features, out_features)); not a subclass."""
    conv1d = _transformers_conv1d()
    return conv1d is not None and type(module) is conv1d


def is_linear_like(module: nn.Module) -> bool:
    """An nn.Linear or transformers Conv1D, or a subclass of either: what "all-linear" looks at."""
    conv1d = _transformers_conv1d()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def unsupported_reason(module: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """None when `module` can become a FusedLoRALinear, else why not."""
    if isinstance(module, FusedLoRALinear):
        return "it already is a FusedLoRALinear (lorafuse keeps one adapter per layer)"
    if isinstance(parent, nn.MultiheadAttention):
        # MultiheadAttention reads out_proj.weight directly and never calls its forward.
        return "nn.MultiheadAttention reads its out_proj weight directly, so an adapter there would be ignored"
    if type(module) is not nn.Linear and not is_conv1d(module):
        if is_linear_like(module):
            # A subclass (a quantized or parallel linear, a custom forward) has a forward, hooks and attributes
            # of its own that a FusedLoRALinear would drop without a word.
            base = "nn.Linear" if isinstance(module, nn.Linear) else "Conv1D"
            return (f"it subclasses {base}, and replacing it would lose its own forward and attributes; lorafuse "
                    "adapts exactly nn.Linear and transformers' Conv1D")
        return "lorafuse adapts nn.Linear and transformers' Conv1D layers only"
    if module.weight.dtype not in SUPPORTED_DTYPES:
        return (f"its weight has dtype {module.weight.dtype}; lorafuse adapts float16, bfloat16, float32 and "
                "float64 weights")
    return None


def _skipped_label(path: str, module: nn.Module) -> str:
    weight = getattr(module, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else None
    detail = f", {dtype}" if dtype is not None and dtype not in SUPPORTED_DTYPES else ""
    return f"{path!r} ({type(module).__name__}{detail})"


def _parent(model: nn.Module, name: str) -> Optional[nn.Module]:
    return model.get_submodule(name.rpartition(".")[0]) if name else None


def adaptable_names(model: nn.Module) -> List[str]:
    """Paths of the modules that could take an adapter, in model order."""
    return [name for name, module in model.named_modules()
            if name and unsupported_reason(module, _parent(model, name)) is None]


def matches_names(names: Union[str, Sequence[str]], path: str, *, field: str = "target_modules",
                  source: Optional[str] = None) -> bool:
    """PEFT's rule: a regex string must match the whole path (within patterns.MATCH_SECONDS; `field` and
    `source` name it in the error); a list entry must equal the path or end it after a dot."""
    if isinstance(names, str):
        return full_match(names, path, field=field, source=source)
    return any(path == name or path.endswith("." + name) for name in names)


def layer_index(path: str, layers_pattern: Optional[Sequence[str]] = None) -> Optional[int]:
    """The block index in `path`: the first number that follows a named segment ("model.layers.3.mlp"
    → 3), or the number after one of `layers_pattern` ("h" in "transformer.h.3.attn")."""
    # Lazy prefixes pick the first index, not a nested one such as an MoE expert's. Plain `re` is safe here:
    # the names are escaped, so no pattern from a file reaches it (those go through patterns.py).
    patterns = [re.escape(p) for p in layers_pattern] if layers_pattern else [r"[^.]+"]
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> List[str]:
    """Paths of the output head(s) that "all-linear" skips.

    A transformers model names its LM head through get_output_embeddings(); when it has none (a base model,
    a classifier) only a top-level linear child named in HEAD_NAMES (LlamaForSequenceClassification's
    score) is a head. A model without get_output_embeddings: such a child, else its last linear layer in
    module order (Megatron's output_layer, a custom model's decoder).
    """
    named = [name for name, child in model.named_children() if name in HEAD_NAMES and is_linear_like(child)]
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        head = get_head()
        if isinstance(head, nn.Module):
            return [name for name, module in model.named_modules() if module is head]
        return named
    if named:
        return named
    linears = [name for name, module in model.named_modules() if name and is_linear_like(module)]
    return linears[-1:]


def default_target_modules(model: nn.Module) -> Tuple[str, ...]:
    """The targets of the first family in DEFAULT_TARGETS all of whose names match the model's linear layers."""
    # Linear-like, not only adaptable: a family of quantized layers is still recognised, and find_targets
    # then says why they cannot take an adapter.
    linear = [name for name, module in model.named_modules() if name and is_linear_like(module)]
    for _family, names in DEFAULT_TARGETS:
        if all(any(matches_names((name,), path) for path in linear) for name in names):
            return names
    raise ValueError(f"target_modules=None, but lorafuse knows no default for {type(model).__name__}: "
                     f"set target_modules to some of its linear layer names "
                     f"{_describe(n.rpartition('.')[2] for n in linear)}, or to {ALL_LINEAR!r}")


def describe_default_targets() -> str:
    """DEFAULT_TARGETS in words: "Llama / Qwen / Mistral: q_proj, k_proj, v_proj, o_proj; Phi-3: ..."."""
    return "; ".join(f"{family}: {', '.join(names)}" for family, names in DEFAULT_TARGETS)


def _describe(names: Iterable[str]) -> str:
    names = sorted(set(names))
    return "[" + listing(names) + "]" if names else "(the model has no nn.Linear or Conv1D layers)"


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
    matched module cannot take an adapter (not exactly nn.Linear or transformers' Conv1D, or a weight dtype
    other than float16/bfloat16/float32/float64). "all-linear" skips such layers with a warning listing
    them. With a list, names that match nothing give a warning.
    """
    targets = config.target_modules
    heads = set()
    if targets is None:
        targets = default_target_modules(model)
    elif targets == ALL_LINEAR:
        heads = set(output_head_names(model))
    selected, skipped, unmatched = [], [], set(targets) if isinstance(targets, tuple) else set()
    for path, module in model.named_modules():
        if not path:
            continue
        if targets == ALL_LINEAR:
            if path in heads or not is_linear_like(module):
                continue
        elif not matches_names(targets, path, source=config.source):
            continue
        unmatched -= {name for name in unmatched if matches_names((name,), path)}
        if config.exclude_modules is not None and matches_names(config.exclude_modules, path, field="exclude_modules",
                                                                source=config.source):
            continue
        if _matches_modules_to_save(config, path) or not _in_layers(config, path):
            continue
        reason = unsupported_reason(module, _parent(model, path))
        if reason is not None and targets == ALL_LINEAR:
            skipped.append(_skipped_label(path, module))
            continue
        if reason is not None:
            raise TypeError(f"target_modules={_show(config)} matched {path!r}, a "
                            f"{type(module).__name__}, which cannot take an adapter: {reason}")
        selected.append(path)
    if skipped:
        warnings.warn(f"{ALL_LINEAR} skipped {len(skipped)} linear layers that are not exactly nn.Linear or "
                      f"transformers' Conv1D with a float16/bfloat16/float32/float64 weight: {listing(skipped)}",
                      stacklevel=3)
    if not selected:
        raise ValueError(f"target_modules={_show(config)} matched no adaptable module "
                         f"(after exclude_modules, layers_to_transform and modules_to_save); the model's "
                         f"linear layer names are {_describe(n.rpartition('.')[2] for n in adaptable_names(model))}")
    if unmatched:
        warnings.warn(f"target_modules entries [{listing(map(repr, sorted(unmatched)))}] match no module of "
                      f"{type(model).__name__}", stacklevel=3)
    return selected


def find_modules_to_save(model: nn.Module, config: LoRAConfig, *, warn: bool = False) -> List[str]:
    """Paths of the outermost modules named by `config.modules_to_save`.

    ValueError when a name matches no module; for a config read from an adapter file (from_adapter_file),
    only when no name matches: PEFT writes names a model may lack and skips them, and so does this, with a
    warning when `warn` (apply_lora asks once).
    """
    if not config.modules_to_save:
        return []
    found, unmatched = [], []
    for name in config.modules_to_save:
        paths = [path for path, _ in model.named_modules() if path and matches_names((name,), path)]
        if not paths and name not in unmatched:
            unmatched.append(name)
        found.extend(paths)
    top_level = _describe(n for n, _ in model.named_children())
    unmatched_names = "[" + listing(map(repr, unmatched)) + "]"
    if unmatched and not config.from_adapter_file:
        raise ValueError(f"modules_to_save entry {unmatched[0]!r} matches no module of {type(model).__name__}; "
                         f"its top-level modules are {top_level}")
    if unmatched and not found:
        raise ValueError(f"none of the adapter file's modules_to_save entries {unmatched_names} matches "
                         f"a module of {type(model).__name__}; its top-level modules are {top_level}")
    if unmatched and warn:
        warnings.warn(f"modules_to_save entries {unmatched_names} of the adapter file match no module of "
                      f"{type(model).__name__} and are ignored, as PEFT ignores them (a sequence-classification "
                      "adapter names both 'classifier' and 'score')", stacklevel=3)
    # Drop modules nested in another selected one: their parameters are already covered.
    found = sorted(set(found))
    return [path for path in found if not any(path.startswith(other + ".") for other in found)]


def pattern_value(patterns: Dict[str, Union[int, float]], path: str, default, *, field: str = "rank_pattern",
                  source: Optional[str] = None):
    """The value of the first key of `patterns` that matches the end of `path` (PEFT's rank_pattern rule),
    each matched within patterns.MATCH_SECONDS (`field` and `source` name it in the error)."""
    for key, value in patterns.items():
        if suffix_match(key, path, field=f"{field} key", source=source):
            return value
    return default


def _show(config: LoRAConfig) -> str:
    """target_modules as a message shows it (capped: it may come from any file), and the file it came from."""
    targets = config.target_modules
    shown = "[" + listing(map(repr, targets)) + "]" if isinstance(targets, tuple) else repr(targets)[:200]
    return shown + (f" (from {config.source})" if config.source else "")


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
