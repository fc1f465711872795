"""Fused LoRA backward: dx, dA and dB in two launches, the dropout mask rebuilt once per element.

Given dy (M, N), with m the keep-mask, q = 1 / (1 - p) and s the scaling, the chain rule of
y = x @ W^T + b + s * ((x * m * q) @ A^T) @ B^T gives

    dxa = s * dy @ B                          (M, r)
    dB  = s * dy^T @ xa                       (N, r)
    dA  = q * dxa^T @ (x * m)                 (r, K)
    dx  = dy @ W + q * m * (dxa @ A)          (M, K)

Launch 1 reads each dy tile once for both dxa and the dB partial sums. Launch 2 is the dx GEMM, whose main
loop is a plain GEMM's; before it, each program draws the mask of its `[BLOCK_M, BLOCK_K]` tile (each
element once, 16 per philox call), adds the dA partial sums from its x tile and starts the accumulator at
the masked LoRA term. dA and dB
are accumulated in fp32 with atomics (M / BLOCK_M adds per element), so their last bits can vary from run
to run.
"""

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from lorafuse.checks import accumulator_dtype, check_lora_inputs, seed_tensor
from lorafuse.dropout_rng import drop_threshold

from . import tuning
from .common import _gemm_main_loop, _grouped_tile, _mma, is_interpreted, lora_dot_options, rank_block, small_block
from .dropout import _dropout_bytes
from .forward import _GEMM_CONFIGS
from .launches import Launch, run

#: Rank columns the dx kernel's LoRA prologue takes at once (see there): at most a [BLOCK_M, 64] dxa tile and a
#: [64, BLOCK_K] dA product are live, whatever r is.
_RANK_CHUNK = tl.constexpr(64)


@triton.jit
def _lora_backward_dy_kernel(
    dy_ptr,  # *[M, N] output gradient, any strides
    b_ptr,  # *[N, R] lora_B, in the adapters' dtype (x's, or fp32)
    xa_ptr,  # *[M, R] saved dropout(x) @ A^T, in the adapters' dtype
    dxa_ptr,  # *[M, R] output in the adapters' dtype: s * dy @ B
    db_ptr,  # *fp32 (fp64 for fp64 inputs) [N, R] contiguous, zeroed: dB accumulates here
    y_ptr,  # *[M, N] DoRA: the forward's output (read when COMPUTE_DM)
    bias_ptr,  # *[N] DoRA: the bias (read when COMPUTE_DM and HAS_BIAS)
    scale_ptr,  # *[N] contiguous, accumulator dtype: DoRA's column scale g (read when SCALE_DY)
    dm_ptr,  # *[N] contiguous, accumulator dtype, zeroed: DoRA's sum over rows of dy * (y - b) (when COMPUTE_DM)
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar, stride_dxam, stride_dxar,
    stride_ym, stride_yn,
    scaling,
    COMPUTE_DB: tl.constexpr, SCALE_DY: tl.constexpr, COMPUTE_DM: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    in_m = offs_m < M
    in_r = offs_r < R
    if COMPUTE_DB:
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :] * stride_xar,
                     mask=in_m[:, None] & in_r[None, :], other=0.0)
    dxa = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        in_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=in_m[:, None] & in_n[None, :], other=0.0)
        if COMPUTE_DM:  # DoRA: y - b = g * (x @ W^T + s * xa @ B^T), read back instead of kept from the forward
            unbiased = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                               mask=in_m[:, None] & in_n[None, :], other=0.0).to(ACC_DTYPE)
            if HAS_BIAS:
                unbiased -= tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(ACC_DTYPE)[None, :]
            tl.atomic_add(dm_ptr + offs_n, tl.sum(dy.to(ACC_DTYPE) * unbiased, axis=0), mask=in_n)
        if SCALE_DY:  # DoRA: the LoRA chain rule runs on g * dy
            dy = dy.to(ACC_DTYPE) * tl.load(scale_ptr + offs_n, mask=in_n, other=0.0)[None, :]
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=in_n[:, None] & in_r[None, :], other=0.0)
        dy = dy.to(b.dtype)  # a no-op, or fp16/bf16 -> fp32 for fp32 adapters
        dxa = _mma(dy, b, dxa, UPCAST, LORA_PRECISION)
        if COMPUTE_DB:
            db = _mma(tl.trans(dy), xa, tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC_DTYPE), UPCAST, LORA_PRECISION)
            tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], db * scaling,
                          mask=in_n[:, None] & in_r[None, :])
    tl.store(dxa_ptr + offs_m[:, None] * stride_dxam + offs_r[None, :] * stride_dxar,
             (dxa * scaling).to(dxa_ptr.dtype.element_ty), mask=in_m[:, None] & in_r[None, :])


