"""Autotune spaces and the pruning that keeps them inside what the target GPU can hold.

Every kernel's config list is pruned before anything is compiled (`early_config_prune`): a config stays
when its estimated shared memory fits the target (163 KiB on sm_80, 227 KiB on sm_90/sm_100, 99 KiB on
consumer parts, 64 KiB of LDS on AMD CDNA) and its fp32 accumulators fit the register budget of its warps.
The estimates are checked against the compiler's own numbers by tests/test_gpu_compile.py (every config
that survives pruning must compile within the limit, spill-free for fp16/bf16).
"""

import torch
import triton

#: Shared memory (bytes) a block may use, by CUDA compute capability; AMD gfx9 CDNA parts have 64 KiB LDS.
_CUDA_SHARED = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024,
                103: 227 * 1024, 120: 99 * 1024}
_HIP_SHARED = 64 * 1024

#: fp32 accumulator registers a thread may hold across a main loop. Tensor-core tiles: 128 of the 255
#: (the rest hold addresses, operands in flight and the epilogue). FMA tiles (fp32 without TF32, fp64) also
#: keep operand fragments in registers, so their accumulators get far less.
_TENSOR_CORE_ACC_REGS = 128
_FMA_ACC_REGS = 32


def active_target():
    """The `GPUTarget` Triton compiles for now (a real GPU, or the stand-in driver of lorafuse.inspect)."""
    return triton.runtime.driver.active.get_current_target()


def shared_memory_limit(target) -> int:
    """Bytes of shared memory (LDS on AMD) one program may use on `target`."""
    if target.backend == "hip":
        return _HIP_SHARED
    return _CUDA_SHARED.get(target.arch, 99 * 1024)


def warp_size(target) -> int:
    return target.warp_size


def uses_tensor_cores(dtype: torch.dtype, precision: str) -> bool:
    """fp16/bf16 tiles, and fp32 tiles with TF32 allowed, run on matrix cores; fp32 "ieee" and fp64 on FMA."""
    return dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and precision == "tf32")


def config(num_stages, num_warps, **tiles):
    return triton.Config(tiles, num_stages=num_stages, num_warps=num_warps)


def operands_in_registers(target) -> bool:
    """Whether MMA operands pass through registers: mma.sync on Ampere/Ada (HMMA) and MFMA on AMD do; Hopper's
    wgmma and Blackwell's tcgen05 read them from shared memory."""
    return target.backend == "hip" or target.arch < 90


def accumulators_in_tensor_memory(target) -> bool:
    """Whether MMA accumulators live in tensor memory (Blackwell's tcgen05, sm_100 and later): the epilogue
    then reads them back one row per thread."""
    return target.backend == "cuda" and target.arch >= 100


def prune(configs, *, dtype, precision, shared_bytes, accumulators, operand_bytes=lambda cfg: 0, fallbacks=()):
    """The configs of `configs` that fit the active target.

    shared_bytes(config) -> estimated shared memory; accumulators(config) -> fp32 accumulator elements the
    program holds at once; operand_bytes(config) -> bytes of MMA operand tiles held at the same time, counted
    where the target keeps operands in registers. fallbacks: configs of `configs` kept only when none of the
    others fits (tiles too small to be worth timing where a bigger one fits). When nothing fits, the one with the
    least shared memory is kept, so that a launch still has a config and the compiler, not the pruning, says
    what is wrong.
    """
    target = active_target()
    limit = shared_memory_limit(target)
    budget = _TENSOR_CORE_ACC_REGS if uses_tensor_cores(dtype, precision) else _FMA_ACC_REGS
    register_scale = 2 if dtype == torch.float64 else 1  # an fp64 value takes two registers
    operand_scale = 0.25 if operands_in_registers(target) else 0.0  # 4 bytes a register

    def fits(cfg):
        threads = cfg.num_warps * warp_size(target)
        registers = (accumulators(cfg) * register_scale + operand_bytes(cfg) * operand_scale) / threads
        return shared_bytes(cfg) <= limit and registers <= budget

    kept = ([cfg for cfg in configs if cfg not in fallbacks and fits(cfg)]
            or [cfg for cfg in configs if cfg in fallbacks and fits(cfg)])
    return kept or [min(configs, key=shared_bytes)]


def pipeline_buffers(cfg) -> int:
    """Tile buffers the software pipeline keeps in shared memory for `cfg` on the active target: num_stages on
    Hopper and Blackwell (at least 2: the compiler double-buffers), num_stages - 1 with Ampere's cp.async
    pipeline and AMD's stream pipeliner (seen in the compiled sizes: on sm_80 the forward's 128x128x64 with 4
    stages takes 96 KiB, 3 x 32, where sm_90 takes 136; on gfx942 likewise)."""
    target = active_target()
    if target.backend == "hip" or target.arch < 90:
        return max(cfg.num_stages - 1, 1)
    return max(cfg.num_stages, 2)


def pipelined(cfg) -> bool:
    """Whether the loads of `cfg` are software-pipelined on the active target: always on NVIDIA (see
    pipeline_buffers), from num_stages=2 on with AMD's stream pipeliner."""
    return active_target().backend != "hip" or cfg.num_stages > 1


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
