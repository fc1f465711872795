"""lorafuse inside PyTorch's distributed engines: DDP, FSDP2 and tensor parallelism.

- DDP needs nothing from here: frozen base weights have no gradient, so DDP reduces the adapters only.
- FSDP2: `shard_lora_model(model, mesh)`; `gather_lora_state_dict` / `load_lora_state_dict` move the
  adapter between a sharded model and a file.
- Tensor parallelism: `ColwiseLoRAParallel` and `RowwiseLoRAParallel` for `parallelize_module`.

See docs/distributed.md. Importing this package imports torch.distributed.tensor; `import lorafuse` does not.
"""

from .fsdp import default_blocks, shard_lora_model
from .state_dict import adapter_parameters, gather_lora_state_dict, load_lora_state_dict
from .styles import ColwiseLoRAParallel, RowwiseLoRAParallel

__all__ = [
    "ColwiseLoRAParallel",
    "RowwiseLoRAParallel",
    "adapter_parameters",
    "default_blocks",
    "gather_lora_state_dict",
    "load_lora_state_dict",
    "shard_lora_model",
]
