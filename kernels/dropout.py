"""Counter-based dropout: the keep-mask is a pure function of (seed, row, column).

The forward and both backward kernels call `_keep_mask` on the tiles they already hold, so the mask
is rebuilt wherever it is needed and never stored. Element (i, k) of an `[M, K]` input uses the
philox counter `i * K + k` in int64, so inputs with more than 2^31 elements get distinct counters.
"""

import torch
import triton
import triton.language as tl

from lorafuse.checks import check_dropout, seed_tensor

from .common import device_guard


@triton.jit
def _keep_mask(seed, offs_m, offs_k, K, dropout_p):
    """Boolean `[BLOCK_M, BLOCK_K]` tile: True where element (offs_m, offs_k) is kept."""
    counters = offs_m.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    return tl.rand(seed, counters) >= dropout_p


@triton.jit
def _dropout_mask_kernel(
    seed_ptr,  # *int64, one element: the philox seed
    mask_ptr,  # *int8 [M, K], contiguous: 1 where kept
    M, K,  # sizes of the mask
    dropout_p,  # probability of dropping an element
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = _keep_mask(seed, offs_m, offs_k, K, dropout_p)
    in_bounds = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    ptrs = mask_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=in_bounds)


def dropout_mask(seed, shape, p, device) -> torch.Tensor:
    """The keep-mask the LoRA kernels use for an input of `shape` (leading dims flattened).

    Returns a bool tensor of `shape`: True where the element is kept. `p` is the drop probability.
    """
    check_dropout(p, name="p")
    shape = tuple(shape)
    if len(shape) == 0:
        raise ValueError("shape must have at least one dimension, got ()")
    K = shape[-1]
    M = 1
    for size in shape[:-1]:
        M *= size
    mask = torch.empty((M, K), dtype=torch.int8, device=device)
    if mask.numel() > 0:
        block_m, block_k = 32, 64
        grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
        with device_guard(mask):
            _dropout_mask_kernel[grid](seed_tensor(seed, device), mask, M, K, float(p), BLOCK_M=block_m,
                                       BLOCK_K=block_k)
    return mask.bool().reshape(shape)