@triton.jit
def _lora_backward_dx_kernel(
    dy_ptr,  # *[M, N] output gradient, any strides
    w_ptr,  # *[N, K] frozen base weight, any strides
    a_ptr,  # *[R, K] lora_A, in the adapters' dtype
    x_ptr,  # *[M, K] saved input
    dxa_ptr,  # *[M, R] from launch 1, in the adapters' dtype
    dx_ptr,  # *[M, K] output: input gradient (written when COMPUTE_DX)
    da_ptr,  # *fp32 (fp64 for fp64 inputs) [R, K] contiguous, zeroed: dA accumulates here (when COMPUTE_DA)
    seed_ptr,  # *int64 one element: the forward's dropout seed
    scale_ptr,  # *[N] contiguous, in dy's dtype: DoRA's column scale g (read when SCALE_DY)
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dxam, stride_dxar, stride_dxm, stride_dxk,
    threshold,  # uint8 dropout threshold of the forward
    keep_scale,  # 1 / (1 - p), the float the forward scaled by
    COMPUTE_DX: tl.constexpr, COMPUTE_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, SCALE_DY: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, LORA_TO_X_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    k_start = pid_k * BLOCK_K
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
    in_m = offs_m < M
    in_k = offs_k < K

    # The LoRA work first: this tile's mask (drawn once), the dA partial sums and the LoRA term of dx as the
    # accumulator's starting value. All of it is dead before the main loop, which so holds no more registers
    # than a plain GEMM's (done after the loop, the mask, x and a second fp32 tile spilled on sm_90).
    if HAS_DROPOUT:
        random_bytes = _dropout_bytes(tl.load(seed_ptr), offs_m, k_start, K, BLOCK_M, BLOCK_K)
    # The rank in chunks of at most _RANK_CHUNK: at r=256 a whole [BLOCK_M, r] dxa tile and dA's [r, BLOCK_K]
    # product spilled every config with dA on sm_80 (fp16/bf16) and on sm_80/sm_90 with fp32 adapters. At
    # r <= 64 this is one chunk, and the loop (one trip) is gone before code generation. x's tile is loaded
    # (and masked) in each chunk, after dxa's: r / 64 loads from cache at r > 64 (at 64x64 tiles and N=4096,
    # 2% more than the main loop reads), and loaded once before the loop instead, it made ptxas schedule the
    # main loop 2 instructions longer at r=16 (sm_90, 111 instead of 109 non-matrix per step).
    RANK_CHUNK: tl.constexpr = _RANK_CHUNK if BLOCK_R > _RANK_CHUNK else BLOCK_R
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
    for r0 in tl.range(0, BLOCK_R, RANK_CHUNK, num_stages=1):
        offs_r = r0 + tl.arange(0, RANK_CHUNK)
        in_r = offs_r < R
        dxa = tl.load(dxa_ptr + offs_m[:, None] * stride_dxam + offs_r[None, :] * stride_dxar,
                      mask=in_m[:, None] & in_r[None, :], other=0.0)
        if COMPUTE_DA:
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=in_m[:, None] & in_k[None, :], other=0.0)
            if HAS_DROPOUT:
                x = tl.where(random_bytes >= threshold, x, 0.0).to(x.dtype)
            x = x.to(dxa.dtype)  # a no-op, or fp16/bf16 -> fp32 for fp32 adapters
            da = _mma(tl.trans(dxa), x, tl.zeros((RANK_CHUNK, BLOCK_K), dtype=ACC_DTYPE), UPCAST, LORA_PRECISION)
            if HAS_DROPOUT:
                da = da * keep_scale
            tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da,
                          mask=in_r[:, None] & in_k[None, :])
        if COMPUTE_DX:
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=in_r[:, None] & in_k[None, :], other=0.0)
            acc = _mma(dxa, a, acc, UPCAST, LORA_TO_X_PRECISION)

    if COMPUTE_DX:
        if HAS_DROPOUT:
            acc = tl.where(random_bytes >= threshold, acc * keep_scale, 0.0)
        else:
            # keep_scale is 1.0 here. Multiplying anyway (once per element, before the loop) took the dx main
            # loop from +16.8% to +14.7% non-matrix instructions over the plain GEMM on sm_90 at r=16 (the
            # static estimate): fed straight from a wgmma, the accumulator cost register copies in the loop.
            acc = acc * keep_scale
        # The main loop: a plain Triton GEMM's (dy @ W, or DoRA's (g * dy) @ W), reducing over N.
        acc = _gemm_main_loop(acc, dy_ptr, w_ptr, offs_m, offs_k, M, K, N, stride_dym, stride_dyn, stride_wn,
                              stride_wk, scale_ptr, BLOCK_N, UPCAST, PRECISION, SCALE_DY)
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=in_m[:, None] & in_k[None, :])


