"""Counter-based dropout: the keep-mask is a pure function of (seed, row, column), drawn 16 elements a call.

One philox call (`tl.randint4x`, 10 rounds) gives four 32-bit words, 16 random bytes. Element (i, k) of an
`[M, K]` input uses byte `k % 16` of the call whose counter is `i * cdiv(K, 16) + k // 16` (int64, so inputs
with more than 2^31 elements get distinct counters): byte j is bits 8*(j % 4) .. 8*(j % 4) + 7 of word j // 4.
The element is kept when its byte is >= `threshold = drop_threshold(p)`.

This is FlashAttention's scheme: 16 decisions per philox call instead of 1 (a philox call is ~40 integer
instructions; drawn per element it made the forward's K loop 16x longer). The price is that p is quantised
to 1/256: the drop probability is `threshold / 256` exactly, threshold = round(256 p) clamped to [1, 255]
(p = 0.1 drops 26/256 = 10.16%). The kept values are still scaled by the exact 1 / (1 - p), so the expected
output is (1 - threshold/256) / (1 - p) of the undropped one (0.9983 at p = 0.1, 0.9992 at p = 0.05).

Tiles that call `_dropout_bytes` must start at a multiple of 16 along K and be a multiple of 16 wide, so every
philox call serves whole groups and each element's mask is drawn exactly once per kernel that needs it.
"""

import torch
import triton
import triton.language as tl

from lorafuse.checks import check_dropout, seed_tensor
from lorafuse.dropout_rng import drop_threshold

from .common import device_guard

#: Elements served by one philox call: 4 words of 4 bytes.
GROUP = 16


@triton.jit
def _stack4(a, b, c, d):
    """`[..., 4]` from four same-shape tensors, in the order a, b, c, d (the new dim stays in registers)."""
    return tl.join(tl.join(a, c), tl.join(b, d)).reshape(a.shape + [4])


@triton.jit
def _dropout_bytes(seed, offs_m, k_start, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """uint8 `[BLOCK_M, BLOCK_K]` tile of random bytes for rows `offs_m` (int64) and columns
    k_start .. k_start + BLOCK_K (k_start a multiple of 16): one philox call per 16 elements.

    Compare it with the threshold where the mask is used (`bytes >= threshold`): a boolean tile held in two
    layouts would go through shared memory as 1-bit elements, which the GPU compiler refuses.
    """
    GROUPS: tl.constexpr = BLOCK_K // 16
    groups_per_row = (K + 15) // 16
    group = k_start // 16 + tl.arange(0, GROUPS)
    counters = offs_m[:, None] * groups_per_row + group[None, :].to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    words = _stack4(w0, w1, w2, w3)  # [BLOCK_M, GROUPS, 4] uint32
    random_bytes = _stack4(words & 0xFF, (words >> 8) & 0xFF, (words >> 16) & 0xFF, words >> 24)
    return random_bytes.reshape(BLOCK_M, BLOCK_K).to(tl.uint8)


@triton.jit
def _dropout_mask_kernel(
    seed_ptr,  # *int64, one element: the philox seed
    mask_ptr,  # *int8 [M, K], contiguous: 1 where kept
    M, K,  # sizes of the mask
    threshold,  # int in [0, 255]: an element is kept when its random byte >= threshold
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k_start = tl.program_id(1) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    random_bytes = _dropout_bytes(tl.load(seed_ptr), offs_m, k_start, K, BLOCK_M, BLOCK_K)
    keep = (random_bytes >= threshold).to(tl.int8)
    in_bounds = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(mask_ptr + offs_m[:, None] * K + offs_k[None, :], keep, mask=in_bounds)


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
    if p == 0.0:
        return mask.fill_(1).bool().reshape(shape)
    if mask.numel() > 0:
        block_m, block_k = 32, 64
        grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
        with device_guard(mask):
            _dropout_mask_kernel[grid](seed_tensor(seed, device), mask, M, K, drop_threshold(p), BLOCK_M=block_m,
                                       BLOCK_K=block_k)
    return mask.bool().reshape(shape)
