"""DoRA as `torch.library` custom ops: `lorafuse::dora_weight_norm`, `dora_forward` and `dora_backward`.

The same arrangement as ops.py for LoRA: opaque to torch.compile, the backend picked at run time, the chain
rule written out in `_backward`. The weight norm is its own op, computed without a gradient and passed to
`dora_forward` as an input: the norm is a constant to the backward (the DoRA paper's section 4.3, as PEFT
treats it), and a gradcheck can hold it fixed.
"""

from typing import Optional

import torch
from torch import Tensor

from .checks import accumulator_dtype
from .dispatch import select_backend


@torch.library.custom_op("lorafuse::dora_weight_norm", mutates_args=())
def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, *, scaling: float) -> Tensor:
    """||W + scaling * B @ A|| per output row: (N,) in fp32 (fp64 for fp64 weights); B @ A is never formed
    on the kernel path."""
    return select_backend(weight).dora_weight_norm(weight, lora_A, lora_B, scaling=scaling).contiguous()


@dora_weight_norm.register_fake
def _dora_weight_norm_fake(weight, lora_A, lora_B, *, scaling):
    return weight.new_empty((weight.shape[0],), dtype=accumulator_dtype(weight.dtype))


@torch.library.custom_op("lorafuse::dora_forward", mutates_args=())
def dora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                 weight_norm: Tensor, seed: Tensor, *, scaling: float, dropout_p: float) -> tuple[Tensor, Tensor]:
    """y = g * (x @ W^T + scaling * xa @ B^T) + b with g = magnitude / weight_norm, and xa = dropout(x) @ A^T.

    x: (M, K); weight: (N, K); magnitude: (N,) in the adapters' dtype; weight_norm: (N,) from
    `dora_weight_norm`. Returns y: (M, N) in x's dtype and xa: (M, r) in the adapters' dtype.
    """
    column_scale = magnitude.to(weight_norm.dtype) / weight_norm
    y, xa = select_backend(x).dora_forward(x, weight, bias, lora_A, lora_B, column_scale, scaling=scaling,
                                           dropout_p=dropout_p, seed=seed)
    return y.contiguous(), xa.contiguous()


@dora_forward.register_fake
def _dora_forward_fake(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, seed, *, scaling, dropout_p):
    return x.new_empty((x.shape[0], weight.shape[0])), lora_A.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("lorafuse::dora_backward", mutates_args=())
def dora_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                  magnitude: Tensor, weight_norm: Tensor, xa: Tensor, y: Tensor, seed: Tensor, *, scaling: float,
                  dropout_p: float, needs_dx: bool, needs_dA: bool, needs_dB: bool,
                  needs_dm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dx, dA, dB and dm (magnitude's); one not needed comes back empty and is not computed."""
    column_scale = magnitude.to(weight_norm.dtype) / weight_norm
    grads = select_backend(x).dora_backward(dy, x, weight, bias, lora_A, lora_B, column_scale, magnitude, xa, y,
                                            scaling=scaling, dropout_p=dropout_p, seed=seed, needs_dx=needs_dx,
                                            needs_dA=needs_dA, needs_dB=needs_dB, needs_dm=needs_dm)
    return tuple(x.new_empty(0) if grad is None else grad.contiguous() for grad in grads)


@dora_backward.register_fake
def _dora_backward_fake(dy, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, y, seed, *, scaling,
                        dropout_p, needs_dx, needs_dA, needs_dB, needs_dm):
    wanted = ((x, needs_dx), (lora_A, needs_dA), (lora_B, needs_dB), (magnitude, needs_dm))
    return tuple(t.new_empty(t.shape) if needed else x.new_empty(0) for t, needed in wanted)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    """Save what the backward needs: the operands, xa, the seed and the output y (dm is sum(dy * (y - b)) / m,
    so y stands in for the unscaled product and no second (M, N) tensor is kept)."""
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, seed = inputs
    y, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, y, seed)
    ctx.scaling = keyword_only_inputs["scaling"]
    ctx.dropout_p = keyword_only_inputs["dropout_p"]


def _backward(ctx, dy, _dxa):
    """Gradients for (x, weight, bias, lora_A, lora_B, magnitude, weight_norm, seed), None where not needed.

    With g = m / ||W + s B A|| held constant and u = x @ W^T + s * xa @ B^T (so y = g * u + b):
        dm = sum_rows(dy * u) / ||W + s B A|| = sum_rows(dy * (y - b)) / m
    and dx, dA, dB are LoRA's (ops.py) with g * dy in place of dy. dW and db run in plain torch (frozen base).
    dm divides by m: where a magnitude entry is exactly 0 its gradient is not finite (y - b is 0 there, and
    u is lost); PEFT initialises m to the row norms, and Adam's steps do not land on 0.0 exactly.
    """
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, y, seed = ctx.saved_tensors
    needs_dx, needs_dW, needs_db, needs_dA, needs_dB, needs_dm = ctx.needs_input_grad[:6]
    dx = dA = dB = dm = None
    if needs_dx or needs_dA or needs_dB or needs_dm:
        grads = torch.ops.lorafuse.dora_backward(
            dy, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, xa, y, seed, scaling=ctx.scaling,
            dropout_p=ctx.dropout_p, needs_dx=needs_dx, needs_dA=needs_dA, needs_dB=needs_dB, needs_dm=needs_dm)
        dx, dA, dB, dm = (grad if needed else None
                          for grad, needed in zip(grads, (needs_dx, needs_dA, needs_dB, needs_dm)))
    dW = None
    if needs_dW:
        column_scale = magnitude.to(weight_norm.dtype) / weight_norm
        dW = ((dy.to(column_scale.dtype) * column_scale).t() @ x.to(column_scale.dtype)).to(weight.dtype)
    db = dy.sum(0) if needs_db else None
    return dx, dW, db, dA, dB, dm, None, None


dora_forward.register_autograd(_backward, setup_context=_setup_context)
