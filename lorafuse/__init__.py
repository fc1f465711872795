"""lorafuse: a fused, Triton-accelerated LoRA linear layer for PyTorch."""

from . import reference
from .adapter_io import load_lora_state_dict, lora_state_dict, read_adapter_config
from .cli import add_lora_arguments
from .config import LoRAConfig
from .dora_layer import FusedDoRALinear
from .function import dora_linear, dropout_mask, lora_linear
from .layer import FusedLoRALinear, lora_scaling
from .model import LoRAModel, apply_lora, freeze_base, get_lora_model, lora_parameters, merge_and_unload
from .summary import count_parameters

__version__ = "0.1.0"

__all__ = [
    "FusedDoRALinear",
    "FusedLoRALinear",
    "LoRAConfig",
    "LoRAModel",
    "add_lora_arguments",
    "apply_lora",
    "count_parameters",
    "dora_linear",
    "dropout_mask",
    "freeze_base",
    "get_lora_model",
    "load_lora_state_dict",
    "lora_linear",
    "lora_parameters",
    "lora_scaling",
    "lora_state_dict",
    "merge_and_unload",
    "read_adapter_config",
    "reference",
]
