"""Adapters on disk in PEFT's layout: state dicts, adapter_config.json, safetensors, atomic writes.

A directory holds `adapter_config.json` and `adapter_model.safetensors`, exactly as PEFT's
`save_pretrained` writes them, so either library loads the other's adapters. Keys are
`base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, and for DoRA
`base_model.model.<module path>.lora_magnitude_vector` (no ".weight"); a trained bias of an adapted layer
is `<path>.base_layer.bias` (PEFT keeps the wrapped layer as `base_layer`); other saved parameters
(bias="all", modules_to_save) keep their own path. Nothing is ever read with pickle.
"""

import hashlib
import json
import os
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from .atomic_files import atomic_write, remove_stale_temp_files
from .config import LoRAConfig
from .dora_layer import FusedDoRALinear
from .layer import lora_scaling
from .messages import listing
from .peft_fields import check_peft_fields
from .targeting import extra_trainable_parameters, find_modules_to_save, lora_layers, pattern_value

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: PEFT's files name parameters relative to PeftModel, whose `base_model.model` is the user's model.
PEFT_PREFIX = "base_model.model."
#: Metadata key of a weights file lorafuse writes: the sha256 of the adapter_config.json written with it.
CONFIG_SHA256_KEY = "lorafuse_config_sha256"
#: DoRA's trained magnitude, by the name PEFT gives it in files.
MAGNITUDE = "lora_magnitude_vector"
#: What PEFT's file keys add after the name of each adapter tensor: lora_A / lora_B are nn.Linear modules in
#: PEFT, hence ".weight"; the DoRA magnitude is held by a module too, but PEFT saves it without ".weight" to keep
#: its older files loadable (peft 0.21.2: LoraModel._get_adapter_state_dict strips it, and loading adds it back).
FILE_KEY_SUFFIX = {"lora_A": ".weight", "lora_B": ".weight", MAGNITUDE: ""}


class LoadResult(NamedTuple):
    """Keys of a state dict that the model lacked (unexpected) or that it did not provide (missing)."""

    missing_keys: List[str]
    unexpected_keys: List[str]


def adapter_tensors(layer: nn.Module) -> Dict[str, nn.Parameter]:
    """Name -> parameter for the trained parameters of one adapted layer (its adapter_parameters(): lora_A,
    lora_B and, in a FusedDoRALinear, lora_magnitude_vector)."""
    adapter = {id(param) for param in layer.adapter_parameters()}
    return {name: param for name, param in layer.named_parameters(recurse=False) if id(param) in adapter}


def _saved_parameters(model: nn.Module, config: Optional[LoRAConfig]) -> Dict[str, nn.Parameter]:
    """Parameter path in the model -> parameter, for every tensor an adapter holds."""
    params = {}
    for path, layer in lora_layers(model):
        params.update((f"{path}.{name}", param) for name, param in adapter_tensors(layer).items())
    if config is not None:
        params.update(extra_trainable_parameters(model, config))
    return params


def adapter_file_key(name: str) -> str:
    """The file key of the adapter tensor at model path `name` ("<layer path>.lora_A", "....lora_magnitude_vector")."""
    path, _, leaf = name.rpartition(".")
    return f"{PEFT_PREFIX}{path}.{leaf}{FILE_KEY_SUFFIX[leaf]}"


def _file_key(name: str, lora_paths: set) -> str:
    path, _, leaf = name.rpartition(".")
    if path in lora_paths:
        return adapter_file_key(name) if leaf in FILE_KEY_SUFFIX else f"{PEFT_PREFIX}{path}.base_layer.{leaf}"
    return PEFT_PREFIX + name


