"""Pieces every LoRA kernel shares: the tile product and the choice of tile sizes."""

import contextlib

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b, accumulated in acc's dtype.

    UPCAST: Triton's interpreter returns garbage for bf16 `tl.dot` (Triton 3.9), so interpreted bf16
    tiles go through fp32. PRECISION: "ieee" keeps fp32 inputs exact, as torch does unless TF32 is on.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gemm_main_loop(acc, a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                    a_scale_ptr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    SCALE_A: tl.constexpr):
    """acc += a[offs_m, :] @ b[:, offs_n] over the reduction dim K: the main loop of both GEMM kernels.

    a: (M, K), b: (K, N), any strides. As lean as a plain Triton GEMM's loop: rows and columns wrap (the
    tutorial's `% M`) so only the ragged last step needs a mask, and the pointers (int64 offsets, computed
    once) advance by BLOCK_K; recomputing masked int64 offsets every step cost 8% more non-matrix
    instructions than the plain GEMM on sm_90. (tl.cast, not .to: a unit stride arrives as the specialised
    constant 1, which has no .to.)
    SCALE_A: a's columns are multiplied by a_scale_ptr[0:K] (contiguous, in a's dtype) as they are loaded: DoRA's
    dx GEMM, (g * dy) @ W, without a scaled copy of dy in memory. The product is taken in a's dtype: through
    fp32 it cost 240 non-matrix instructions per step against the plain GEMM's 95 on sm_90 (bf16, 128x128x64),
    which made the loop issue-bound (340 us against 289 us of tensor work, static estimate); in bf16, 167.
    """
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn
    a_step = BLOCK_K * tl.cast(stride_ak, tl.int64)
    b_step = BLOCK_K * tl.cast(stride_bk, tl.int64)
    if SCALE_A:
        a_scale_ptrs = a_scale_ptr + offs_k
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0.0)
        if SCALE_A:
            a_scale = tl.load(a_scale_ptrs, mask=offs_k < K - k0, other=0.0)
            a = a * a_scale[None, :]
            a_scale_ptrs += BLOCK_K
        acc = _mma(a, b, acc, UPCAST, PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` over an (M, N) grid of tiles, in the grouped order of the Triton
    matmul tutorial: GROUP_M row blocks walk the columns together, so they share tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_m, (pid % group_size) // group_m


def device_guard(tensor: torch.Tensor):
    """Make `tensor`'s GPU current for a launch: Triton launches on the current device and stream, not
    the tensor's, so a layer on cuda:1 (device_map="auto") would otherwise run on cuda:0."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def is_interpreted(kernel) -> bool:
    """Whether `kernel` was built by Triton's interpreter (TRITON_INTERPRET=1 at import time)."""
    return isinstance(kernel, InterpretedFunction)


def dot_options(dtype: torch.dtype, interpreted: bool) -> dict:
    """The UPCAST, PRECISION and ACC_DTYPE meta-parameters for tiles of `dtype`.

    Accumulators are fp32, and fp64 for fp64 inputs (gradcheck needs the full precision).
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        precision = "ieee"
    elif dtype == torch.float64:
        precision = "ieee"
    else:
        precision = "tf32"
    return {"UPCAST": interpreted and dtype == torch.bfloat16, "PRECISION": precision,
            "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32}


def lora_dot_options(x_dtype: torch.dtype, adapter_dtype: torch.dtype, interpreted: bool, *,
                     split_precision: bool = False) -> dict:
    """dot_options for x's tiles, plus the precisions of the low-rank products.

    LORA_PRECISION: products whose result is kept in the adapters' dtype (xa, dxa, dA, dB). With fp32
    adapters on a half-precision model they follow torch's fp32 rule ("ieee" unless TF32 is allowed), as
    PEFT's fp32 matmuls do. `split_precision` (the dx GEMM kernel, whose fp32 FMA product for dA spilled
    every large tile, up to 1.4 KiB of stack on sm_90) runs them on the matrix cores in split precision
    instead: "tf32x3" on NVIDIA (CUTLASS's 3xTF32, about 2^-22 relative; fp16 and bf16 operands are exact
    in TF32) and "bf16x6" on AMD. The interpreter computes every precision in fp32.
    LORA_TO_X_PRECISION: the products added into a half-precision output (s * xa @ B^T into y, dxa @ A into
    dx): "tf32" suffices there (2^-11 relative against the output's own rounding, 2^-8 bf16 or 2^-11 fp16).
    """
    options = dot_options(x_dtype, interpreted)
    if adapter_dtype == x_dtype:
        return {**options, "LORA_PRECISION": options["PRECISION"], "LORA_TO_X_PRECISION": options["PRECISION"]}
    precision = dot_options(adapter_dtype, interpreted)["PRECISION"]
    if precision == "ieee" and split_precision and not interpreted:
        import triton.runtime

        precision = "bf16x6" if triton.runtime.driver.active.get_current_target().backend == "hip" else "tf32x3"
    return {**options, "LORA_PRECISION": precision, "LORA_TO_X_PRECISION": "tf32"}


def rank_block(r: int) -> int:
    """Tile width for the rank dimension: `tl.dot` needs at least 16, and a power of two."""
    return max(16, triton.next_power_of_2(r))


def small_block(size: int, largest: int = 64) -> int:
    """A power-of-two tile in [16, largest] that covers `size` when it can (interpreter configs)."""
    return min(largest, max(16, triton.next_power_of_2(size)))
