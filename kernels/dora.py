"""DoRA on the LoRA kernels: the weight norms, and the forward and backward launchers.

DoRA's y = g * (x @ W^T + s * xa @ B^T) + b, g = m / ||W + s B A|| (row norms, detached), adds to LoRA's kernels:
- `_dora_weight_norm_kernel`: ||W + s B A|| per row in one pass over W. Each program forms its rows of
  W + s B A one `[BLOCK_N, BLOCK_K]` tile at a time (a rank-r product into registers, in rank chunks where B's
  rows would spill) and sums the squares, in fp32: B A is never in memory. Forming the tile, rather than
  expanding ||W||^2 + 2s (W A^T).B + s^2 ||B A||^2, has no cancellation when W + s B A is small against W, for the
  same one read of W.
- the forward GEMM multiplies its accumulator by g in the epilogue, before the bias;
- the backward's dy kernel sums dy * (y - b) over rows into dm (y is the saved output: y - b = g * u, so
  dm = sum(dy * u) / ||.|| = sum(dy * (y - b)) / m) and runs LoRA's chain rule on g * dy; the dx GEMM scales
  dy's tiles by g as its main loop loads them (no scaled copy of dy in memory).
"""

import torch
import triton
import triton.language as tl

from lorafuse.checks import accumulator_dtype, check_lora_inputs

from . import tuning
from .backward import _RANK_CHUNK, DoraBackward, lora_backward
from .common import _mma, is_interpreted, lora_dot_options, rank_block, small_block
from .forward import lora_forward
from .launches import Launch, run


@triton.jit
def _dora_weight_norm_kernel(
    w_ptr,  # *[N, K] frozen base weight, any strides
    a_ptr,  # *[R, K] lora_A
    b_ptr,  # *[N, R] lora_B
    norm_ptr,  # *[N] output, fp32 (fp64 for fp64 weights): ||W + s B A|| per row
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    scaling,
    UPCAST: tl.constexpr, LORA_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, RANK_CHUNK: tl.constexpr,
):
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    in_n = offs_n < N
    ONE_CHUNK: tl.constexpr = RANK_CHUNK >= BLOCK_R
    if ONE_CHUNK:  # B's rows stay in registers through the loop, and W's loads are pipelined
        offs_r = tl.arange(0, BLOCK_R)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=in_n[:, None] & (offs_r < R)[None, :], other=0.0)
    squares = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_k = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=in_n[:, None] & in_k[None, :], other=0.0)
        product = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
        if ONE_CHUNK:
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                        mask=(offs_r < R)[:, None] & in_k[None, :], other=0.0)
            product = _mma(b, a, product, UPCAST, LORA_PRECISION)
        else:  # the rank RANK_CHUNK columns at a time (see weight_norm_launch)
            for r0 in tl.range(0, BLOCK_R, RANK_CHUNK, num_stages=1):
                offs_r = r0 + tl.arange(0, RANK_CHUNK)
                in_r = offs_r < R
                b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                            mask=in_n[:, None] & in_r[None, :], other=0.0)
                a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                            mask=in_r[:, None] & in_k[None, :], other=0.0)
                product = _mma(b, a, product, UPCAST, LORA_PRECISION)
        merged = w.to(ACC_DTYPE) + scaling * product
        squares += tl.sum(merged * merged, axis=1)
    tl.store(norm_ptr + offs_n, tl.sqrt(squares), mask=in_n)


def _norm_configs():
    """Row blocks for a memory-bound pass over W: N / BLOCK_N programs (256 at N=4096 with 16 rows). Neither 32-row
    tiles nor 16x128: 32x64 spilled 8 bytes on sm_100 on 4 warps (fp16, r=64) and on 8 (bf16, r=1), 120 on gfx942
    (fp32 adapters, r=64); 16x128 on 4 warps 16 bytes on sm_100 (fp16, r <= 16)."""
    shapes = [(16, 64, 2, 4), (64, 64, 3, 8)]
    return tuple(tuning.config(stages, warps, BLOCK_N=bn, BLOCK_K=bk) for bn, bk, stages, warps in shapes)


#: For where neither fits: sm_80 with fp32 adapters, whose split-precision operands the pruning counts in registers
#: against the FMA budget (16x16: 164 registers at r=256, none spilled); before the rank chunks, gfx942 at r=256
#: with fp32 adapters, where A's [r, 64] tile alone was 64 KiB of LDS.
_NORM_FALLBACKS = (tuning.config(2, 4, BLOCK_N=16, BLOCK_K=16),)
_NORM_CONFIGS = _norm_configs() + _NORM_FALLBACKS


def _prune_norm(configs, named_args, **meta):
    size = tuning.element_size(named_args["w_ptr"].dtype)
    adapter_size = tuning.element_size(named_args["a_ptr"].dtype)
    block_r = meta["RANK_CHUNK"]  # the kernel's B and A tiles are this wide

    def shared_bytes(cfg):
        bn, bk = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        return tuning.pipeline_buffers(cfg) * (bn * size + block_r * adapter_size) * bk + bn * block_r * adapter_size

    def accumulators(cfg):  # the product tile and the merged tile, both fp32
        return 2 * cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"]

    def operand_bytes(cfg):  # B's rows (held through the loop) and A's tile
        return (cfg.kwargs["BLOCK_N"] + cfg.kwargs["BLOCK_K"]) * block_r * adapter_size

    return tuning.prune(configs, dtype=named_args["a_ptr"].dtype, precision=meta["LORA_PRECISION"],
                        shared_bytes=shared_bytes, accumulators=accumulators, operand_bytes=operand_bytes,
                        fallbacks=_NORM_FALLBACKS)


