"""A static time estimate of lorafuse's kernels from their compiled code: an estimate, not a measurement.

For one kernel in one config, compiled for a target without a GPU (compile.py):

- the main loop: the smallest SASS loop holding matrix instructions (sass_loops.py), its warp instructions per
  iteration by class and its matrix work; its trips are those of the TTGIR loop that holds the dots
  (ttgir_scan.py: bounds evaluated from the launch's arguments), divided by the SASS unroll factor (the loop
  counter's step over the TTGIR step; 1 when neither Triton nor ptxas unrolled). Code outside the main loop
  counts once per program;
- programs: the launch grid for the config;
- tensor time = matrix FLOPs the program's instructions do x programs / the target's dense tensor peak for the
  dtype. Counted from the instructions, so tensor-core work that warps repeat (a tile too narrow for its
  warps) is counted too;
- issue time = warp instructions x programs / (SMs x 4 schedulers x clock): a floor that assumes each
  scheduler has a ready warp every cycle (no latency, no dual issue, predicated-off code counted);
- memory time = compulsory DRAM bytes / bandwidth: every tensor the kernel uses read once and every output
  written once. For the GEMMs this assumes the GROUP_M-grouped tile order keeps re-read tiles in L2 (50 MB on
  an H100); atomics are taken to resolve in L2 and are reported apart (`atomic_bytes`), not timed;
- tail: the busiest SM runs ceil(programs / SMs) programs, so the tensor and issue terms are multiplied by
  ceil(programs / SMs) * SMs / programs (a last partial wave). Memory bandwidth is shared, so not that term;
- the kernel's estimate is the largest of the three terms: within a kernel they overlap perfectly; kernels
  run one after another and launch latency is not counted.

The config chosen for a kernel is the one with the smallest estimate among those that fit (compiled,
spill-free, within shared memory; near-ties go to the smallest sum of terms, see `choose`): it plays the
autotuner's role, it does not predict the autotuner's pick.
"""

import dataclasses
import math
import re
from typing import Optional

from . import sass_loops, ttgir_scan


@dataclasses.dataclass(frozen=True)
class Machine:
    """Nominal throughput of one GPU, the constants of the model."""

    arch: str
    name: str
    sms: int
    schedulers: int  # warp schedulers per SM, each issues one warp instruction per cycle
    clock_hz: float
    tensor_flops: dict  # "fp16" (also bf16), "tf32", "fp64" -> dense FLOP/s
    memory_bytes_per_s: float
    registers_per_sm: int
    shared_per_sm: int  # bytes; each block also reserves 1 KiB
    max_warps_per_sm: int
    max_blocks_per_sm: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


#: Datasheet figures (dense, no sparsity). The H100 clock is the one the design notes use for the issue rate.
MACHINES = {
    "sm_80": Machine("sm_80", "NVIDIA A100 SXM4 80GB (nominal)", sms=108, schedulers=4, clock_hz=1.41e9,
                     tensor_flops={"fp16": 312e12, "tf32": 156e12, "fp64": 19.5e12}, memory_bytes_per_s=2.039e12,
                     registers_per_sm=65536, shared_per_sm=164 * 1024, max_warps_per_sm=64, max_blocks_per_sm=32),
    "sm_90": Machine("sm_90", "NVIDIA H100 SXM5 (nominal)", sms=132, schedulers=4, clock_hz=1.755e9,
                     tensor_flops={"fp16": 989e12, "tf32": 495e12, "fp64": 67e12}, memory_bytes_per_s=3.35e12,
                     registers_per_sm=65536, shared_per_sm=228 * 1024, max_warps_per_sm=64, max_blocks_per_sm=32),
    # B200 figures are less settled than the others: 148 SMs at about 1.98 GHz boost, 2.25 PFLOP/s bf16 dense.
    "sm_100": Machine("sm_100", "NVIDIA B200 (nominal, approximate)", sms=148, schedulers=4, clock_hz=1.98e9,
                      tensor_flops={"fp16": 2250e12, "tf32": 1100e12, "fp64": 37e12}, memory_bytes_per_s=8.0e12,
                      registers_per_sm=65536, shared_per_sm=228 * 1024, max_warps_per_sm=64,
                      max_blocks_per_sm=32),
}

#: The pointers each kernel writes; every other pointer the kernel uses is read. Launches by name.
OUTPUTS = {
    "dora_norm": ("norm_ptr",),
    "forward_xa": ("xa_ptr",),
    "forward": ("y_ptr",),
    "backward_dy": ("dxa_ptr", "db_ptr", "dm_ptr"),
    "backward_dx": ("dx_ptr", "da_ptr"),
    "plain_x@W^T": ("c_ptr",),
    "plain_dy@W": ("c_ptr",),
}


