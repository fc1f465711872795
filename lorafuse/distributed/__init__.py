"""lorafuse inside PyTorch's distributed engines: DDP, FSDP2 and tensor parallelism.

- DDP needs nothing from here: frozen base weights have no gradient, so DDP reduces the adapters only.
- FSDP2: `shard_lora_model(model, mesh)`.
- Saving and loading adapters of a sharded model: `save_adapter` / `load_adapter` (PEFT's files), or
  `gather_lora_state_dict` / `distribute_lora_state_dict` for the tensors themselves.
- Tensor parallelism: `ColwiseLoRAParallel` and `RowwiseLoRAParallel` for `parallelize_module`.

See docs/distributed.md. Importing this package imports torch.distributed.tensor; `import lorafuse` does not.
"""

from .fsdp import default_blocks, shard_lora_model
from .state_dict import distribute_lora_state_dict, gather_lora_state_dict, load_adapter, save_adapter
from .styles import ColwiseLoRAParallel, RowwiseLoRAParallel

__all__ = [
    "ColwiseLoRAParallel",
    "RowwiseLoRAParallel",
    "default_blocks",
    "distribute_lora_state_dict",
    "gather_lora_state_dict",
    "load_adapter",
    "save_adapter",
    "shard_lora_model",
]