def weight_norm_launch(weight, lora_A, lora_B, norm, *, scaling, interpreted) -> Launch:
    """The launch of `_dora_weight_norm_kernel` for these tensors (see `Launch`); nothing is run."""
    N, K = weight.shape
    R = lora_A.shape[0]
    # split_precision: with fp32 adapters (TF32 off) B @ A runs as 3xTF32 on the matrix cores (bf16x6 on AMD),
    # about 2^-22 relative, instead of on the FMA units, which at r = 64 would take longer than the read of W.
    dots = lora_dot_options(weight.dtype, lora_A.dtype, interpreted, split_precision=True)
    block_r = rank_block(R)
    # B's [BLOCK_N, r] rows are loaded once and held through the K loop, unless they spill: at r > 64 in split
    # precision (B's rows with their TF32 or bf16 parts spilled 592 to 2912 bytes in every config, r=256 on
    # sm_80/sm_90/sm_100/gfx942). There each K step walks the rank 64 columns at a time, re-reading B's rows
    # from cache (none spill). The nested loop is not software-pipelined, so elsewhere B stays whole.
    split = dots["LORA_PRECISION"] in ("tf32x3", "bf16x6")
    rank_chunk = _RANK_CHUNK.value if split and block_r > _RANK_CHUNK.value else block_r
    return Launch(
        name="dora_norm", kernel=_dora_weight_norm_kernel,
        args=(weight, lora_A, lora_B, norm, N, K, R, weight.stride(0), weight.stride(1), lora_A.stride(0),
              lora_A.stride(1), lora_B.stride(0), lora_B.stride(1), float(scaling)),
        meta=dict(UPCAST=dots["UPCAST"], LORA_PRECISION=dots["LORA_PRECISION"], ACC_DTYPE=dots["ACC_DTYPE"],
                  BLOCK_R=block_r, RANK_CHUNK=rank_chunk),
        grid=lambda c: (triton.cdiv(N, c["BLOCK_N"]),),
        configs=_NORM_CONFIGS, prune=_prune_norm, key=("N", "K", "BLOCK_R"),
        interpreter_config=dict(BLOCK_N=small_block(N, 32), BLOCK_K=small_block(K)))


def dora_weight_norm(weight, lora_A, lora_B, *, scaling):
    """||W + scaling * B @ A|| per row of weight (N, K), any strides: (N,) in fp32 (fp64 for fp64 weights)."""
    N, K = weight.shape
    check_lora_inputs(weight.new_empty((0, K)), weight, None, lora_A, lora_B)
    norm = torch.empty(N, dtype=accumulator_dtype(weight.dtype), device=weight.device)
    if N == 0:
        return norm
    if K == 0:
        return norm.zero_()
    run(weight_norm_launch(weight, lora_A, lora_B, norm, scaling=scaling,
                           interpreted=is_interpreted(_dora_weight_norm_kernel)), weight)
    return norm


def dora_forward(x, weight, bias, lora_A, lora_B, column_scale, *, scaling, dropout_p, seed):
    """y = g * (x @ W^T + s * xa @ B^T) + b and xa = dropout(x) @ A^T: `lora_forward` with the column scale
    g ((N,), fp32; fp64 for fp64) applied in the GEMM's epilogue."""
    _check_column_vector("column_scale", column_scale, weight, accumulator_dtype(x.dtype))
    return lora_forward(x, weight, bias, lora_A, lora_B, scaling=scaling, dropout_p=dropout_p, seed=seed,
                        column_scale=column_scale)


def dora_backward(dy, x, weight, bias, lora_A, lora_B, column_scale, magnitude, xa, y, *, scaling, dropout_p, seed,
                  needs_dx=True, needs_dA=True, needs_dB=True, needs_dm=True):
    """(dx, dA, dB, dm), None where not needed: LoRA's gradients of g * dy, and dm = sum(dy * (y - b)) / m."""
    _check_column_vector("column_scale", column_scale, weight, accumulator_dtype(x.dtype))
    if tuple(y.shape) != tuple(dy.shape):
        raise ValueError(f"y must have dy's shape {tuple(dy.shape)}, got {tuple(y.shape)}")
    dm = torch.zeros_like(column_scale) if needs_dm else None
    dora = DoraBackward(column_scale=column_scale.contiguous(), y=y, bias=bias, dm=dm)
    dx, dA, dB = lora_backward(dy, x, weight, lora_A, lora_B, xa, scaling=scaling, dropout_p=dropout_p, seed=seed,
                               needs_dx=needs_dx, needs_dA=needs_dA, needs_dB=needs_dB, dora=dora)
    if dm is not None:
        dm = (dm / magnitude.to(dm.dtype)).to(magnitude.dtype)
    return dx, dA, dB, dm


def _check_column_vector(name, tensor, weight, dtype):
    if tuple(tensor.shape) != (weight.shape[0],) or tensor.dtype != dtype or tensor.device != weight.device:
        raise ValueError(f"{name} must be ({weight.shape[0]},) {dtype} on {weight.device}, got "
                         f"{tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
