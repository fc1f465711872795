"""Fused LoRA forward: y = x @ W^T + b + s * (dropout(x) @ A^T) @ B^T in one pass over W.

Two launches:
1. `_lora_xa_kernel` (the prologue): xa = dropout(x) @ A^T / (1 - p), `[M, r]`, one pass over x. Each
   element's dropout byte is drawn here exactly once (16 per philox call).
2. `_lora_forward_kernel`: the base GEMM x @ W^T with a main loop as lean as a plain Triton GEMM; the
   accumulator starts at s * xa @ B^T (one `[BLOCK_M, r] x [r, BLOCK_N]` product per tile) and the
   epilogue adds the bias.

Why two launches: folding xa into the GEMM's K loop (the first design) made every one of the N / BLOCK_N
column tiles recompute its row block's xa (r / BLOCK_N extra MMA: 12.5% at r=16, BLOCK_N=128; 50% at
r=64) and redraw its dropout mask (32 draws per element of x at N=4096, which multiplied the K loop's
instructions by 16). The prologue costs one read of x (M*K*2 bytes: ~20 us at 8192x4096 bf16 on an
H100, ~7% of the 0.28 ms base GEMM) and the LoRA product r / K more MMA work (0.4% at r=16, K=4096).

Row, column and K offsets are int64: a transposed weight view has stride N along K, so offset * stride
passes 2^31 once N * K does, whatever M is.
"""

import torch
import triton
import triton.language as tl

from lorafuse.checks import check_lora_inputs, seed_tensor
from lorafuse.dropout_rng import drop_threshold

from . import tuning
from .common import _gemm_main_loop, _grouped_tile, _mma, is_interpreted, lora_dot_options, rank_block, small_block
from .dropout import _dropout_bytes
from .launches import Launch, run


