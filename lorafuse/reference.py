"""The pure-PyTorch oracle: LoRA linear written plainly, differentiated by autograd.

Every kernel is tested against this. It takes the dropout keep-mask explicitly, so a test can feed
it the exact mask the kernels drew (`lorafuse.kernels.dropout_mask`).
"""

import torch.nn.functional as F

from .checks import check_lora_inputs


def lora_linear(x, weight, bias, lora_A, lora_B, *, scaling, keep_mask=None, dropout_p=0.0):
    """y = x @ W^T + b + scaling * ((x * keep_mask / (1 - dropout_p)) @ A^T) @ B^T.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None;
    lora_A: (r, in_features); lora_B: (out_features, r), in x's dtype or float32; keep_mask: bool, x's
    shape, or None for no dropout. Returns (..., out_features) in x's dtype.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    if keep_mask is None:
        dropped = x
    else:
        if tuple(keep_mask.shape) != tuple(x.shape):
            raise ValueError(f"keep_mask must have x's shape {tuple(x.shape)}, got {tuple(keep_mask.shape)}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
        dropped = x * keep_mask.to(x.dtype) / (1.0 - dropout_p)
    if lora_A.dtype == x.dtype:
        return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped, lora_A), lora_B)
    # fp32 adapters on a half-precision model, as PEFT computes them: the low-rank path in the adapters'
    # dtype, added to the base result, and the sum cast back to x's dtype.
    lora = F.linear(F.linear(dropped.to(lora_A.dtype), lora_A), lora_B) * scaling
    return (F.linear(x, weight, bias) + lora).to(x.dtype)
