"""The functional forms `lora_linear` and `dora_linear`: checks, seeds and autocast around the custom ops.

The autograd of the fused layer is registered on the custom op `lorafuse::lora_forward` (ops.py), so
eager calls and torch.compile take the same path. Plain tensors only: tensor-parallel layers run
`lorafuse.distributed.sharded.sharded_lora_linear`, which calls this on each rank's shards (the layering
reads one way, from the distributed package down to this one).
"""

import torch

from . import dora_ops, ops  # noqa: F401  (register torch.ops.lorafuse.*)
from .checks import check_dropout, check_lora_inputs, check_same_device, seed_tensor
from .dispatch import select_backend


def dropout_mask(seed, shape, p, device) -> torch.Tensor:
    """The keep-mask (bool, `shape`) the backend chosen for `device` draws for `seed`."""
    backend = select_backend(torch.empty(0, device=device))
    return backend.dropout_mask(seed, shape, p, device)


def draw_seed(device) -> torch.Tensor:
    """A one-element int64 dropout seed."""
    # From the device's default generator: torch.manual_seed reproduces it and checkpoint replays it.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _autocast(x, weight, bias, lora_A, lora_B):
    """Cast the operands as autocast would cast nn.Linear's, when autocast is on for x's device: floating
    tensors other than fp64 go to the autocast dtype (autocast leaves fp64 alone)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias, lora_A, lora_B
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.dtype in _AUTOCAST_ELIGIBLE else t
                 for t in (x, weight, bias, lora_A, lora_B))


def prepare_call(x, weight, bias, lora_A, lora_B, *, dropout_p, training, seed):
    """What every lora_linear call does before the kernels: check the operands, cast them as autocast
    would, settle the dropout rate and the seed. Returns (x, weight, bias, lora_A, lora_B, p, seed tensor)."""
    check_dropout(dropout_p)
    # Devices before autocast: it casts per device type, and for x on the meta device it has no answer at all
    # (torch raises "unknown device type for autocast"), where the mismatch is the real error.
    check_same_device(x, weight, bias, lora_A, lora_B)
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and seed is None:
        seed = draw_seed(x.device)
    elif seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    else:
        seed = seed_tensor(seed, x.device)
    return x, weight, bias, lora_A, lora_B, p, seed


def lora_linear(x, weight, bias, lora_A, lora_B, *, scaling, dropout_p=0.0, training=True, seed=None):
    """Fused LoRA linear: x @ W^T + b + scaling * (dropout(x) @ A^T) @ B^T.

    x: (..., in_features); weight: (out_features, in_features), any strides; bias: (out_features,) or
    None; lora_A: (r, in_features); lora_B: (out_features, r). Dropout applies only when `training`.
    seed: an int or one-element int64 tensor fixing the dropout mask; None draws one from torch's
    generator for x's device. Returns (..., out_features).
    """
    x, weight, bias, lora_A, lora_B, p, seed = prepare_call(x, weight, bias, lora_A, lora_B, dropout_p=dropout_p,
                                                            training=training, seed=seed)
    leading = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):
        y, _xa = torch.ops.lorafuse.lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, seed,
                                                 scaling=float(scaling), dropout_p=p)
    if x.dim() == 2:
        return y
    # y is a fresh tensor that nothing else sees, so its (..., N) shape is given as torch.matmul gives a folded
    # batch its shape: _unsafe_view shares the storage but is no view to autograd. A reshape would return a view
    # of y, on which an in-place op (out += residual) skips the hooks of the tensor it views: FSDP2 warns
    # about that, as its pre-backward hook sits on the module's output.
    return torch.ops.aten._unsafe_view(y, (*leading, weight.shape[0]))


def dora_linear(x, weight, bias, lora_A, lora_B, magnitude, *, scaling, dropout_p=0.0, training=True, seed=None):
    """Fused DoRA linear: g * (x @ W^T + scaling * (dropout(x) @ A^T) @ B^T) + b, g = magnitude / ||W + s B A||.

    The operands as for `lora_linear`, plus magnitude: (out_features,) in the adapters' dtype. The row norms
    of W + s B A are computed (fp32) without forming the matrix and detached, as PEFT detaches them. Dropout
    touches the low-rank path only (see `lorafuse.reference.dora_linear` for how that differs from PEFT in
    training). Returns (..., out_features); the output is saved for the backward, so modifying it in place
    makes autograd raise.
    """
    x, weight, bias, lora_A, lora_B, p, seed = prepare_call(x, weight, bias, lora_A, lora_B, dropout_p=dropout_p,
                                                            training=training, seed=seed)
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    if torch.is_autocast_enabled(x.device.type) and magnitude.dtype in _AUTOCAST_ELIGIBLE:
        magnitude = magnitude.to(lora_A.dtype)  # cast with the adapters, as autocast cast them
    if tuple(magnitude.shape) != (weight.shape[0],):
        raise ValueError(f"magnitude must have shape ({weight.shape[0]},), got {tuple(magnitude.shape)}")
    if magnitude.dtype != lora_A.dtype or magnitude.device != x.device:
        raise TypeError(f"magnitude must be {lora_A.dtype} (the adapters' dtype) on {x.device}, got "
                        f"{magnitude.dtype} on {magnitude.device}")
    with torch.autocast(x.device.type, enabled=False):
        norm = torch.ops.lorafuse.dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(),
                                                   scaling=float(scaling))
        y, _xa = torch.ops.lorafuse.dora_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B,
                                                 magnitude, norm, seed, scaling=float(scaling), dropout_p=p)
    # A true view (not lora_linear's _unsafe_view): y is saved for the backward, and a view shares its version
    # counter, so an in-place change of the output is caught by autograd instead of corrupting dm.
    return y.view(*x.shape[:-1], weight.shape[0])
