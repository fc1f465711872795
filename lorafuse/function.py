"""The autograd Function and the functional form `lora_linear`, with backend dispatch."""

import sys

import torch

from . import ops
from .checks import check_dropout, check_lora_inputs
from .dispatch import select_backend


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

    `lora_linear` calls the custom op `lorafuse::lora_forward` directly (its registered autograd is this
    same chain rule, lorafuse/ops.py) so that torch.compile can trace it; this Function is the same
    computation for callers of `.apply`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
        seed = _seed_tensor(seed, x.device)
        y, xa = torch.ops.lorafuse.lora_forward(x, weight, bias, lora_A, lora_B, seed, scaling=float(scaling),
                                                dropout_p=float(dropout_p))
        ops.save_for_backward(ctx, x, weight, lora_A, lora_B, xa, seed, scaling=float(scaling),
                              dropout_p=float(dropout_p))
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*ops.backward_grads(ctx, dy), None, None, None)


def draw_seed(device) -> torch.Tensor:
    """A one-element int64 dropout seed."""
    # From the device's default generator: torch.manual_seed reproduces it and checkpoint replays it.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _seed_tensor(seed, device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor([int(seed)], dtype=torch.int64, device=device)


def _is_dtensor(tensor) -> bool:
    # No tensor can be a DTensor before torch.distributed.tensor is imported; looking it up in
    # sys.modules keeps that 1 s import out of `import lorafuse`.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(tensor, dtensor_module.DTensor)


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
        seed = draw_seed(x.device)
    elif seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    else:
        seed = _seed_tensor(seed, x.device)
    if any(_is_dtensor(t) for t in (x, weight, lora_A, lora_B)):
        # Tensor-parallel layers (lorafuse.distributed styles): the same kernels on local shards.
        from .distributed.sharded import sharded_lora_linear

        return sharded_lora_linear(x, weight, bias, lora_A, lora_B, scaling=float(scaling), dropout_p=p, seed=seed)
    leading = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):
        y, _xa = torch.ops.lorafuse.lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, seed,
                                                 scaling=float(scaling), dropout_p=p)
    return y.reshape(*leading, weight.shape[0])
