"""The pure-PyTorch oracle: LoRA and DoRA linear written plainly, differentiated by autograd.

Every kernel is tested against this. It takes the dropout keep-mask explicitly, so a test can feed
it the exact mask the kernels drew (`lorafuse.kernels.dropout_mask`).
"""

import torch
import torch.nn.functional as F

from .checks import accumulator_dtype, check_lora_inputs


def _dropped(x, keep_mask, dropout_p):
    """x * keep_mask / (1 - dropout_p), or x when keep_mask is None."""
    if keep_mask is None:
        return x
    if tuple(keep_mask.shape) != tuple(x.shape):
        raise ValueError(f"keep_mask must have x's shape {tuple(x.shape)}, got {tuple(keep_mask.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return x * keep_mask.to(x.dtype) / (1.0 - dropout_p)


def lora_linear(x, weight, bias, lora_A, lora_B, *, scaling, keep_mask=None, dropout_p=0.0):
    """y = x @ W^T + b + scaling * ((x * keep_mask / (1 - dropout_p)) @ A^T) @ B^T.

    x: (..., in_features); weight: (out_features, in_features); bias: (out_features,) or None;
    lora_A: (r, in_features); lora_B: (out_features, r), in x's dtype or float32; keep_mask: bool, x's
    shape, or None for no dropout. Returns (..., out_features) in x's dtype.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    dropped = _dropped(x, keep_mask, dropout_p)
    if lora_A.dtype == x.dtype:
        return F.linear(x, weight, bias) + scaling * F.linear(F.linear(dropped, lora_A), lora_B)
    # fp32 adapters on a half-precision model, as PEFT computes them: the low-rank path in the adapters'
    # dtype, added to the base result, and the sum cast back to x's dtype.
    lora = F.linear(F.linear(dropped.to(lora_A.dtype), lora_A), lora_B) * scaling
    return (F.linear(x, weight, bias) + lora).to(x.dtype)


def dora_weight_norm(weight, lora_A, lora_B, *, scaling):
    """||W + scaling * B @ A|| per output row, (out_features,), in fp32 (fp64 for fp64 weights)."""
    compute = accumulator_dtype(weight.dtype)
    merged = weight.to(compute) + scaling * (lora_B.to(compute) @ lora_A.to(compute))
    return torch.linalg.vector_norm(merged, dim=1)


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, *, scaling, keep_mask=None, dropout_p=0.0):
    """DoRA (Liu et al., 2024): y = g * (x @ W^T + scaling * (dropout(x) @ A^T) @ B^T) + b, g = m / ||W + s B A||.

    magnitude: (out_features,), the adapters' dtype. The norm is detached (the DoRA paper's section 4.3, as
    PEFT does): no gradient flows through it. Dropout applies to the low-rank path only; the base product sees
    x. PEFT's training forward with dropout > 0 also rescales W @ dropout(x) (a second product over W), so
    with dropout the two differ in training; without dropout, and in eval, they are the same function.
    Returns (..., out_features) in x's dtype.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"magnitude must have shape ({weight.shape[0]},), got {tuple(magnitude.shape)}")
    dropped = _dropped(x, keep_mask, dropout_p)
    norm = dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling=scaling)
    column_scale = magnitude / norm
    lora = F.linear(F.linear(dropped.to(lora_A.dtype), lora_A), lora_B) * scaling
    # PEFT's arithmetic (DoraLinearLayer): the base layer's result with its bias, the bias taken off again,
    # and result + (g - 1) * base + g * lora; in exact arithmetic g * (x @ W^T + lora) + b.
    result = F.linear(x, weight, bias)
    base = result - bias if bias is not None else result
    return (result + (column_scale - 1) * base + column_scale * lora).to(x.dtype)
