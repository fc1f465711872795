"""Triton kernels and their launchers for the fused LoRA linear layer (no autograd, no modules)."""

from .backward import backward_launches, lora_backward
from .common import is_interpreted
from .dora import dora_backward, dora_forward, dora_weight_norm, weight_norm_launch
from .dropout import dropout_mask
from .forward import _lora_forward_kernel, forward_launches, lora_forward
from .launches import Launch

#: True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 when first imported):
#: they then run on CPU tensors instead of CUDA ones.
INTERPRETED = is_interpreted(_lora_forward_kernel)

__all__ = ["INTERPRETED", "Launch", "backward_launches", "dora_backward", "dora_forward", "dora_weight_norm",
           "dropout_mask", "forward_launches", "lora_backward", "lora_forward", "weight_norm_launch"]
