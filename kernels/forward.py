"""Fused LoRA forward: y = x @ W^T + b + s * (dropout(x) @ A^T) @ B^T in one launch.

Each program owns one `[BLOCK_M, BLOCK_N]` tile of y. Its K loop loads every x tile once and feeds
both the base product and the low-rank product `xa = dropout(x) @ A^T`; the epilogue adds
`s * xa @ B^T` and the bias. Every N tile recomputes its row block's xa: that costs r/BLOCK_N extra
MMA work (r=16, BLOCK_N=128: 12.5% of the base GEMM's MMA, but no extra pass over x and no second
launch). Programs in the first N column also store xa, the one tensor the backward needs besides x.

Row, column and K offsets are int64: a transposed weight view has stride N along K, so offset * stride
passes 2^31 once N * K does, whatever M is.
"""

import functools

import torch
import triton
import triton.language as tl

from lorafuse.checks import check_lora_inputs, seed_tensor

from .common import _grouped_tile, _mma, device_guard, dot_options, is_interpreted, rank_block, small_block
from .dropout import _keep_mask


@triton.jit
def _lora_forward_kernel(
    x_ptr,  # *[M, K] input, any strides
    w_ptr,  # *[N, K] frozen base weight, any strides (a transposed view works)
    bias_ptr,  # *[N] bias; unused when HAS_BIAS is False
    a_ptr,  # *[R, K] lora_A
    b_ptr,  # *[N, R] lora_B
    y_ptr,  # *[M, N] output
    xa_ptr,  # *[M, R] output: dropout(x) @ A^T, saved for backward
    seed_ptr,  # *int64 one element: the dropout seed
    M, N, K, R,  # problem sizes
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_xam, stride_xar,
    scaling,  # lora_alpha / r (or / sqrt(r) for rsLoRA)
    dropout_p,  # drop probability, used when HAS_DROPOUT
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    in_m = offs_m < M
    in_n = offs_n < N
    in_r = offs_r < R

    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        in_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        w_t = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                      mask=in_k[:, None] & in_n[None, :], other=0.0)
        a_t = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                      mask=in_k[:, None] & in_r[None, :], other=0.0)
        acc = _mma(x, w_t, acc, UPCAST, PRECISION)
        if HAS_DROPOUT:
            # 1 / (1 - p) is applied once to xa after the loop: fewer multiplies, one rounding.
            # (On a GPU, Triton passes float scalars as fp32: scaling and p carry fp32 precision even
            # for fp64 inputs, a relative 6e-8.)
            x = tl.where(_keep_mask(seed, offs_m, offs_k, K, dropout_p), x, 0.0).to(x.dtype)
        xa = _mma(x, a_t, xa, UPCAST, PRECISION)
    if HAS_DROPOUT:
        # Divided, as the backward does, so both use the same q = 1 / (1 - p) to the last bit.
        xa = xa / (1.0 - dropout_p)
    # xa is rounded to the input dtype before B, as an unfused LoRA (and the saved xa) has it.
    xa = xa.to(xa_ptr.dtype.element_ty)

    b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                  mask=in_r[:, None] & in_n[None, :], other=0.0)
    lora = _mma(xa, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), UPCAST, PRECISION)
    acc += scaling * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])
    if pid_n == 0:
        tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                 xa, mask=in_m[:, None] & in_r[None, :])


def _forward_configs():
    """GPU autotuning space: tile shapes from the Triton matmul tutorial's Hopper/Ampere set."""
    shapes = [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 32, 32, 5, 2)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                          num_warps=warps) for bm, bn, bk, stages, warps in shapes]


@functools.cache
def _tuned_kernel():
    """The autotuned forward kernel, built on first GPU use (autotuning needs a GPU driver)."""
    return triton.autotune(configs=_forward_configs(), key=["M", "N", "K", "BLOCK_R"])(_lora_forward_kernel)


def lora_forward(x, weight, bias, lora_A, lora_B, *, scaling, dropout_p, seed):
    """Run the fused forward.

    x: (M, K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); seed: an int or a
    one-element int64 tensor (used when dropout_p > 0). Any strides are accepted.
    Returns y: (M, N) and xa = dropout(x) @ A^T: (M, r), both in x's dtype.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K) here, got shape {tuple(x.shape)}")
    M, K = x.shape
    N, R = lora_B.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    xa = torch.empty((M, R), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, xa
    if N == 0 or K == 0:
        y.zero_()
        if bias is not None:
            y += bias
        xa.zero_()
        return y, xa
    interpreted = is_interpreted(_lora_forward_kernel)
    args = (x, weight, bias if bias is not None else x, lora_A, lora_B, y, xa, seed_tensor(seed, x.device),
            M, N, K, R,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            y.stride(0), y.stride(1), xa.stride(0), xa.stride(1),
            float(scaling), float(dropout_p))
    meta = dict(HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, BLOCK_R=rank_block(R),
                **dot_options(x.dtype, interpreted))
    if interpreted:
        block_m, block_n = small_block(M), small_block(N)
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        _lora_forward_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=small_block(K),
                                   GROUP_M=8)
    else:
        def grid(config):
            return (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
        with device_guard(x):
            _tuned_kernel()[grid](*args, **meta)
    return y, xa
