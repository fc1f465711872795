"""The PyTorch path: the launchers' semantics in plain torch, for devices the kernels do not serve.

Used on CPU without TRITON_INTERPRET=1, where Triton is absent (macOS, Windows), and for devices
other than CUDA. Like the kernels it saves no mask: the mask is drawn again from the seed, and it is the
kernels' mask to the bit (`dropout_rng`), so a seed drops the same elements on every path.
"""

import torch

from .checks import accumulator_dtype, check_dropout, check_lora_inputs, seed_tensor
from .dropout_rng import keep_mask


def dropout_mask(seed, shape, p, device) -> torch.Tensor:
    """Bool keep-mask of `shape` (leading dims flattened as the kernels do): the kernels' mask for `seed`."""
    check_dropout(p, name="p")
    shape = tuple(shape)
    if len(shape) == 0:
        raise ValueError("shape must have at least one dimension, got ()")
    seed_value = int(seed_tensor(seed, "cpu").item())
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return keep_mask(seed_value, rows, shape[-1], p, device).reshape(shape)


def _dropped(x, dropout_p, seed):
    if dropout_p == 0.0:
        return x
    keep = dropout_mask(seed, x.shape, dropout_p, x.device)
    return x * keep.to(x.dtype) / (1.0 - dropout_p)


def lora_forward(x, weight, bias, lora_A, lora_B, *, scaling, dropout_p, seed):
    """Same contract as `lorafuse.kernels.lora_forward`: returns y (M, N) and xa (M, r)."""
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    xa = _dropped(x, dropout_p, seed).to(lora_A.dtype) @ lora_A.t()
    y = torch.nn.functional.linear(x, weight, bias)
    if lora_A.dtype == x.dtype:
        return y.add_(xa @ lora_B.t(), alpha=scaling), xa
    # fp32 adapters: the sum in fp32, rounded once to x's dtype.
    return (y.to(lora_A.dtype) + (xa @ lora_B.t()) * scaling).to(x.dtype), xa


def lora_backward(dy, x, weight, lora_A, lora_B, xa, *, scaling, dropout_p, seed,
                  needs_dx=True, needs_dA=True, needs_dB=True):
    """Same contract as `lorafuse.kernels.lora_backward`: returns (dx, dA, dB), None where not needed."""
    return _backward(dy, dy.to(lora_A.dtype), x, weight, lora_A, lora_B, xa, scaling=scaling, dropout_p=dropout_p,
                     seed=seed, needs_dx=needs_dx, needs_dA=needs_dA, needs_dB=needs_dB)


def _backward(dy, dy_adapter, x, weight, lora_A, lora_B, xa, *, scaling, dropout_p, seed, needs_dx, needs_dA,
              needs_dB):
    """The LoRA chain rule given dy twice: in x's dtype for dy @ W, in the adapters' dtype for the rest."""
    adapter_dtype = lora_A.dtype
    dxa = (dy_adapter @ lora_B) * scaling
    dB = (dy_adapter.t() @ xa) * scaling if needs_dB else None
    dx = dA = None
    if needs_dx or needs_dA:
        keep_scaled = _dropped(torch.ones_like(x, dtype=adapter_dtype), dropout_p, seed)
        if needs_dA:
            dA = dxa.t() @ (x.to(adapter_dtype) * keep_scaled)
        if needs_dx:
            dx = (dy @ weight).to(adapter_dtype) + (dxa @ lora_A) * keep_scaled
            dx = dx.to(x.dtype)
    return dx, dA, dB


# ---- DoRA ----------------------------------------------------------------------------------------------------

def dora_weight_norm(weight, lora_A, lora_B, *, scaling):
    """Same contract as `lorafuse.kernels.dora_weight_norm`: ||W + s B A|| per row, fp32 (fp64 for fp64)."""
    compute = accumulator_dtype(weight.dtype)
    merged = weight.to(compute) + scaling * (lora_B.to(compute) @ lora_A.to(compute))
    return torch.linalg.vector_norm(merged, dim=1)


def dora_forward(x, weight, bias, lora_A, lora_B, column_scale, *, scaling, dropout_p, seed):
    """Same contract as `lorafuse.kernels.dora_forward`: y = g * (x W^T + s xa B^T) + b and xa."""
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    compute = column_scale.dtype
    xa = _dropped(x, dropout_p, seed).to(lora_A.dtype) @ lora_A.t()
    y = (x @ weight.t()).to(compute) + (xa @ lora_B.t()).to(compute) * scaling
    y = y * column_scale
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype), xa


def dora_backward(dy, x, weight, bias, lora_A, lora_B, column_scale, magnitude, xa, y, *, scaling, dropout_p, seed,
                  needs_dx=True, needs_dA=True, needs_dB=True, needs_dm=True):
    """Same contract as `lorafuse.kernels.dora_backward`: returns (dx, dA, dB, dm), None where not needed."""
    compute = column_scale.dtype
    dm = None
    if needs_dm:
        unbiased = y.to(compute) - (bias.to(compute) if bias is not None else 0.0)
        dm = ((dy.to(compute) * unbiased).sum(0) / magnitude.to(compute)).to(magnitude.dtype)
    # y = g * (...) + b: the LoRA chain rule with g * dy in place of dy (rounded once to each operand's dtype).
    scaled_dy = dy.to(compute) * column_scale
    dx, dA, dB = _backward(scaled_dy.to(dy.dtype), scaled_dy.to(lora_A.dtype), x, weight, lora_A, lora_B, xa,
                           scaling=scaling, dropout_p=dropout_p, seed=seed, needs_dx=needs_dx, needs_dA=needs_dA,
                           needs_dB=needs_dB)
    return dx, dA, dB, dm
