"""Adapters of a distributed model: gathered whole for saving, distributed back into the shards on loading.

The keys are those `lorafuse.lora_state_dict` gives for the same model on one device (PEFT's file keys,
"base_model.model.<path>.lora_A.weight"), whether the model is plain, wrapped in DDP (its "module."
prefix is dropped), torch.compile'd, a LoRAModel, sharded by FSDP2 or tensor-parallel. Only the adapter
moves: the frozen base weights are never gathered.
"""

import os
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .. import adapter_io
from ..adapter_io import ADAPTER_CONFIG, PEFT_PREFIX, LoadResult, lora_state_dict
from ..config import LoRAConfig
from ..messages import listing
from ..model import LoRAModel
from ..targeting import lora_layers


def unwrap(model: nn.Module) -> nn.Module:
    """The model whose parameter paths an adapter file uses: without DDP's `.module`, torch.compile's
    `._orig_mod` or LoRAModel's `.base_model` (FSDP2 and tensor parallelism rename nothing)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(model, LoRAModel):
            model = model.base_model
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _targets(model: nn.Module, config: Optional[LoRAConfig]) -> Dict[str, torch.Tensor]:
    if config is not None and not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig or None, got {type(config).__name__}")
    model = unwrap(model)
    if not lora_layers(model):
        raise ValueError(f"{type(model).__name__} has no FusedLoRALinear layer, so no adapter to gather or load")
    # Detached views that share storage with the parameters (DTensors where the model is sharded).
    return lora_state_dict(model, config=config)


def gather_lora_state_dict(model: nn.Module, *, config: Optional[LoRAConfig] = None,
                           device="cpu") -> Dict[str, torch.Tensor]:
    """The adapter as full tensors on `device`, on every rank, under `lorafuse.lora_state_dict`'s keys.

    With `config`, also the biases and modules_to_save it trains. A collective when parameters are
    DTensors (FSDP2 or tensor parallel): every rank must call it.
    """
    state = {}
    for key, tensor in _targets(model, config).items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        state[key] = tensor.to(device, copy=True)
    return state


@torch.no_grad()
def distribute_lora_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], *, strict: bool = True,
                               config: Optional[LoRAConfig] = None) -> LoadResult:
    """Copy full adapter tensors (keys as `gather_lora_state_dict` gives them, "base_model.model." optional)
    into the model; a sharded parameter takes its own shard, cut locally with no communication, so every
    rank passes the whole dict.

    Returns (missing_keys, unexpected_keys). strict=True raises KeyError for either; a shape mismatch, or DoRA
    tensors for plain LoRA layers and the reverse (`lorafuse.adapter_io.check_dora_keys`), always raise
    ValueError; nothing is copied unless every check passes.
    """
    adapter_io.check_tensor_dict(state_dict)
    targets = _targets(model, config)
    incoming = {key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key: value for key, value in state_dict.items()}
    adapter_io.check_dora_keys(unwrap(model), [adapter_io.model_key(key) for key in incoming])
    missing = sorted(targets.keys() - incoming.keys())
    unexpected = sorted(incoming.keys() - targets.keys())
    if strict and (missing or unexpected):
        raise KeyError(f"adapter state dict does not fit the model: missing keys: {listing(missing)}; "
                       f"unexpected keys: {listing(unexpected)}")
    shared = [key for key in targets if key in incoming]
    wrong = [f"{key}: given {tuple(incoming[key].shape)}, model {tuple(targets[key].shape)}"
             for key in shared if incoming[key].shape != targets[key].shape]
    if wrong:
        raise ValueError("adapter shapes do not match the model (another r or base model?): "
                         + listing(wrong, separator="; "))
    adapter_io.check_not_on_meta({key: targets[key] for key in shared})
    for key in shared:
        target = targets[key]
        full = incoming[key].to(device=target.device, dtype=target.dtype)
        if isinstance(target, DTensor):
            # src_data_rank=None: each rank cuts its own shard from the full tensor it holds.
            shard = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
            target.to_local().copy_(shard.to_local())
        else:
            target.copy_(full)
    return LoadResult(missing_keys=missing, unexpected_keys=unexpected)


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save_adapter(model: nn.Module, path, *, config: LoRAConfig) -> None:
    """`lorafuse.adapter_io.save_adapter` for a distributed model: every rank calls it (the adapter is
    gathered), global rank 0 writes adapter_model.safetensors and adapter_config.json into `path` (PEFT's
    layout), and all ranks return once the files are there."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    state = gather_lora_state_dict(model, config=config)
    if _is_writer():
        # The single-device writer: PEFT's files, each written atomically.
        adapter_io.write_adapter_files(path, state, adapter_io.adapter_config_dict(unwrap(model), config))
    if dist.is_initialized():
        dist.barrier()


def load_adapter(model: nn.Module, path, *, config: LoRAConfig) -> None:
    """`lorafuse.adapter_io.load_adapter` for a distributed model: every rank reads the files in `path`
    and keeps its own shards. Raises as the single-device loader does (files that do not belong together,
    keys, shapes, scaling)."""
    file_config, state_dict = adapter_io.read_adapter(path)  # also refuses files that do not belong together
    adapter_io.warn_if_other_base_model(unwrap(model), file_config)
    adapter_io.check_adapter_dora(unwrap(model), file_config, os.path.join(os.fspath(path), ADAPTER_CONFIG))
    adapter_io.check_adapter_scaling(unwrap(model), file_config, os.path.join(os.fspath(path), ADAPTER_CONFIG))
    distribute_lora_state_dict(model, state_dict, strict=True, config=config)

