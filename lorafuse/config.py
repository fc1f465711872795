"""`LoRAConfig`: which layers of a model get an adapter, with which rank and scaling, and what else trains."""

import dataclasses
from typing import Dict, Optional, Sequence, Tuple, Union

from .checks import check_dropout, check_positive_int, check_positive_number
from .patterns import check_pattern

#: `target_modules` shorthand for every linear layer except the output head (the name PEFT uses).
ALL_LINEAR = "all-linear"

#: Allowed values of `bias`: which biases train (and are saved with the adapter).
BIAS_MODES = ("none", "all", "lora_only")


def _names(field: str, value, *, allow_regex: bool) -> Union[None, str, Tuple[str, ...]]:
    """None, a regex string (when allowed) or a non-empty list of non-empty names, as a tuple."""
    if value is None:
        return None
    if isinstance(value, str):
        if not allow_regex:
            raise ValueError(f"{field} must be a list of module names, got the string {value!r} (write [{value!r}])")
        if not value:
            raise ValueError(f"{field} must not be an empty string")
        if value.lower() != ALL_LINEAR:
            check_pattern(value, field=field)
        return value
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise ValueError(f"{field} must be a list of module names{' or a regex string' if allow_regex else ''}, "
                         f"got {type(value).__name__} {value!r}")
    names = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    if not names:
        raise ValueError(f"{field} must not be empty (use None for the default)")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{field} must hold non-empty strings, got {name!r} in {value!r}")
    return tuple(names)


def _layer_indices(value) -> Union[None, Tuple[int, ...]]:
    if value is None:
        return None
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"layers_to_transform must be a non-negative int or a non-empty list of them, got {value!r}")
    for index in items:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"layers_to_transform must hold non-negative ints, got {index!r} in {value!r}")
    return tuple(items)


def _positive_number(field: str, value, *, integer: bool):
    return check_positive_int(field, value) if integer else check_positive_number(field, value)


