"""The floor for the static estimate: a plain Triton matmul, as the Triton tutorial writes one.

`c = a @ b` with the tutorial's habits: GROUP_M-grouped tiles, pointers built once and advanced by BLOCK_K
each step, rows and columns wrapped modulo M and N instead of masked (only the ragged K step is masked),
fp32 accumulation cast once at the store. lorafuse's GEMM kernels are held to this loop: same tiles, same
compiler, so the difference between the two is what the LoRA work costs.

`plain_gemm_launches` builds the two products of a frozen linear layer's training step, x @ W^T and dy @ W,
as `Launch` objects over the forward GEMM's autotune space, so lorafuse.inspect compiles them exactly as it
compiles lorafuse's own launches. Compile-only: nothing here is run by the library.
"""

import torch
import triton
import triton.language as tl

from lorafuse.kernels import Launch, tuning
from lorafuse.kernels.common import _grouped_tile, dot_options
from lorafuse.kernels.forward import _GEMM_CONFIGS


@triton.jit
def _plain_gemm_kernel(
    a_ptr,  # *[M, K] left operand, any strides
    b_ptr,  # *[K, N] right operand, any strides (a transposed weight view works)
    c_ptr,  # *[M, N] output
    M, N, K,  # problem sizes
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    # Wrapping rows and columns (the tutorial's `% M`) keeps every load in bounds without a mask; the
    # wrapped rows are computed and not stored.
    offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(c_ptr + offs_cm[:, None] * stride_cm + offs_cn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


def _prune_plain(configs, named_args, **meta):
    """The forward GEMM's configs that fit the active target with a plain GEMM's shared memory (the stages'
    A and B tiles) and accumulator."""
    size = tuning.element_size(named_args["a_ptr"].dtype)

    def shared_bytes(cfg):
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        return max(cfg.num_stages, 2) * (bm + bn) * bk * size

    def accumulators(cfg):
        return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"]

    return tuning.prune(configs, dtype=named_args["a_ptr"].dtype, precision=meta["PRECISION"],
                        shared_bytes=shared_bytes, accumulators=accumulators)


def _launch(name, a, b, c):
    M, K = a.shape
    N = b.shape[1]
    dots = dot_options(a.dtype, interpreted=False)
    return Launch(
        name=name, kernel=_plain_gemm_kernel,
        args=(a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1)),
        meta=dict(PRECISION=dots["PRECISION"], ACC_DTYPE=dots["ACC_DTYPE"]),
        grid=lambda cfg: (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),),
        configs=_GEMM_CONFIGS, prune=_prune_plain, key=("M", "N", "K"),
        interpreter_config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8))


def plain_gemm_launches(*, dtype: torch.dtype, M: int, K: int, N: int) -> list:
    """The launches of a frozen linear layer's two GEMMs, built from CPU tensors of the real shapes (storage is
    never touched): "plain_x@W^T" (M, K) x (K, N) -> (M, N) with W^T a transposed (N, K) weight view, and
    "plain_dy@W" (M, N) x (N, K) -> (M, K)."""
    for name, value in (("M", M), ("K", K), ("N", N)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
    x, weight, dy = (torch.empty(shape, dtype=dtype) for shape in ((M, K), (N, K), (M, N)))
    return [_launch("plain_x@W^T", x, weight.t(), torch.empty((M, N), dtype=dtype)),
            _launch("plain_dy@W", dy, weight, torch.empty((M, K), dtype=dtype))]