@triton.jit
def _lora_xa_kernel(
    x_ptr,  # *[M, K] input, any strides
    a_ptr,  # *[R, K] lora_A
    xa_ptr,  # *[M, R] output in the adapters' dtype: dropout(x) @ A^T, saved for backward
    seed_ptr,  # *int64 one element: the dropout seed (read when HAS_DROPOUT)
    M, K, R,  # problem sizes
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xar,
    threshold,  # uint8 dropout threshold: keep where the random byte >= threshold
    keep_scale,  # 1 / (1 - p), exact
    HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    in_m = offs_m < M
    in_r = offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0)
        a_t = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                      mask=in_k[:, None] & in_r[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = _dropout_bytes(seed, offs_m, k0, K, BLOCK_M, BLOCK_K) >= threshold
            x = tl.where(keep, x, 0.0).to(x.dtype)
        # x's tile in A's dtype: a no-op, or fp16/bf16 -> fp32 for fp32 adapters (no fp32 copy of x is made).
        xa = _mma(x.to(a_t.dtype), a_t, xa, UPCAST, LORA_PRECISION)
    if HAS_DROPOUT:
        # 1 / (1 - p) once, after the sum: one rounding, and the backward scales by the same float.
        xa = xa * keep_scale
    # Rounded to the adapters' dtype, as an unfused LoRA has it before B (and as it is saved).
    tl.store(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
             xa.to(xa_ptr.dtype.element_ty), mask=in_m[:, None] & in_r[None, :])


@triton.jit
def _lora_forward_kernel(
    x_ptr,  # *[M, K] input, any strides
    w_ptr,  # *[N, K] frozen base weight, any strides (a transposed view works)
    bias_ptr,  # *[N] bias; unused when HAS_BIAS is False
    scale_ptr,  # *[N] contiguous, fp32 (fp64): DoRA's column scale g; unused when HAS_COLUMN_SCALE is False
    xa_ptr,  # *[M, R] from the prologue, in the adapters' dtype
    b_ptr,  # *[N, R] lora_B, in the adapters' dtype (x's, or fp32)
    y_ptr,  # *[M, N] output
    M, N, K, R,  # problem sizes
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_xam, stride_xar, stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling,  # lora_alpha / r (or / sqrt(r) for rsLoRA)
    HAS_BIAS: tl.constexpr, HAS_COLUMN_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, LORA_TO_X_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_m = offs_m < M
    in_n = offs_n < N

    # The LoRA term first, s * xa @ B^T (one `[BLOCK_M, r] x [r, BLOCK_N]` product), as the accumulator's
    # starting value: its tiles are dead before the main loop, so the loop holds no more registers than a
    # plain GEMM's (added after the loop instead, a second fp32 tile made 128x128 tiles spill on sm_90).
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                 mask=in_m[:, None] & in_r[None, :], other=0.0)
    b_t = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                  mask=in_r[:, None] & in_n[None, :], other=0.0)
    acc = _mma(xa, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE), UPCAST, LORA_TO_X_PRECISION) * scaling

    # The main loop: a plain Triton GEMM's (x @ W^T, W read through its strides).
    acc = _gemm_main_loop(acc, x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wk, stride_wn,
                          x_ptr, BLOCK_K, UPCAST, PRECISION, False)

    if HAS_COLUMN_SCALE:  # DoRA: y = g * (x @ W^T + s * xa @ B^T) + b
        acc = acc * tl.load(scale_ptr + offs_n, mask=in_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


# ---- autotune spaces ---------------------------------------------------------------------------------------

def _gemm_configs():
    """The Triton matmul tutorial's tiles (Ampere/Hopper), plus small ones for FMA dtypes and AMD's LDS."""
    shapes = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4),
              (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
              (128, 128, 64, 2, 4), (64, 64, 32, 2, 4), (32, 32, 32, 2, 4)]
    return tuple(tuning.config(stages, warps, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
                 for bm, bn, bk, stages, warps in shapes)


def _xa_configs():
    """Row blocks for the memory-bound prologue: small BLOCK_M gives M / BLOCK_M programs to fill the GPU."""
    shapes = [(16, 256, 3, 4), (32, 128, 4, 4), (32, 64, 4, 4), (64, 64, 3, 4), (64, 128, 3, 8), (16, 64, 3, 4),
              (16, 32, 2, 4)]
    return tuple(tuning.config(stages, warps, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, stages, warps in shapes)


#: For where none of _xa_configs fits: fp64 at r=256 on gfx942, whose 16x32 tiles needed 68 KiB (A's [32, r] tile
#: alone is 64 KiB); 16x16 needs 34.
_XA_FALLBACKS = (tuning.config(2, 4, BLOCK_M=16, BLOCK_K=16),)
#: Elements of A's tile an FMA product of the prologue may hold (see _prune_xa).
_FMA_A_TILE = 64 * 64
_GEMM_CONFIGS = _gemm_configs()
_XA_CONFIGS = _xa_configs() + _XA_FALLBACKS


def _prune_forward(configs, named_args, **meta):
    size = tuning.element_size(named_args["x_ptr"].dtype)
    adapter_size = tuning.element_size(named_args["b_ptr"].dtype)
    block_r = meta["BLOCK_R"]

    def shared_bytes(cfg):
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        return tuning.pipeline_buffers(cfg) * (bm + bn) * bk * size + (bm + bn) * block_r * adapter_size

    # DoRA's column scale beside the bias on sm_100: the epilogue reads the accumulator out of tensor memory one
    # row per thread, and both column vectors are then held whole by every thread (128x128 on 4 warps went from
    # 196 registers to 255 and 64 bytes of spills): count the accumulator twice there.
    epilogue_copies = 2 if meta["HAS_COLUMN_SCALE"] and tuning.accumulators_in_tensor_memory(
        tuning.active_target()) else 1

    def accumulators(cfg):
        return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] * epilogue_copies

    def operand_bytes(cfg):  # the LoRA product's xa and B tiles, live with the accumulator
        return (cfg.kwargs["BLOCK_M"] + cfg.kwargs["BLOCK_N"]) * block_r * adapter_size

    return tuning.prune(configs, dtype=named_args["x_ptr"].dtype, precision=meta["PRECISION"],
                        shared_bytes=shared_bytes, accumulators=accumulators, operand_bytes=operand_bytes)


def _prune_xa(configs, named_args, **meta):
    size = tuning.element_size(named_args["x_ptr"].dtype)
    adapter_size = tuning.element_size(named_args["a_ptr"].dtype)
    block_r = meta["BLOCK_R"]

    def shared_bytes(cfg):
        bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
        # x's tile, A's tile, and x converted to A's dtype (fp32 adapters) plus the mask bytes.
        return tuning.pipeline_buffers(cfg) * (bm * size + block_r * adapter_size) * bk + bm * bk * (adapter_size + 1)

    def accumulators(cfg):
        return cfg.kwargs["BLOCK_M"] * block_r

    def operand_bytes(cfg):  # x's tile (in A's dtype) and A's
        return (cfg.kwargs["BLOCK_M"] + block_r) * cfg.kwargs["BLOCK_K"] * adapter_size

    # On FMA (fp32 adapters without TF32) where tuning.prune counts no operands (sm_90/sm_100), A's [BLOCK_K, r]
    # tile is what spills: 128x64 did at r=64 (32x128 on 4 warps 16 to 24 bytes, 64x128 on 8 warps 40), 64x64
    # and 256x16 did not.
    if not tuning.uses_tensor_cores(named_args["a_ptr"].dtype, meta["LORA_PRECISION"]) and \
            not tuning.operands_in_registers(tuning.active_target()):
        configs = [cfg for cfg in configs if cfg.kwargs["BLOCK_K"] * block_r <= _FMA_A_TILE] or configs
    # The products run in the adapters' dtype: fp32 adapters on fp16/bf16 x are held to fp32's budgets.
    return tuning.prune(configs, dtype=named_args["a_ptr"].dtype, precision=meta["LORA_PRECISION"],
                        shared_bytes=shared_bytes, accumulators=accumulators, operand_bytes=operand_bytes,
                        fallbacks=_XA_FALLBACKS)


# ---- launcher ----------------------------------------------------------------------------------------------

def _without(options: dict, name: str) -> dict:
    return {key: value for key, value in options.items() if key != name}


def forward_launches(x, weight, bias, lora_A, lora_B, y, xa, seed, *, scaling, dropout_p, interpreted,
                     column_scale=None):
    """The two launches of the forward for these tensors (see `Launch`); nothing is run.

    column_scale: DoRA's g, (N,) contiguous in the accumulator's dtype, multiplied into y before the bias."""
    M, K = x.shape
    N, R = lora_B.shape
    dots = lora_dot_options(x.dtype, lora_A.dtype, interpreted)
    block_r = rank_block(R)
    threshold = drop_threshold(dropout_p)
    prologue = Launch(
        name="forward_xa", kernel=_lora_xa_kernel,
        args=(x, lora_A, xa, seed, M, K, R, x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
              xa.stride(0), xa.stride(1), threshold, 1.0 / (1.0 - dropout_p)),
        meta=dict(HAS_DROPOUT=threshold > 0, BLOCK_R=block_r, **_without(dots, "LORA_TO_X_PRECISION")),
        grid=lambda c: (triton.cdiv(M, c["BLOCK_M"]),),
        configs=_XA_CONFIGS, prune=_prune_xa, key=("M", "K", "BLOCK_R"),
        interpreter_config=dict(BLOCK_M=small_block(M, 32), BLOCK_K=small_block(K)))
    gemm = Launch(
        name="forward", kernel=_lora_forward_kernel,
        args=(x, weight, bias if bias is not None else x, column_scale if column_scale is not None else x, xa, lora_B,
              y, M, N, K, R,
              x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xa.stride(0), xa.stride(1),
              lora_B.stride(0), lora_B.stride(1), y.stride(0), y.stride(1), float(scaling)),
        meta=dict(HAS_BIAS=bias is not None, HAS_COLUMN_SCALE=column_scale is not None, BLOCK_R=block_r,
                  **_without(dots, "LORA_PRECISION")),
        grid=lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(N, c["BLOCK_N"]),),
        configs=_GEMM_CONFIGS, prune=_prune_forward, key=("M", "N", "K", "BLOCK_R"),
        interpreter_config=dict(BLOCK_M=small_block(M), BLOCK_N=small_block(N), BLOCK_K=small_block(K),
                                GROUP_M=8))
    return [prologue, gemm]