def model_key(key: str) -> str:
    """The model parameter path a file key names (the inverse of _file_key, prefix optional)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX):]
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(suffix):
            return key[: -len(".weight")]
    return key.replace(".base_layer.", ".")


def check_dora_keys(model: nn.Module, names) -> None:
    """ValueError when the adapter tensors at model paths `names` are of the other kind than the layers they are
    for: a DoRA magnitude for a plain LoRA layer, or lora_A / lora_B without a magnitude for a DoRA layer. Either
    would load as something else than was trained (the magnitude dropped, or one left at its first value), so it
    is refused whatever `strict` says."""
    names = set(names)
    wrong = []
    for path, layer in lora_layers(model):
        has_magnitude = f"{path}.{MAGNITUDE}" in names
        has_low_rank = f"{path}.lora_A" in names or f"{path}.lora_B" in names
        if isinstance(layer, FusedDoRALinear) and has_low_rank and not has_magnitude:
            wrong.append(f"{path} is a DoRA layer, but the adapter has no {MAGNITUDE} for it (a plain LoRA adapter?)")
        elif not isinstance(layer, FusedDoRALinear) and has_magnitude:
            wrong.append(f"{path} is a plain LoRA layer, but the adapter has a DoRA {MAGNITUDE} for it")
    if wrong:
        raise ValueError(f"adapter and model disagree on DoRA: {listing(wrong, separator='; ')}. Build the model "
                         "with the adapter's own config (LoRAModel.from_pretrained), or with LoRAConfig(use_dora=...) "
                         "as the adapter was trained")


def lora_state_dict(model: nn.Module, *, config: Optional[LoRAConfig] = None) -> Dict[str, torch.Tensor]:
    """The adapter's tensors (detached, sharing storage with the model) under PEFT's file keys.

    Holds lora_A / lora_B of every FusedLoRALinear (and lora_magnitude_vector of a FusedDoRALinear); with
    `config`, also the biases and modules_to_save parameters it trains.
    """
    lora_paths = {path for path, _ in lora_layers(model)}
    return {_file_key(name, lora_paths): p.detach() for name, p in _saved_parameters(model, config).items()}


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, strict: bool = True,
                         config: Optional[LoRAConfig] = None) -> LoadResult:
    """Copy an adapter state dict (lorafuse's or PEFT's keys, with or without "base_model.model.") into
    `model`'s FusedLoRALinear layers (and, with `config`, its trained biases and modules_to_save).

    Shape mismatches, parameters on the meta device and DoRA tensors for plain LoRA layers (or plain LoRA tensors
    for DoRA layers, `check_dora_keys`) always raise ValueError, as do missing or unexpected keys when `strict`;
    nothing is copied unless every check passes. Merged layers are unmerged for the copy and merged again.
    """
    check_tensor_dict(state_dict)
    expected = _saved_parameters(model, config)
    incoming = {}
    for key, value in state_dict.items():
        name = model_key(key)
        if name in incoming:
            raise ValueError(f"state_dict has two keys for {name!r}: {incoming[name][0]!r} and {key!r}")
        incoming[name] = (key, value)
    check_dora_keys(model, incoming)
    lora_paths = {path for path, _ in lora_layers(model)}
    missing = [_file_key(name, lora_paths) for name in expected if name not in incoming]
    unexpected = [key for name, (key, _) in incoming.items() if name not in expected]
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"missing keys: {listing(sorted(missing))}")
        if unexpected:
            problems.append(f"unexpected keys: {listing(sorted(unexpected))}")
        raise ValueError(f"adapter state dict does not fit the model ({len(expected)} adapter tensors): "
                         + "; ".join(problems))
    mismatched = [f"{key}: file {tuple(value.shape)}, model {tuple(expected[name].shape)}"
                  for name, (key, value) in incoming.items()
                  if name in expected and value.shape != expected[name].shape]
    if mismatched:
        raise ValueError("adapter shapes do not match the model (a different r or base model?): "
                         + listing(mismatched, separator="; "))
    check_not_on_meta({name: expected[name] for name in incoming if name in expected})
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    for name, (_, value) in incoming.items():
        if name in expected:
            expected[name].copy_(value)
    for layer in merged:
        layer.merge()
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)


def _base_model_name(model: nn.Module) -> Optional[str]:
    for owner in (getattr(model, "config", None), model):
        name = getattr(owner, "_name_or_path", None) or getattr(owner, "name_or_path", None)
        if isinstance(name, str) and name:
            return name
    return None


def _same_base_model(recorded: str, actual: str) -> bool:
    """Whether two names of a base model agree: equal, or one a path ending in the other (a local copy of a
    hub model: "/models/org/model-a" and "org/model-a")."""
    recorded, actual = (name.replace("\\", "/").rstrip("/") for name in (recorded, actual))
    return recorded == actual or recorded.endswith("/" + actual) or actual.endswith("/" + recorded)


def warn_if_other_base_model(model: nn.Module, file_config: LoRAConfig) -> None:
    """Warn when the adapter file records a base model (base_model_name_or_path) and `model` names another:
    the tensors load, but an adapter only means something on the weights it was trained on."""
    recorded, actual = file_config.base_model_name_or_path, _base_model_name(model)
    if recorded and actual and not _same_base_model(recorded, actual):
        warnings.warn(f"{file_config.source} records base model {recorded!r}, but the model it is loaded into is "
                      f"{actual!r}: an adapter trained on other base weights gives meaningless outputs",
                      stacklevel=3)


def adapter_config_dict(model: nn.Module, config: LoRAConfig) -> dict:
    """The adapter_config.json content for `model` adapted by `config`, with the fields PEFT reads.

    target_modules and modules_to_save are written as the full paths lorafuse resolved, so PEFT adapts
    exactly the same modules whatever rule (defaults, regex, all-linear, layer indices) picked them.
    """
    layers = lora_layers(model)
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": _base_model_name(model),
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": [path for path, _ in layers],
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "use_rslora": config.use_rslora,
        "use_dora": _uses_dora(layers),
        "bias": config.bias,
        "modules_to_save": find_modules_to_save(model, config) or None,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in layers),
        "init_lora_weights": True,
        "inference_mode": True,
    }


def _uses_dora(layers) -> bool:
    """Whether the adapted layers are DoRA layers; PEFT's use_dora holds for all of them, so a mix cannot be saved."""
    dora = [path for path, layer in layers if isinstance(layer, FusedDoRALinear)]
    if dora and len(dora) < len(layers):
        plain = [path for path, layer in layers if not isinstance(layer, FusedDoRALinear)]
        raise ValueError(f"the model mixes DoRA layers ({listing(dora)}) with plain LoRA layers ({listing(plain)}); "
                         "PEFT's adapter_config.json has one use_dora for all of them, so this adapter cannot be saved")
    return bool(dora)