def _pattern(field: str, value, *, integer: bool) -> Dict[str, Union[int, float]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a dict from module-name regex to value, got {type(value).__name__}")
    checked = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{field} keys must be non-empty strings, got {key!r}")
        check_pattern(key, field=f"{field} key")
        checked[key] = _positive_number(f"{field}[{key!r}]", item, integer=integer)
    return checked


def split_target_modules(values) -> list:
    """Module names from one or more arguments, each space- or comma-separated ("c_attn,attn.c_proj").
    ValueError when "all-linear" is given beside other names: half-applying it would be a guess."""
    if isinstance(values, str):
        values = [values]
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not names:
        raise ValueError("no module name given")
    if len(names) > 1 and any(name.lower() == ALL_LINEAR for name in names):
        raise ValueError(f"{ALL_LINEAR!r} stands for every linear layer and cannot be combined with other names, "
                         f"got {' '.join(names)!r}")
    return names


@dataclasses.dataclass(init=False)
class LoRAConfig:
    """What `apply_lora` / `get_lora_model` do to a model.

    r, lora_alpha, lora_dropout, use_rslora: the adapter of every targeted layer (scaling lora_alpha / r,
        or lora_alpha / sqrt(r) with rsLoRA).
    target_modules: a list of names, each matching a module whose dotted path equals it or ends with
        "." + it ("q_proj" matches "model.layers.0.self_attn.q_proj"; "attn.c_proj" only that one under
        "attn"); or a regex string matched against the whole path; or "all-linear" (every nn.Linear /
        Conv1D except the output head, skipping with a warning subclasses and weights that are not
        float16/bfloat16/float32/float64); or None for the attention projections of the first of these
        families all of whose names the model has: Llama / Qwen / Mistral: q_proj, k_proj, v_proj, o_proj;
        Phi-3: qkv_proj, o_proj; GPT-2: c_attn, attn.c_proj; Megatron: linear_qkv, linear_proj.
    exclude_modules: names (same matching) or a regex of modules never adapted.
    layers_to_transform: only modules inside these block indices (the first number in the path, e.g.
        the 3 of "model.layers.3.mlp.up_proj"); layers_pattern names the block list ("layers", "h") when
        the first number is not the block index.
    bias: "none", "all" (every bias in the model trains) or "lora_only" (biases of adapted layers).
    modules_to_save: names (same matching as target_modules) of modules that train fully and are
        saved with the adapter, e.g. a new classification head.
    rank_pattern, alpha_pattern: per-module r / lora_alpha; each key is a regex that must match the end
        of the module's path (PEFT's rule); the first matching key wins.
    use_dora: DoRA (weight-decomposed LoRA, PEFT's use_dora): every targeted layer becomes a FusedDoRALinear,
        which also trains a magnitude vector (out_features,), saved as PEFT saves it.
    adapter_dtype: the dtype of lora_A, lora_B (and the DoRA magnitude). "auto" (PEFT's default,
        autocast_adapter_dtype=True): float32 on float16/bfloat16 layers, the layer's dtype otherwise; "base": the
        layer's dtype; "float32".
        Not written to adapter_config.json (PEFT has no such field): the saved tensors carry their dtype.

    `from_adapter_file` is True for a config read from an adapter file (lorafuse.read_adapter_config,
    LoRAModel.from_pretrained). PEFT writes modules_to_save names that a model may lack (["classifier",
    "score"] for every sequence-classification adapter) and skips them, so such a config drops them with
    a warning and raises only when none matches; a config built by hand raises for any of them.
    """

    #: Where the config came from, not what it does: not fields, so not in to_dict() or ==.
    from_adapter_file = False
    #: The adapter_config.json it was read from, named in messages about its patterns and targets.
    source = None
    #: The base model that file records (PEFT's base_model_name_or_path); loading warns when the model differs.
    base_model_name_or_path = None

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Union[None, str, Tuple[str, ...]] = None
    exclude_modules: Union[None, str, Tuple[str, ...]] = None
    layers_to_transform: Optional[Tuple[int, ...]] = None
    layers_pattern: Optional[Tuple[str, ...]] = None
    use_rslora: bool = False
    bias: str = "none"
    modules_to_save: Optional[Tuple[str, ...]] = None
    rank_pattern: Dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    adapter_dtype: str = "auto"

    def __init__(self, *, r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 target_modules: Union[None, str, Sequence[str]] = None,
                 exclude_modules: Union[None, str, Sequence[str]] = None,
                 layers_to_transform: Union[None, int, Sequence[int]] = None,
                 layers_pattern: Union[None, str, Sequence[str]] = None,
                 use_rslora: bool = False, bias: str = "none", modules_to_save: Optional[Sequence[str]] = None,
                 rank_pattern: Optional[Dict[str, int]] = None, alpha_pattern: Optional[Dict[str, float]] = None,
                 use_dora: bool = False, adapter_dtype: str = "auto"):
        self.r = _positive_number("r", r, integer=True)
        self.lora_alpha = _positive_number("lora_alpha", lora_alpha, integer=False)
        check_dropout(lora_dropout)
        self.lora_dropout = float(lora_dropout)
        self.target_modules = _names("target_modules", target_modules, allow_regex=True)
        if isinstance(self.target_modules, str) and self.target_modules.lower() == ALL_LINEAR:
            self.target_modules = ALL_LINEAR
        self.exclude_modules = _names("exclude_modules", exclude_modules, allow_regex=True)
        if self.exclude_modules == ALL_LINEAR:
            raise ValueError(f"exclude_modules cannot be {ALL_LINEAR!r}: that would exclude every target")
        self.layers_to_transform = _layer_indices(layers_to_transform)
        if isinstance(layers_pattern, str):
            layers_pattern = [layers_pattern]
        self.layers_pattern = _names("layers_pattern", layers_pattern, allow_regex=False)
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError(f"layers_pattern={list(self.layers_pattern)!r} needs layers_to_transform")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"use_rslora must be True or False, got {use_rslora!r}")
        self.use_rslora = use_rslora
        if bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {', '.join(map(repr, BIAS_MODES))}, got {bias!r}")
        self.bias = bias
        self.modules_to_save = _names("modules_to_save", modules_to_save, allow_regex=False)
        self.rank_pattern = _pattern("rank_pattern", rank_pattern, integer=True)
        self.alpha_pattern = _pattern("alpha_pattern", alpha_pattern, integer=False)
        if not isinstance(use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got {use_dora!r}")
        self.use_dora = use_dora
        if adapter_dtype not in ("auto", "base", "float32"):
            # float16/bfloat16/float64 are valid only on a base of that dtype: say "base" for those.
            raise ValueError(f"adapter_dtype must be 'auto', 'base' or 'float32', got {adapter_dtype!r}")
        self.adapter_dtype = adapter_dtype

    def replace(self, **changes) -> "LoRAConfig":
        """A copy with `changes` applied (and validated); it keeps from_adapter_file."""
        copy = LoRAConfig(**{**self.to_dict(), **changes})
        copy.from_adapter_file = self.from_adapter_file
        copy.source = self.source
        copy.base_model_name_or_path = self.base_model_name_or_path
        return copy

    def to_dict(self) -> dict:
        """Plain JSON-ready values: tuples become lists."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            out[field.name] = list(value) if isinstance(value, tuple) else (dict(value) if isinstance(value, dict)
                                                                           else value)
        return out

    @classmethod
    def from_args(cls, args) -> "LoRAConfig":
        """The config an argparse namespace built by `lorafuse.add_lora_arguments` describes.

        A namespace without lora_use_dora or lora_adapter_dtype (built by hand) gets their defaults.
        --lora-target-modules takes names (space- or comma-separated) or "all-linear" alone; unset means the
        architecture's defaults (target_modules=None).
        """
        needed = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_use_rslora")
        missing = [name for name in needed if not hasattr(args, name)]
        if missing:
            raise TypeError(f"args lacks {', '.join(missing)}: build the parser with lorafuse.add_lora_arguments")
        targets = args.lora_target_modules
        if targets is not None:
            try:
                targets = split_target_modules(targets)
            except ValueError as err:
                raise ValueError(f"lora_target_modules: {err}") from None
            if len(targets) == 1 and targets[0].lower() == ALL_LINEAR:
                targets = ALL_LINEAR
        return cls(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                   target_modules=targets, use_rslora=args.lora_use_rslora,
                   use_dora=getattr(args, "lora_use_dora", False),
                   adapter_dtype=getattr(args, "lora_adapter_dtype", "auto"))