# ---- autotune spaces ---------------------------------------------------------------------------------------

def _dy_configs():
    """Row blocks for the memory-bound dy pass. No 128x64 tile: on 4 warps it spilled 16 bytes on sm_100 at r=64
    without dB (ptxas gave it 96 registers), on 8 warps 8 bytes at r=64 with dB; 128x128 on 8 warps did not."""
    shapes = [(64, 128, 3, 8), (128, 128, 3, 8), (64, 64, 3, 4), (32, 128, 3, 8), (32, 64, 3, 4), (16, 32, 2, 4)]
    return tuple(tuning.config(stages, warps, BLOCK_M=bm, BLOCK_N=bn) for bm, bn, stages, warps in shapes)


def _dy_fallbacks():
    """Tiles for where none of _dy_configs fits, at r=256: on gfx942's 64 KiB, 16x32 needed 65-66 KiB with dB for
    fp32 (and fp32 adapters), 132 KiB for fp64 (16x16: 33 and 66 KiB; unpipelined, 16 and 32); with fp32 adapters
    and no dB, 16x32 on 4 warps spilled 24 bytes on sm_100, and 16x16 on 4 warps 8 bytes on sm_90 (ptxas gave it
    96 registers for a [16, 256] fp32 accumulator and B's [16, 256] rows on the FMA units). On 8 warps, 16x16
    holds half as much per thread: 63 registers there, and no r=256 variant spills in backward_dy."""
    return tuple(tuning.config(stages, 8, BLOCK_M=16, BLOCK_N=16) for stages in (2, 1))


def _dx_configs():
    """The forward GEMM's tiles, with K in the role of N: dx is an (M, K) GEMM over N.

    The 32x32x32 tile takes 4 stages here (2 in the forward). On 2, ptxas held the dx kernel to 80 registers and
    spilled 8 bytes (the tile's row offsets, stored before the main loop and loaded after it) for DoRA with fp32
    adapters at r=1 without dropout on sm_80, where it is the only candidate; on 4, 95 registers and none. (Row-
    major order, GROUP_M=1, cured that variant but spilled LoRA's on sm_90 with fp16 and fp32 adapters.)"""
    def stages(c):
        return 4 if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) == (32, 32, 32) else c.num_stages

    return tuple(tuning.config(stages(c), c.num_warps, BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_K=c.kwargs["BLOCK_N"],
                               BLOCK_N=c.kwargs["BLOCK_K"], GROUP_M=c.kwargs["GROUP_M"]) for c in _GEMM_CONFIGS)


_DY_FALLBACKS = _dy_fallbacks()
_DY_CONFIGS = _dy_configs() + _DY_FALLBACKS
_DX_CONFIGS = _dx_configs()


