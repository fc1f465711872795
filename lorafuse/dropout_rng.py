"""The dropout mask's definition, in plain torch: the same bits the kernels draw, on any device.

The kernels (kernels/dropout.py) draw the keep-mask 16 elements per philox call: element (i, k) of an
`[M, K]` input takes byte `k % 16` of philox4x32-10(key=seed, counter=(c, 0, 0) with c = i * cdiv(K, 16) +
k // 16 split into two 32-bit words), byte j being bits 8*(j % 4).. of word j // 4, and is kept when that
byte is >= `drop_threshold(p)`. This module computes the same mask with torch integer ops, so the PyTorch
path (CPU, macOS, no Triton) drops exactly the elements the kernels drop for a given seed.
"""

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # philox4x32 multipliers (Salmon et al., 2011)
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # philox4x32 key increments (the golden ratio and sqrt(3) - 1)
_ROUNDS = 10  # tl.randint4x's default
GROUP = 16  # elements per philox call: 4 words of 4 bytes


def drop_threshold(p: float) -> int:
    """The uint8 threshold for drop probability p: an element is kept when its random byte >= threshold.

    round(256 p), clamped to [1, 255] for p > 0 so that any p > 0 drops something and never everything;
    0 for p == 0. The drop probability actually used is threshold / 256.
    """
    if p <= 0.0:
        return 0
    return min(255, max(1, round(256.0 * p)))


def _mulhilo(a: torch.Tensor, b: int):
    """(high, low) 32-bit halves of a * b for uint32 values held in int64 (the product needs 64 bits, so
    b is split into 16-bit halves to keep every partial product under 2^63)."""
    low_part = a * (b & 0xFFFF)  # < 2^48
    high_part = a * (b >> 16)  # < 2^48, weight 2^16
    partial = low_part + (high_part & 0xFFFF) * 65536  # < 2^49
    return (high_part >> 16) + (partial >> 32), partial & _MASK32


def philox4x32(seed: int, counter: torch.Tensor):
    """Four uint32 words (as int64 tensors) of philox4x32-10 for an int64 `counter` tensor, as
    `tl.randint4x(seed, counter)` gives them: counter (lo, hi, 0, 0), key (seed lo, seed hi)."""
    c0 = counter & _MASK32
    c1 = (counter >> 32) & _MASK32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def keep_mask(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """Bool `[M, K]`: True where the kernels keep element (i, k) for `seed` and drop probability p."""
    threshold = drop_threshold(p)
    if threshold == 0:
        return torch.ones((M, K), dtype=torch.bool, device=device)
    groups_per_row = -(-K // GROUP)
    rows = torch.arange(M, dtype=torch.int64, device=device)[:, None]
    counters = rows * groups_per_row + torch.arange(groups_per_row, dtype=torch.int64, device=device)[None, :]
    words = torch.stack(philox4x32(seed % 2**64, counters), dim=-1)  # int64 seeds as uint64, as Triton does
    shifts = torch.arange(0, 32, 8, dtype=torch.int64, device=device)
    random_bytes = (words[..., None] >> shifts) & 0xFF  # [M, groups, word, byte]
    return (random_bytes.reshape(M, groups_per_row * GROUP)[:, :K] >= threshold)
