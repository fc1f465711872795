"""Whether an adapter's tensors fit a model, checked before any layer is built for them.

`LoRAModel.from_pretrained` builds its layers from the file's config (r, rank_pattern), then copies the
file's tensors in. A config whose r disagrees with its tensors (r=10**8 beside a file of r=4) would first
allocate gigabytes of adapter and then fail without naming the file. So every tensor the config implies is
compared with the file first: its key, the shape the config and the target layer give, the shape the file has.
"""

import warnings
from typing import Dict, Tuple

import torch
import torch.nn as nn

from .adapter_io import MAGNITUDE, adapter_file_key, model_key
from .config import LoRAConfig
from .messages import listing
from .targeting import find_targets, is_conv1d, pattern_value


def _features(module: nn.Module) -> Tuple[int, int]:
    """(in_features, out_features) of a layer find_targets accepted: an nn.Linear or a Conv1D (weight (in, out))."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def expected_adapter_shapes(model: nn.Module, config: LoRAConfig) -> Dict[str, Tuple[int, int]]:
    """"<path>.lora_A" / "<path>.lora_B" (and "<path>.lora_magnitude_vector" with use_dora) -> shape, for every
    layer `config` would adapt in `model`."""
    with warnings.catch_warnings():
        # apply_lora gives the same warnings (unmatched names, skipped layers) when it runs next.
        warnings.simplefilter("ignore")
        targets = find_targets(model, config)
    shapes = {}
    for path in targets:
        in_features, out_features = _features(model.get_submodule(path))
        r = pattern_value(config.rank_pattern, path, config.r, source=config.source)
        shapes[f"{path}.lora_A"] = (r, in_features)
        shapes[f"{path}.lora_B"] = (out_features, r)
        if config.use_dora:
            shapes[f"{path}.{MAGNITUDE}"] = (out_features,)
    return shapes


def check_adapter_fits(model: nn.Module, config: LoRAConfig, state_dict: Dict[str, torch.Tensor], *,
                       source: str) -> None:
    """ValueError naming `source` (the weights file) when a lora_A / lora_B (or DoRA magnitude) that `config`
    implies for `model` is missing from `state_dict` or has another shape; the message gives each key, the shape
    expected (from r / rank_pattern and the layer's features) and the shape in the file. Other keys are left to
    the loader."""
    incoming = {model_key(key): (key, value) for key, value in state_dict.items()}
    missing, wrong = [], []
    for name, shape in expected_adapter_shapes(model, config).items():
        if name not in incoming:
            missing.append(adapter_file_key(name))
            continue
        key, value = incoming[name]
        if tuple(value.shape) != shape:
            wrong.append(f"{key}: expected {shape}, file has {tuple(value.shape)}")
    problems = []
    if wrong:
        problems.append("shapes differ from those r / rank_pattern and the layers' features give: "
                        + listing(wrong, separator="; "))
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if problems:
        raise ValueError(f"{source} does not fit {type(model).__name__} as its adapter_config.json describes "
                         f"(checked before building any layer): {'; '.join(problems)}")