def _prune_dy(configs, named_args, **meta):
    size = tuning.element_size(named_args["dy_ptr"].dtype)
    adapter_size = tuning.element_size(named_args["b_ptr"].dtype)
    acc_size = tuning.element_size(named_args["db_ptr"].dtype)
    block_r = meta["BLOCK_R"]
    operands_in_shared = not tuning.operands_in_registers(tuning.active_target())
    # DoRA's dm reads y's tile beside dy's (pipelined the same way) and holds both in fp32 for dy * (y - b).
    dm_tiles = 1 if meta.get("COMPUTE_DM") else 0

    def shared_bytes(cfg):
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        loads = tuning.pipeline_buffers(cfg) * ((1 + dm_tiles) * bm * bn * size + bn * block_r * adapter_size)
        if not meta["COMPUTE_DB"]:
            return loads
        # dB's product: where wgmma/tcgen05 read operands from shared memory, a transposed copy of dy and xa;
        # and its [BLOCK_N, r] result on its way to the atomics, in buffers of its own when the loads are
        # pipelined (gfx942, fp16 r=64: 32x128 on 8 warps, 3 stages, compiles to 48 KiB of loads + 32 KiB;
        # fp64 r=256 16x16: 66 KiB with 2 stages, 32 KiB with 1). Without dB the loads are all (sm_90: 144 KiB
        # for 128x128 at r=64, as estimated).
        operands = (bm * bn + bm * block_r) * adapter_size if operands_in_shared else 0
        result = bn * block_r * acc_size if tuning.pipelined(cfg) else 0
        return loads + operands + result

    # dB's product on FMA (fp32 adapters without TF32) reduces over BLOCK_M, and its dy^T operand stays in
    # registers where tuning.prune counts no operands (sm_90/sm_100): 128x128 on 8 warps spilled 728 bytes,
    # 128x64 on 4 warps 696 and 64x64 on 4 warps 8 to 48 (r <= 16); 32x128 and 32x64 none.
    dy_in_registers = (meta["COMPUTE_DB"] and not tuning.uses_tensor_cores(named_args["b_ptr"].dtype,
                                                                           meta["LORA_PRECISION"])
                       and operands_in_shared)

    def accumulators(cfg):
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        return (bm + bn) * block_r + (bm * bn if dy_in_registers else 0) + dm_tiles * 2 * bm * bn

    def operand_bytes(cfg):  # dy twice (as is and transposed, in the adapters' dtype), B and xa
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        return (2 * bm * bn + (bn + bm) * block_r) * adapter_size

    if dm_tiles and tuning.operands_in_registers(tuning.active_target()):
        # Measured, not modelled: with DoRA's dm where MMA operands pass through registers, 64x64 and 32x64 tiles
        # on 4 warps spilled 40-44 bytes on gfx942 (197 and 155 VGPRs, bf16 r=16), 64x128 on 8 warps 8 bytes on
        # sm_80; 32x128 on 8 warps did not. 32-row tiles leave M / 32 programs for this memory-bound pass.
        configs = [cfg for cfg in configs if (cfg.num_warps >= 8 and cfg.kwargs["BLOCK_M"] <= 32)
                   or cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] <= 16 * 32]
    # The products run in the adapters' dtype: fp32 adapters on fp16/bf16 dy are held to fp32's budgets.
    return tuning.prune(configs, dtype=named_args["b_ptr"].dtype, precision=meta["LORA_PRECISION"],
                        shared_bytes=shared_bytes, accumulators=accumulators, operand_bytes=operand_bytes,
                        fallbacks=_DY_FALLBACKS)


