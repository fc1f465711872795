"""lorafuse: a fused, Triton-accelerated LoRA linear layer for PyTorch."""

from . import reference
from .cli import add_lora_arguments
from .config import LoRAConfig
from .function import LoRALinearFunction, dropout_mask, lora_linear
from .layer import FusedLoRALinear, lora_scaling

__version__ = "0.1.0"

__all__ = [
    "FusedLoRALinear",
    "LoRAConfig",
    "LoRALinearFunction",
    "add_lora_arguments",
    "dropout_mask",
    "lora_linear",
    "lora_scaling",
    "reference",
]