def lora_forward(x, weight, bias, lora_A, lora_B, *, scaling, dropout_p, seed, column_scale=None):
    """Run the fused forward.

    x: (M, K); weight: (N, K); bias: (N,) or None; lora_A: (r, K); lora_B: (N, r); seed: an int or a
    one-element int64 tensor (used when dropout_p > 0). Any strides are accepted.
    lora_A and lora_B are in x's dtype or (on a float16/bfloat16 x) float32.
    column_scale: DoRA's g, (N,), or None: y = g * (x @ W^T + s * xa @ B^T) + b.
    Returns y: (M, N) in x's dtype and xa = dropout(x) @ A^T: (M, r) in the adapters' dtype.
    """
    check_lora_inputs(x, weight, bias, lora_A, lora_B)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, K) here, got shape {tuple(x.shape)}")
    M, K = x.shape
    N, R = lora_B.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    xa = torch.empty((M, R), dtype=lora_A.dtype, device=x.device)
    if M == 0:
        return y, xa
    if N == 0 or K == 0:
        y.zero_()  # g * 0 + b
        if bias is not None:
            y += bias
        xa.zero_()
        return y, xa
    launches = forward_launches(x, weight, bias, lora_A, lora_B, y, xa, seed_tensor(seed, x.device),
                                scaling=scaling, dropout_p=dropout_p,
                                interpreted=is_interpreted(_lora_forward_kernel),
                                column_scale=None if column_scale is None else column_scale.contiguous())
    for launch in launches:
        run(launch, x)
    return y, xa
