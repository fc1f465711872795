"""`shard_lora_model`: FSDP2 (`fully_shard`) over a model with frozen base weights and LoRA adapters.

FSDP2 keeps frozen and trainable parameters in one group: the frozen base weights are all-gathered
for forward and backward like any other, and only parameters that receive a gradient (the adapters,
and biases or heads that train) are reduce-scattered. Nothing here is LoRA-specific beyond choosing
the units; the point is that a lorafuse model needs no special FSDP handling.
"""

from typing import Iterable, Optional

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..layer import FusedLoRALinear


def _has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, FusedLoRALinear) for m in module.modules())


def default_blocks(model: nn.Module) -> list:
    """The repeated blocks of a transformer: members of an nn.ModuleList that hold a FusedLoRALinear
    (`model.layers[i]` in Llama, `transformer.h[i]` in GPT-2), outermost lists only."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and not any(module in b.modules() for b in blocks):
            blocks.extend(child for child in module if _has_lora(child))
    return blocks


def shard_lora_model(model: nn.Module, mesh: DeviceMesh, *, blocks: Optional[Iterable[nn.Module]] = None,
                     mp_policy: Optional[MixedPrecisionPolicy] = None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 to a model adapted with lorafuse: each block becomes its own unit, then the root.

    mesh: a 1-D data-parallel DeviceMesh (for FSDP2 + TP, mesh["dp"] after the TP styles are applied).
    blocks: the modules to shard as separate units (each all-gathered just before it runs); default
    `default_blocks(model)`, the members of the model's nn.ModuleLists that hold adapters.
    mp_policy, reshard_after_forward: passed to `torch.distributed.fsdp.fully_shard`.
    Returns `model`, now an FSDPModule whose parameters are sharded DTensors.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh (torch.distributed.device_mesh.init_device_mesh), "
                        f"got {type(mesh).__name__}")
    if not _has_lora(model):
        raise ValueError(f"{type(model).__name__} has no FusedLoRALinear layer: apply LoRA before sharding")
    blocks = default_blocks(model) if blocks is None else list(blocks)
    inside = {id(m) for m in model.modules()}
    for block in blocks:
        if not isinstance(block, nn.Module) or id(block) not in inside or block is model:
            raise ValueError(f"blocks must be submodules of the model (not the model itself), got "
                             f"{type(block).__name__}")
    options = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model
