"""Adapter weights of a distributed model: gathered whole for saving, loaded back into the shards.

Works the same for a plain model, DDP (its "module." prefix is dropped), FSDP2 and tensor-parallel
DTensor parameters, so the dict has the keys of the single-device model. Only the adapters move: the
frozen base weights are never gathered.
"""

from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ..layer import FusedLoRALinear

_ADAPTER_PARAMS = ("lora_A", "lora_B")


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP wraps the model in .module; torch.compile in ._orig_mod. FSDP2 changes no names.
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def adapter_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """lora_A / lora_B of every FusedLoRALinear, by their names in the unwrapped model."""
    model = _unwrap(model)
    params = {}
    for prefix, module in model.named_modules():
        if isinstance(module, FusedLoRALinear):
            for name in _ADAPTER_PARAMS:
                params[f"{prefix}.{name}" if prefix else name] = getattr(module, name)
    if not params:
        raise ValueError(f"{type(model).__name__} has no FusedLoRALinear layer, so no adapter to save or load")
    return params


def gather_lora_state_dict(model: nn.Module, *, device="cpu") -> Dict[str, torch.Tensor]:
    """Full adapter tensors, on every rank, copied to `device`.

    A collective when parameters are DTensors (FSDP2 or tensor parallel): every rank must call it.
    """
    state = {}
    for name, param in adapter_parameters(model).items():
        tensor = param.full_tensor() if isinstance(param, DTensor) else param
        state[name] = tensor.detach().to(device, copy=True)
    return state


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], *,
                         strict: bool = True) -> Tuple[list, list]:
    """Copy full adapter tensors (as `gather_lora_state_dict` returns them) into the model's parameters;
    a sharded parameter takes only its own shard, with no communication. Every rank passes the full dict.

    Returns (missing_keys, unexpected_keys); with strict=True either raises a KeyError.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    params = adapter_parameters(model)
    missing = sorted(params.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - params.keys())
    if strict and (missing or unexpected):
        raise KeyError(f"adapter state dict does not match the model: missing {_short(missing)}, "
                       f"unexpected {_short(unexpected)}")
    for name, param in params.items():
        if name not in state_dict:
            continue
        full = state_dict[name]
        if not isinstance(full, torch.Tensor) or tuple(full.shape) != tuple(param.shape):
            shape = tuple(full.shape) if isinstance(full, torch.Tensor) else type(full).__name__
            raise ValueError(f"{name}: the state dict holds {shape}, the model's parameter is {tuple(param.shape)}")
        full = full.to(device=param.device, dtype=param.dtype)
        if isinstance(param, DTensor):
            # src_data_rank=None: each rank cuts its own shard from the full tensor it already has.
            shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.copy_(full)
    return missing, unexpected


def _short(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
    return f"[{shown}]" if keys else "none"