def _prune_dx(configs, named_args, **meta):
    size = tuning.element_size(named_args["dy_ptr"].dtype)
    adapter_size = tuning.element_size(named_args["a_ptr"].dtype)
    block_r = min(meta["BLOCK_R"], _RANK_CHUNK.value)  # the LoRA prologue's tiles are this wide (see the kernel)

    def shared_bytes(cfg):
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        main_loop = tuning.pipeline_buffers(cfg) * (bm + bk) * bn * size
        # The LoRA prologue's tiles (dxa, A, x and the mask bytes) get buffers of their own (the compiled
        # sizes on sm_90 add up: 256 KiB at r=256 for 128x128x64 with 4 stages).
        prologue = (bm * block_r + block_r * bk + bm * bk) * adapter_size + bm * bk
        return main_loop + prologue

    def accumulators(cfg):
        # The LoRA prologue holds the fp32 tile with the x tile and the mask bytes (half as much again):
        # counted as 1.5 tiles, 128x128 tiles on 4 warps and 128x256 on 8 went over (255 registers + spills).
        # With fp32 adapters, dA's product also holds x's tile in fp32 (in registers even on sm_90: with r
        # rows it is an mma.sync, not a wgmma): 128x128 on 8 warps and 128x64 on 4 spilled without this.
        # dxa's tile, the register operand of the LoRA term's product, counts at an element a register (bf16
        # pairs plus their fp32 copies): 128x64 on 4 warps spilled 8 bytes at r=64 while 64x128 on 4 warps and
        # 128x128 on 8 (202-206 registers, sm_90 bf16) did not. A's tile is a shared-memory operand where the
        # operands are (sm_90, sm_100); operand_bytes counts it where they are not.
        bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
        x_in_fp32 = bm * bk if adapter_size > size else 0
        return bm * bk * 3 // 2 + bm * block_r * adapter_size // 2 + x_in_fp32

    def operand_bytes(cfg):  # dxa and A (dx's LoRA term), dxa^T and x (dA), in the adapters' dtype
        bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
        return (2 * bm * block_r + block_r * bk + bm * bk) * adapter_size

    if not meta["COMPUTE_DX"]:
        # dA alone has no main loop: a pass over x that bigger tiles do not speed up, and 128x128 on 8 warps
        # spilled 8 bytes on sm_100 at r=64 (fp16/bf16, dropout 0).
        configs = [cfg for cfg in configs if cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_K"] <= 64 * 128]
    return tuning.prune(configs, dtype=named_args["dy_ptr"].dtype, precision=meta["PRECISION"],
                        shared_bytes=shared_bytes, accumulators=accumulators, operand_bytes=operand_bytes)


# ---- launcher ----------------------------------------------------------------------------------------------

def backward_launches(dy, x, weight, lora_A, lora_B, xa, dxa, dx, da, db, unused, seed, *, scaling, dropout_p,
                      interpreted, dora=None):
    """The launches of the backward for these tensors (see `Launch`); nothing is run.

    dxa: (M, r) scratch; dx, da, db: the outputs, or None where not wanted (then `unused`, a one-element
    accumulator-dtype tensor that aliases nothing, stands in: autotuning zeroes reset_to_zero arguments).
    dora: a `DoraBackward` for DoRA's backward (dy scaled by g, and dm), or None.
    """
    M, K = x.shape
    N, R = lora_B.shape
    dots = lora_dot_options(x.dtype, lora_A.dtype, interpreted)
    block_r = rank_block(R)
    threshold = drop_threshold(dropout_p)
    scale = dora.column_scale if dora is not None else unused
    y = dora.y if dora is not None and dora.dm is not None else dy
    bias = dora.bias if dora is not None and dora.bias is not None else unused
    launches = [Launch(
        name="backward_dy", kernel=_lora_backward_dy_kernel,
        args=(dy, lora_B, xa, dxa, db if db is not None else unused, y, bias, scale,
              dora.dm if dora is not None and dora.dm is not None else unused, M, N, R,
              dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1),
              xa.stride(0), xa.stride(1), dxa.stride(0), dxa.stride(1), y.stride(0), y.stride(1), float(scaling)),
        meta=dict(COMPUTE_DB=db is not None, SCALE_DY=dora is not None,
                  COMPUTE_DM=dora is not None and dora.dm is not None,
                  HAS_BIAS=dora is not None and dora.bias is not None, BLOCK_R=block_r,
                  **{key: value for key, value in dots.items() if key != "LORA_TO_X_PRECISION"}),
        grid=lambda c: (triton.cdiv(M, c["BLOCK_M"]),),
        configs=_DY_CONFIGS, prune=_prune_dy, key=("M", "N", "BLOCK_R", "SCALE_DY", "COMPUTE_DM"),
        reset_to_zero=("db_ptr", "dm_ptr"),
        interpreter_config=dict(BLOCK_M=small_block(M), BLOCK_N=small_block(N)))]
    if dx is not None or da is not None:
        launches.append(Launch(
            name="backward_dx", kernel=_lora_backward_dx_kernel,
            args=(dy, weight, lora_A, x, dxa, dx if dx is not None else unused, da if da is not None else unused,
                  seed, dora.column_scale.to(dy.dtype) if dora is not None else unused, M, N, K, R,
                  dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
                  lora_A.stride(0), lora_A.stride(1), x.stride(0), x.stride(1), dxa.stride(0), dxa.stride(1),
                  dx.stride(0) if dx is not None else 0, dx.stride(1) if dx is not None else 0,
                  threshold, 1.0 / (1.0 - dropout_p)),
            meta=dict(COMPUTE_DX=dx is not None, COMPUTE_DA=da is not None, HAS_DROPOUT=threshold > 0,
                      SCALE_DY=dora is not None, BLOCK_R=block_r,
                      **lora_dot_options(x.dtype, lora_A.dtype, interpreted, split_precision=True)),
            grid=lambda c: (triton.cdiv(M, c["BLOCK_M"]) * triton.cdiv(K, c["BLOCK_K"]),),
            configs=_DX_CONFIGS, prune=_prune_dx, key=("M", "N", "K", "BLOCK_R", "SCALE_DY"),
            reset_to_zero=("da_ptr",),
            interpreter_config=dict(BLOCK_M=small_block(M), BLOCK_K=small_block(K), BLOCK_N=small_block(N),
                                    GROUP_M=8)))
    return launches


