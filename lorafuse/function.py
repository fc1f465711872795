"""The autograd Function and the functional form `lora_linear`, with backend dispatch."""

import functools
import os

import torch

from . import torch_backend
from .checks import check_dropout, check_lora_inputs


@functools.cache
def _kernels():
    """`lorafuse.kernels`, or None where Triton cannot be imported."""
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels


def select_backend(x: torch.Tensor):
    """The launchers for x's device: Triton kernels on CUDA, or on CPU when TRITON_INTERPRET=1 was set
    before lorafuse.kernels was imported; the PyTorch path otherwise. LORAFUSE_BACKEND=torch forces
    the PyTorch path (for comparison and debugging)."""
    if os.environ.get("LORAFUSE_BACKEND", "") == "torch":
        return torch_backend
    kernels = _kernels()
    if kernels is not None and (x.is_cuda or (x.device.type == "cpu" and kernels.INTERPRETED)):
        return kernels
    return torch_backend


def dropout_mask(seed, shape, p, device) -> torch.Tensor:
    """The keep-mask (bool, `shape`) the backend chosen for `device` draws for `seed`."""
    backend = select_backend(torch.empty(0, device=device))
    return backend.dropout_mask(seed, shape, p, device)


class LoRALinearFunction(torch.autograd.Function):
    """y = x @ W^T + b + s * (dropout(x) @ A^T) @ B^T on 2-D x, through one backend's launchers.

    Chain rule (m the keep-mask, q = 1 / (1 - p), xa = (x * m * q) @ A^T saved from the forward):
        dxa = s * dy @ B;  dB = s * dy^T @ xa;  dA = q * dxa^T @ (x * m);  dx = dy @ W + q * m * (dxa @ A)
        dW = dy^T @ x and db = sum(dy) only when the base requires grad.
    Saved: x, xa and the seed (plus the parameters); the mask is rebuilt from the seed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        backend = select_backend(x)
        y, xa = backend.lora_forward(x, weight, bias, lora_A, lora_B, scaling=scaling, dropout_p=dropout_p,
                                     seed=seed)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
        ctx.backend = backend
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
        needs_dx, needs_dW, needs_db, needs_dA, needs_dB = ctx.needs_input_grad[:5]
        dx = dA = dB = None
        if needs_dx or needs_dA or needs_dB:
            dx, dA, dB = ctx.backend.lora_backward(
                dy, x, weight, lora_A, lora_B, xa, scaling=ctx.scaling, dropout_p=ctx.dropout_p, seed=seed,
                needs_dx=needs_dx, needs_dA=needs_dA, needs_dB=needs_dB)
        dW = dy.t() @ x if needs_dW else None
        db = dy.sum(0) if needs_db else None
        return dx, dW, db, dA, dB, None, None, None


def _draw_seed(device) -> torch.Tensor:
    # From the device's default generator: torch.manual_seed reproduces it and checkpoint replays it.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _autocast(x, weight, bias, lora_A, lora_B):
    """Cast the operands as autocast would cast nn.Linear's, when autocast is on for x's device."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias, lora_A, lora_B
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in (x, weight, bias, lora_A, lora_B))


def lora_linear(x, weight, bias, lora_A, lora_B, *, scaling, dropout_p=0.0, training=True, seed=None):
    """Fused LoRA linear: x @ W^T + b + scaling * (dropout(x) @ A^T) @ B^T.

    x: (..., in_features); weight: (out_features, in_features), any strides; bias: (out_features,) or
    None; lora_A: (r, in_features); lora_B: (out_features, r). Dropout applies only when `training`.
    seed: an int or one-element int64 tensor fixing the dropout mask; None draws one from torch's
    generator for x's device. Returns (..., out_features).
    """
    check_dropout(dropout_p)
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = _draw_seed(x.device)
    elif seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=x.device)
    leading = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):
        y = LoRALinearFunction.apply(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, float(scaling),
                                     p, seed)
    return y.reshape(*leading, weight.shape[0])
