"""Triton kernels and their launchers for the fused LoRA linear layer (no autograd, no modules)."""

from .backward import lora_backward
from .common import is_interpreted
from .dropout import dropout_mask
from .forward import _lora_forward_kernel, lora_forward

#: True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 when first imported):
#: they then run on CPU tensors instead of CUDA ones.
INTERPRETED = is_interpreted(_lora_forward_kernel)

__all__ = ["INTERPRETED", "dropout_mask", "lora_backward", "lora_forward"]