def machine_for(arch: str) -> Machine:
    if arch not in MACHINES:
        raise ValueError(f"arch must be one of {', '.join(MACHINES)} for the static estimate (it reads NVIDIA "
                         f"SASS), got {arch!r}")
    return MACHINES[arch]


def tensor_kind(dtype_name: str, precision: str) -> str:
    """Which tensor peak applies: "fp16" for fp16/bf16, "tf32" for fp32 with TF32, "fp64" for fp64.

    fp32 with exact ("ieee") products runs on FMA units, which this model does not time: refused by name."""
    if dtype_name in ("fp16", "bf16"):
        return "fp16"
    if dtype_name == "fp32" and precision == "tf32":
        return "tf32"
    if dtype_name == "fp64":
        return "fp64"
    raise ValueError(f"the static estimate needs tensor-core tiles: dtype {dtype_name!r} with precision "
                     f"{precision!r} runs on FMA units (use bf16/fp16, or fp32 with tf32=True)")


@dataclasses.dataclass
class KernelEstimate:
    """The estimate for one kernel in one config (seconds; an estimate from compiled code, not a measurement)."""

    kernel: str
    config: dict
    fits: bool
    error: Optional[str] = None
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    programs: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    loop: Optional[dict] = None  # the main loop: instructions per iteration by class, matrix ops, trips
    warp_instructions: Optional[int] = None  # all programs
    matrix_flops: Optional[int] = None  # all programs, as the instructions do them
    tile_flops: Optional[int] = None  # all programs, from the TTGIR's dot shapes (the tiles' math)
    bytes_read: Optional[int] = None
    bytes_written: Optional[int] = None
    atomic_bytes: Optional[int] = None  # all programs: RED/ATOMG bytes (resolved in L2, not timed)
    philox_calls: Optional[float] = None  # all programs
    draws_per_element: Optional[float] = None  # philox calls per element of x (kernels that draw dropout)
    tail: Optional[float] = None
    tensor_s: Optional[float] = None
    issue_s: Optional[float] = None
    memory_s: Optional[float] = None

    @property
    def estimate_s(self) -> Optional[float]:
        if self.tensor_s is None:
            return None
        return max(self.tensor_s, self.issue_s, self.memory_s)

    @property
    def bound(self) -> Optional[str]:
        """The term that sets the estimate: "tensor", "issue" or "memory"."""
        if self.tensor_s is None:
            return None
        terms = {"tensor": self.tensor_s, "issue": self.issue_s, "memory": self.memory_s}
        return max(terms, key=terms.get)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["estimate_s"] = self.estimate_s
        data["bound"] = self.bound
        return data


