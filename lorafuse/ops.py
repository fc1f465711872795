"""The fused layer as `torch.library` custom ops: `lorafuse::lora_forward` and `lorafuse::lora_backward`.

torch.compile sees each op as one opaque call with a known output shape (the fake implementations),
so a compiled model keeps the fused kernels instead of breaking its graph around them or tracing into
Triton. The ops pick their launchers at run time (`select_backend`), so one compiled graph serves the
Triton kernels on CUDA, the interpreted kernels on CPU and the PyTorch path alike.

Autograd for `lora_forward` is registered here too (`register_autograd`): this is the fused layer's
autograd Function, with the chain rule written out in `_backward`.
"""

from typing import Optional

import torch
from torch import Tensor

from .dispatch import select_backend


@torch.library.custom_op("lorafuse::lora_forward", mutates_args=())
def lora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, seed: Tensor, *,
                 scaling: float, dropout_p: float) -> tuple[Tensor, Tensor]:
    """y = x @ W^T + b + scaling * xa @ B^T and xa = dropout(x) @ A^T.

    x: (M, K); weight: (N, K), any strides; bias: (N,) or None; lora_A: (r, K); lora_B: (N, r);
    seed: one-element int64 tensor. Returns y: (M, N) in x's dtype and xa: (M, r) in the adapters' dtype,
    both contiguous.
    """
    backend = select_backend(x)
    y, xa = backend.lora_forward(x, weight, bias, lora_A, lora_B, scaling=scaling, dropout_p=dropout_p, seed=seed)
    # The fake implementation promises contiguous outputs; compiled graphs rely on those strides.
    return y.contiguous(), xa.contiguous()


@lora_forward.register_fake
def _lora_forward_fake(x, weight, bias, lora_A, lora_B, seed, *, scaling, dropout_p):
    return x.new_empty((x.shape[0], weight.shape[0])), lora_A.new_empty((x.shape[0], lora_A.shape[0]))


@torch.library.custom_op("lorafuse::lora_backward", mutates_args=())
def lora_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor, seed: Tensor, *,
                  scaling: float, dropout_p: float, needs_dx: bool, needs_dA: bool,
                  needs_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dx: (M, K), dA: (r, K), dB: (N, r); a gradient that is not needed comes back as an empty tensor
    (a custom op cannot return None) and is not computed."""
    backend = select_backend(x)
    grads = backend.lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling=scaling, dropout_p=dropout_p, seed=seed,
                                  needs_dx=needs_dx, needs_dA=needs_dA, needs_dB=needs_dB)
    return tuple(x.new_empty(0) if grad is None else grad.contiguous() for grad in grads)


@lora_backward.register_fake
def _lora_backward_fake(dy, x, weight, lora_A, lora_B, xa, seed, *, scaling, dropout_p, needs_dx, needs_dA, needs_dB):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dA = lora_A.new_empty(lora_A.shape) if needs_dA else x.new_empty(0)
    dB = lora_B.new_empty(lora_B.shape) if needs_dB else x.new_empty(0)
    return dx, dA, dB


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    """Save what the backward needs: x, xa and the seed (the mask is rebuilt from it), plus the parameters."""
    x, weight, _bias, lora_A, lora_B, seed = inputs
    _y, xa = output
    # xa is an internal tensor handed back only to be saved: it has no gradient of its own.
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.scaling = keyword_only_inputs["scaling"]
    ctx.dropout_p = keyword_only_inputs["dropout_p"]


def _backward(ctx, dy, _dxa):
    """Gradients for (x, weight, bias, lora_A, lora_B, seed), None where not needed.

    Chain rule (m the keep-mask, q = 1 / (1 - p), xa = (x * m * q) @ A^T saved from the forward):
        dxa = s * dy @ B;  dB = s * dy^T @ xa;  dA = q * dxa^T @ (x * m);  dx = dy @ W + q * m * (dxa @ A)
    The mask is rebuilt from the saved seed, never stored.
    dW = dy^T @ x and db = sum(dy) run in plain torch: the base is frozen in LoRA training, so they are rare.
    """
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    needs_dx, needs_dW, needs_db, needs_dA, needs_dB = ctx.needs_input_grad[:5]
    dx = dA = dB = None
    if needs_dx or needs_dA or needs_dB:
        dx, dA, dB = torch.ops.lorafuse.lora_backward(
            dy, x, weight, lora_A, lora_B, xa, seed, scaling=ctx.scaling, dropout_p=ctx.dropout_p,
            needs_dx=needs_dx, needs_dA=needs_dA, needs_dB=needs_dB)
        dx, dA, dB = (grad if needed else None for grad, needed in ((dx, needs_dx), (dA, needs_dA), (dB, needs_dB)))
    dW = dy.t() @ x if needs_dW else None
    db = dy.sum(0) if needs_db else None
    return dx, dW, db, dA, dB, None


lora_forward.register_autograd(_backward, setup_context=_setup_context)