def config_from_adapter_dict(data: dict, *, source: str = "adapter config") -> LoRAConfig:
    """The LoRAConfig an adapter_config.json (lorafuse's or PEFT's) describes, with from_adapter_file set."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
    if data.get("peft_type") != "LORA":
        raise ValueError(f"{source} has peft_type={data.get('peft_type')!r}; lorafuse loads LoRA adapters "
                         "(peft_type 'LORA') only")
    check_peft_fields(data, source=source)
    if "r" not in data:
        raise ValueError(f"{source} has no 'r'")
    # PEFT treats an empty list as "no layer restriction"; 0 alone is block 0, so test for [] explicitly.
    layers = data.get("layers_to_transform")
    layers = None if layers == [] else layers
    layers_pattern = (data.get("layers_pattern") or None) if layers is not None else None
    try:
        config = LoRAConfig(
            r=data["r"], lora_alpha=data.get("lora_alpha", 8), lora_dropout=data.get("lora_dropout", 0.0),
            target_modules=data.get("target_modules"), exclude_modules=data.get("exclude_modules"),
            layers_to_transform=layers, layers_pattern=layers_pattern,
            use_rslora=data.get("use_rslora", False), bias=data.get("bias", "none"),
            modules_to_save=data.get("modules_to_save"), rank_pattern=data.get("rank_pattern"),
            alpha_pattern=data.get("alpha_pattern"),
            use_dora=False if data.get("use_dora") is None else data["use_dora"])
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    # modules_to_save names the model lacks are dropped, as PEFT does (LoRAConfig.from_adapter_file).
    config.from_adapter_file = True
    config.source = source
    recorded = data.get("base_model_name_or_path")
    config.base_model_name_or_path = recorded if isinstance(recorded, str) and recorded else None
    return config


def _adapter_file(path, name: str) -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter directory {path!r} does not exist")
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        hint = ""
        if name == ADAPTER_WEIGHTS and os.path.isfile(os.path.join(path, "adapter_model.bin")):
            hint = (" (it has adapter_model.bin, a pickle file, which lorafuse does not load: re-save it with "
                    "PEFT's save_pretrained(..., safe_serialization=True))")
        adapters = _adapter_subfolders(path) if name == ADAPTER_CONFIG else []
        if adapters:
            # PEFT saves every adapter but "default" in a subfolder named after it.
            hint = (f"; it holds adapters in the subfolders {listing(adapters)}: pass one of those directories "
                    f"(e.g. {os.path.join(path, adapters[0])!r})")
        raise FileNotFoundError(f"{path!r} has no {name}{hint}")
    return file


def _adapter_subfolders(path: str) -> List[str]:
    """Names of the direct subfolders of `path` that hold an adapter_config.json, sorted."""
    with os.scandir(path) as entries:
        return sorted(entry.name for entry in entries
                      if entry.is_dir() and os.path.isfile(os.path.join(entry.path, ADAPTER_CONFIG)))


def _read_config_file(path) -> Tuple[LoRAConfig, bytes, str]:
    """(config, the file's bytes, its path) of `path`/adapter_config.json."""
    file = _adapter_file(path, ADAPTER_CONFIG)
    with open(file, "rb") as f:
        content = f.read()
    try:
        data = json.loads(content.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    return config_from_adapter_dict(data, source=file), content, file


def check_tensor_dict(state_dict, *, source: str = "state_dict") -> None:
    """A state dict to load must be a dict whose every value is a floating-point tensor: nothing else is
    unpickled or guessed, and an integer or bool tensor would be cast into the float parameters without a word.
    `source` names the dict (a weights file) in the TypeError."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"{source} must be a dict of tensors, got {type(state_dict).__name__}")
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}[{key!r}] must be a tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{source}[{key!r}] has dtype {value.dtype}; adapter tensors must be floating point "
                            "(float16, bfloat16, float32 or float64), not cast from integers, bools or complex numbers")


def check_not_on_meta(targets: Dict[str, torch.Tensor]) -> None:
    """A copy into a meta tensor succeeds and stores nothing: refuse to load into one, naming it."""
    on_meta = [name for name, tensor in targets.items() if tensor.is_meta]
    if on_meta:
        raise ValueError(f"{listing(sorted(on_meta))} {'is' if len(on_meta) == 1 else 'are'} on the meta device (the "
                         "model was built without memory), so loading would store nothing: materialize the model "
                         "first, e.g. model.to_empty(device=...), then load the adapter")


def _read_weights_file(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], str]:
    """(tensors on CPU, the header's metadata, the file's path) of `path`/adapter_model.safetensors."""
    file = _adapter_file(path, ADAPTER_WEIGHTS)
    with open(file, "rb") as f:
        data = f.read()
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{file} is not a readable safetensors file ({len(data)} bytes): {err}") from None
    # The format: an 8-byte little-endian header length, then the JSON header (valid: load() parsed it).
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    check_tensor_dict(tensors, source=file)
    return tensors, header.get("__metadata__") or {}, file


def read_adapter_config(path) -> LoRAConfig:
    """The LoRAConfig of the adapter saved in directory `path`."""
    return _read_config_file(path)[0]


def read_adapter_weights(path) -> Dict[str, torch.Tensor]:
    """The tensors of `path`/adapter_model.safetensors, on CPU."""
    return _read_weights_file(path)[0]


def read_adapter(path) -> Tuple[LoRAConfig, Dict[str, torch.Tensor]]:
    """The config and tensors of the adapter in directory `path`, checked to belong together.

    Two files cannot be renamed as one: a save interrupted between them leaves new weights beside the old
    config. lorafuse's weights record the sha256 of the config written with them (CONFIG_SHA256_KEY), and a
    config with another hash is refused with ValueError. Files without the record (PEFT's) load as they are.
    """
    config, config_bytes, config_file = _read_config_file(path)
    tensors, metadata, weights_file = _read_weights_file(path)
    recorded = metadata.get(CONFIG_SHA256_KEY)
    if recorded is not None and recorded != hashlib.sha256(config_bytes).hexdigest():
        raise ValueError(f"{weights_file} and {config_file} do not belong together: the weights were saved with "
                         "another adapter_config.json (a save interrupted between the two files, or a config edited "
                         "or copied in afterwards); save the adapter again")
    return config, tensors


def save_adapter(model: nn.Module, path, *, config: LoRAConfig) -> None:
    """Write the adapter of `model` (adapted by `config`) to directory `path` in PEFT's layout.

    The weights file is written first, then the config, each atomically: no file is ever half-written, and
    a save cut off between the two is refused on loading (`read_adapter`).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    if not lora_layers(model):
        raise ValueError(f"{type(model).__name__} has no FusedLoRALinear layers: nothing to save")
    write_adapter_files(path, lora_state_dict(model, config=config), adapter_config_dict(model, config))


def write_adapter_files(path, state_dict: dict, config_dict: dict) -> None:
    """Write `state_dict` and `config_dict` into directory `path` as PEFT's two adapter files.

    The weights file is written first, then the config, each atomically (`atomic_files.atomic_write`). The weights'
    metadata holds the sha256 of the config text, so that `read_adapter` can tell when a save was cut off
    between the two.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    remove_stale_temp_files(path)  # left by saves killed before their rename
    config_bytes = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode("utf-8")
    # Copies on CPU: safetensors refuses tensors that share storage (tied modules_to_save weights).
    tensors = {key: value.to("cpu", copy=True).contiguous() for key, value in state_dict.items()}
    metadata = {"format": "pt", CONFIG_SHA256_KEY: hashlib.sha256(config_bytes).hexdigest()}
    weights = safetensors.torch.save(tensors, metadata=metadata)
    atomic_write(os.path.join(path, ADAPTER_WEIGHTS), lambda f: f.write(weights))
    atomic_write(os.path.join(path, ADAPTER_CONFIG), lambda f: f.write(config_bytes))


def check_adapter_scaling(model: nn.Module, file_config: LoRAConfig, source: str) -> None:
    """Refuse an adapter trained with another scaling than the model's layers use: its weights would load
    without error and give other outputs."""
    wrong = []
    for path, layer in lora_layers(model):
        r = pattern_value(file_config.rank_pattern, path, file_config.r, source=source)
        alpha = pattern_value(file_config.alpha_pattern, path, file_config.lora_alpha, field="alpha_pattern",
                              source=source)
        scaling = lora_scaling(r, alpha, file_config.use_rslora)
        if r == layer.r and abs(scaling - layer.scaling) > 1e-6 * abs(layer.scaling):
            wrong.append(f"{path}: adapter scaling {scaling:g} (lora_alpha={alpha:g}, use_rslora="
                         f"{file_config.use_rslora}), model {layer.scaling:g} (lora_alpha={layer.lora_alpha:g}, "
                         f"use_rslora={layer.use_rslora})")
    if wrong:
        raise ValueError(f"{source} was trained with another scaling; build the model from the adapter's own "
                         f"config (LoRAModel.from_pretrained) instead: {listing(wrong, separator='; ')}")


def check_adapter_dora(model: nn.Module, file_config: LoRAConfig, source: str) -> None:
    """Refuse a DoRA adapter (use_dora true in its config) for a model with plain LoRA layers, and the reverse:
    loading one as the other would drop the trained magnitude, or keep one the adapter never trained."""
    layers = lora_layers(model)
    plain = [path for path, layer in layers if not isinstance(layer, FusedDoRALinear)]
    if file_config.use_dora and plain:
        raise ValueError(f"{source} is a DoRA adapter (use_dora=true), but the model's layers {listing(plain)} are "
                         "plain LoRA: build the model with LoRAConfig(use_dora=True), or from the adapter's own "
                         "config (LoRAModel.from_pretrained)")
    if not file_config.use_dora and len(plain) < len(layers):
        dora = [path for path, layer in layers if isinstance(layer, FusedDoRALinear)]
        raise ValueError(f"{source} is a plain LoRA adapter (use_dora false or absent), but the model's layers "
                         f"{listing(dora)} are DoRA layers: build the model with LoRAConfig(use_dora=False), or from "
                         "the adapter's own config (LoRAModel.from_pretrained)")


def load_adapter(model: nn.Module, path, *, config: LoRAConfig) -> None:
    """Load the adapter in directory `path` (written by lorafuse or PEFT) into `model` adapted by `config`.

    Raises ValueError for files that do not belong together (`read_adapter`), listing missing or unexpected
    keys, shape mismatches, or layers whose scaling differs from the adapter's, and for a DoRA adapter loaded
    into plain LoRA layers or the reverse; FileNotFoundError when a file is absent.
    """
    file_config, state_dict = read_adapter(path)
    load_adapter_state(model, file_config, state_dict, config=config)


def load_adapter_state(model: nn.Module, file_config: LoRAConfig, state_dict: Dict[str, torch.Tensor], *,
                       config: LoRAConfig) -> None:
    """What load_adapter does once `read_adapter` has given the file's config and tensors; errors about the
    tensors name the weights file."""
    warn_if_other_base_model(model, file_config)
    check_adapter_dora(model, file_config, file_config.source)
    check_adapter_scaling(model, file_config, file_config.source)
    try:
        load_lora_state_dict(model, state_dict, strict=True, config=config)
    except ValueError as err:
        weights_file = os.path.join(os.path.dirname(file_config.source), ADAPTER_WEIGHTS)
        raise ValueError(f"{weights_file}: {err}") from None