def blocks_per_sm(machine: Machine, *, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident blocks per SM: the least of the warp, register (8-register, 256-per-warp granules), shared
    memory (1 KiB reserved per block) and block limits."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = machine.registers_per_sm // (per_warp * num_warps)
    by_shared = machine.shared_per_sm // (shared_bytes + 1024)
    return min(machine.max_warps_per_sm // num_warps, by_registers, by_shared, machine.max_blocks_per_sm)


def tail_factor(machine: Machine, programs: int) -> float:
    """ceil(programs / SMs) * SMs / programs: the busiest SM's share over the average."""
    return math.ceil(programs / machine.sms) * machine.sms / programs


def _unroll(loop: "sass_loops.MainLoop", step: int) -> tuple:
    """(SASS iterations per TTGIR iteration, whether the SASS loop counter's step showed it): the counter
    advances by step x unroll per SASS iteration; 1 when the counter could not be read."""
    if loop.step is not None and loop.step > 0 and loop.step % step == 0:
        return loop.step // step, True
    return 1, False


def _pointer_bytes(launch, ttgir: str) -> tuple:
    """(bytes read, bytes written): every pointer argument the TTGIR uses, once, by the OUTPUTS table."""
    if launch.name not in OUTPUTS:
        raise ValueError(f"no output list for kernel {launch.name!r}: add it to estimate.OUTPUTS")
    outputs = OUTPUTS[launch.name]
    body = ttgir[ttgir.index("tt.func"):]
    body = body[body.index("\n"):]  # the signature names every argument; uses come after it
    read = written = 0
    seen = set()
    for name, value in launch.named_args().items():
        if not hasattr(value, "data_ptr") or re.search(rf"%{name}\b", body) is None:
            continue
        key = (value.data_ptr(), value.numel())
        if key in seen:
            continue
        seen.add(key)
        size = value.numel() * value.element_size()
        if name in outputs:
            written += size
        else:
            read += size
    return read, written


def estimate_kernel(machine: Machine, launch, report, ttgir: Optional[str], *, kind: str,
                    x_elements: int) -> KernelEstimate:
    """The estimate for one compiled config (`report`: a lorafuse.inspect KernelReport with its SASS; `ttgir`:
    the compiled kernel's TTGIR). x_elements: M * K, the elements dropout draws for."""
    config = dict(report.config)
    result = KernelEstimate(kernel=launch.name, config=config, fits=report.fits, error=report.error,
                            registers=report.registers, spill_bytes=report.spill_bytes,
                            shared_bytes=report.shared_bytes)
    if not report.compiled:
        return result
    tiles = {key: value for key, value in config.items() if key not in ("num_warps", "num_stages")}
    num_warps = config["num_warps"]
    programs = math.prod(launch.grid(tiles))
    arguments = {name: value for name, value in launch.named_args().items()
                 if isinstance(value, int) and not isinstance(value, bool)}
    scanned = ttgir_scan.scan(ttgir, arguments={**arguments, **tiles})
    loop = sass_loops.main_loop(report.machine_code, num_warps=num_warps)
    if loop is None or scanned.main_loop is None:
        raise ValueError(f"{launch.name} {config}: no loop with matrix instructions found in the compiled code")
    unroll, unroll_seen = _unroll(loop, scanned.main_loop.step_value)
    trips = math.ceil(scanned.main_loop.trips / unroll)
    instructions = loop.outside_instructions + loop.instructions * trips
    tile_flops = scanned.dot_flops_per_program()
    if loop.matrix_flops is None:  # UTC*MMA: the shape is in a descriptor, so take the tiles' math
        matrix_flops = tile_flops
    else:
        matrix_flops = loop.outside_matrix_flops + loop.matrix_flops * trips
    read, written = _pointer_bytes(launch, ttgir)
    threads = num_warps * 32
    atomic = (loop.outside_atomic_bytes + loop.atomic_bytes * trips) * threads
    calls = scanned.philox_calls_per_program()

    result.programs = programs
    result.blocks_per_sm = blocks_per_sm(machine, registers=report.registers, num_warps=num_warps,
                                         shared_bytes=report.shared_bytes)
    result.loop = {"instructions": loop.instructions, "non_matrix": loop.non_matrix, "by_class": loop.by_class,
                   "matrix": loop.matrix, "trips": trips, "unroll": unroll, "unroll_seen": unroll_seen,
                   "matrix_flops": loop.matrix_flops, "tile_flops": scanned.main_loop.dot_flops * unroll,
                   "outside_instructions": loop.outside_instructions, "other_loops": loop.other_loops}
    result.warp_instructions = instructions * num_warps * programs
    result.matrix_flops = matrix_flops * programs
    result.tile_flops = tile_flops * programs
    result.bytes_read, result.bytes_written = read, written
    result.atomic_bytes = atomic * programs
    result.philox_calls = calls * programs
    result.draws_per_element = calls * programs / x_elements if calls else None
    result.tail = tail_factor(machine, programs)
    result.tensor_s = result.matrix_flops * result.tail / machine.tensor_flops[kind]
    result.issue_s = result.warp_instructions * result.tail / (machine.sms * machine.schedulers * machine.clock_hz)
    result.memory_s = (read + written) / machine.memory_bytes_per_s
    return result


#: Estimates this close to the best count as a tie: the tail term alone moves a tile's estimate by up to 3%
#: (1024 programs on 132 SMs), less than what the model leaves out.
TIE = 0.02


def choose(estimates: list) -> Optional[KernelEstimate]:
    """The config the estimate picks, playing the autotuner's role (not predicting its pick): the smallest
    estimate among the configs that fit; among those within TIE of it, the one with the smallest sum of the
    three terms. A maximum with a second term just as large (64x64 tiles: tensor- and issue-bound at once) does
    not run at that maximum, and the sum is what keeps such a config from winning a tie."""
    fitting = [e for e in estimates if e.fits and e.estimate_s is not None]
    if not fitting:
        return None
    best = min(e.estimate_s for e in fitting)
    tied = [e for e in fitting if e.estimate_s <= best * (1 + TIE)]
    return min(tied, key=lambda e: e.tensor_s + e.issue_s + e.memory_s)