@dataclasses.dataclass(frozen=True)
class DoraBackward:
    """What DoRA's backward adds to LoRA's: dy is scaled by column_scale (g, (N,) contiguous, accumulator
    dtype; rounded to dy's dtype for the dx GEMM, whose main loop scales dy's tiles in their own dtype) for every
    LoRA gradient, and, when dm is given ((N,) zeroed, accumulator dtype), sum over rows of
    dy * (y - bias) accumulates into it. y: the forward's output (M, N); bias: (N,) or None."""

    column_scale: torch.Tensor
    y: torch.Tensor
    bias: Optional[torch.Tensor]
    dm: Optional[torch.Tensor]


def lora_backward(dy, x, weight, lora_A, lora_B, xa, *, scaling, dropout_p, seed,
                  needs_dx=True, needs_dA=True, needs_dB=True, dora=None):
    """Run the fused backward.

    dy: (M, N); x: (M, K) the forward's input; weight: (N, K); lora_A: (r, K); lora_B: (N, r);
    xa: (M, r) from the forward, in the adapters' dtype; seed: the forward's seed. Any strides are accepted.
    dora: a `DoraBackward`, or None. Returns (dx or None, dA or None, dB or None) in the dtypes of x, lora_A
    and lora_B.
    """
    check_lora_inputs(x, weight, None, lora_A, lora_B)
    M, K = x.shape
    N, R = lora_B.shape
    for name, tensor, shape, dtype in (("dy", dy, (M, N), x.dtype), ("xa", xa, (M, R), lora_A.dtype)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != dtype or tensor.device != x.device:
            raise TypeError(f"{name} must be {dtype} on {x.device}, got {tensor.dtype} on {tensor.device}")
    device = x.device
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if needs_dx else None
    acc_dtype = accumulator_dtype(x.dtype)
    da = torch.zeros((R, K), dtype=acc_dtype, device=device) if needs_dA else None
    db = torch.zeros((N, R), dtype=acc_dtype, device=device) if needs_dB else None
    if M == 0 or N == 0 or K == 0:
        if dx is not None:
            dx.zero_()
        return dx, _cast(da, lora_A.dtype), _cast(db, lora_B.dtype)

    dxa = torch.empty((M, R), dtype=lora_A.dtype, device=device)
    unused = torch.zeros(1, dtype=acc_dtype, device=device)
    launches = backward_launches(dy, x, weight, lora_A, lora_B, xa, dxa, dx, da, db, unused,
                                 seed_tensor(seed, device), scaling=scaling, dropout_p=dropout_p,
                                 interpreted=is_interpreted(_lora_backward_dy_kernel), dora=dora)
    for launch in launches:
        run(launch, x)
    return dx, _cast(da, lora_A.dtype), _cast(db, lora_B.dtype)


def _cast(grad, dtype):
    return None if grad is None else grad.to(dtype)
