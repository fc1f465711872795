"""Compile the launches of one LoRA problem for one GPU target, and read what the compiler made.

`problem_launches` builds, from CPU tensors of the real shapes, the very `Launch` list the launchers would
run (lorafuse.kernels.forward_launches / backward_launches). `inspect_problem` compiles every config the
autotuner would try on the target (after the kernels' own pruning) and returns a `KernelReport` for each:
compiled or the compiler's error, registers, spills, shared memory against the target's limit, the
matrix-core instructions, how global memory is read, and the instruction counts of the machine code.

Needs a Python process where TRITON_INTERPRET is unset when lorafuse.kernels is first imported: the
interpreter's kernels cannot be compiled.
"""

import collections
import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Optional

import torch

from .targets import ARCHS, compiling_for

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


@dataclasses.dataclass
class KernelReport:
    """What the compiler made of one kernel in one config for one target."""

    arch: str
    kernel: str  # the launch's name: forward_xa, forward, backward_dy, backward_dx
    config: dict  # tile sizes, num_warps, num_stages
    compiled: bool
    error: Optional[str] = None  # the compiler's first error line when not compiled
    registers: Optional[int] = None  # per thread (VGPRs on AMD)
    spill_bytes: Optional[int] = None  # CUDA: local-memory stack per thread; AMD: 4 * (VGPR + SGPR spills)
    shared_bytes: Optional[int] = None
    shared_limit: Optional[int] = None
    matrix_instructions: dict = dataclasses.field(default_factory=dict)  # HMMA / HGMMA / UTC*MMA / v_mfma -> n
    global_reads: dict = dataclasses.field(default_factory=dict)  # LDG.E.128 / LDGSTS / UTMALDG / ... -> n
    instruction_counts: dict = dataclasses.field(default_factory=dict)  # opcode -> n, over the whole kernel
    machine_code: Optional[str] = dataclasses.field(default=None, repr=False)  # SASS or amdgcn text

    @property
    def fits(self) -> bool:
        """Compiled, within the shared-memory limit, and spill-free."""
        return self.compiled and self.shared_bytes <= self.shared_limit and self.spill_bytes == 0

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("machine_code")
        data["fits"] = self.fits
        return data


# ---- the problem's launches --------------------------------------------------------------------------------

def problem_launches(*, dtype, rank, dropout, bias, M, K, N, needs_dx=True, needs_dA=True, needs_dB=True,
                     adapter_dtype=None, scaling=2.0, dora=False):
    """The forward and backward launches of a FusedLoRALinear training step, built from CPU tensors of the
    real shapes (storage is never touched). The active target decides the configs (`Launch.candidate_configs`).
    adapter_dtype: lora_A/lora_B's dtype (None: x's; float32 on a float16/bfloat16 model, PEFT's default).
    dora: a FusedDoRALinear's step instead: the weight-norm launch first, the column scale in the forward GEMM,
    and the backward's DoRA work (dm and g * dy)."""
    from lorafuse.checks import accumulator_dtype, check_adapter_dtype, seed_tensor
    from lorafuse.kernels import backward_launches, forward_launches, weight_norm_launch
    from lorafuse.kernels.backward import DoraBackward

    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for name, value in (("rank", rank), ("M", M), ("K", K), ("N", N)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    adapter_dtype = dtype if adapter_dtype is None else adapter_dtype
    check_adapter_dtype(dtype, adapter_dtype, name="adapter_dtype")

    def empty(*shape, of=dtype):
        return torch.empty(shape, dtype=of)

    acc = accumulator_dtype(dtype)
    x, weight = empty(M, K), empty(N, K)
    # xa and dxa take the adapters' dtype, as the launchers allocate them.
    lora_A, lora_B, xa, dxa = (empty(*shape, of=adapter_dtype)
                               for shape in ((rank, K), (N, rank), (M, rank), (M, rank)))
    seed = seed_tensor(0, "cpu")
    bias_tensor, y = empty(N) if bias else None, empty(M, N)
    launches, column_scale, dora_backward = [], None, None
    if dora:
        column_scale = empty(N, of=acc)
        launches.append(weight_norm_launch(weight, lora_A, lora_B, empty(N, of=acc), scaling=scaling,
                                           interpreted=False))
        dora_backward = DoraBackward(column_scale=column_scale, y=y, bias=bias_tensor, dm=empty(N, of=acc))
    launches += forward_launches(x, weight, bias_tensor, lora_A, lora_B, y, xa, seed, scaling=scaling,
                                 dropout_p=dropout, interpreted=False, column_scale=column_scale)
    launches += backward_launches(empty(M, N), x, weight, lora_A, lora_B, xa, dxa,
                                  empty(M, K) if needs_dx else None, empty(rank, K, of=acc) if needs_dA else None,
                                  empty(N, rank, of=acc) if needs_dB else None, empty(1, of=acc), seed,
                                  scaling=scaling, dropout_p=dropout, interpreted=False, dora=dora_backward)
    return launches


def check_not_interpreted() -> None:
    """Refuse to run where lorafuse.kernels was built by Triton's interpreter: those kernels cannot be compiled."""
    from lorafuse.kernels import INTERPRETED

    if INTERPRETED:
        raise RuntimeError("lorafuse.kernels was imported with TRITON_INTERPRET set, so its kernels are interpreted "
                           "and cannot be compiled: run the inspection in a process started without "
                           "TRITON_INTERPRET (python -m lorafuse.inspect does this)")


# ---- compiling and reading the result ----------------------------------------------------------------------

def _config_dict(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def compile_config(launch, config):
    """Compile `launch` with `config` for the active target through Triton's JIT (nothing is launched)."""
    return launch.kernel.warmup(*launch.args, grid=launch.grid(config.kwargs), **launch.meta, **config.kwargs,
                                num_warps=config.num_warps, num_stages=config.num_stages)


def _first_error_line(error: Exception) -> str:
    """The line of a compiler error that says what went wrong, prefixed with the exception's type.

    ptxas failures open with Triton's generic "Internal Triton PTX codegen error"; the line that names the
    problem is ptxas's own ("ptxas error   : ...", "ptxas fatal   : ..."), so that one is preferred. Triton's
    CompilationError shows the source with a caret under the failing call ("at 43:13:" ... "^") and may keep
    the reason in its cause (an AssertionError from tl.dot): then the innermost cause says it.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    ptxas = [line for line in lines if re.match(r"ptxas\s+(error|fatal)", line)]
    errors = [line for line in lines if "error" in line.lower() and "Internal Triton PTX codegen" not in line]
    line = (ptxas or errors or lines[-1:] or [""])[0]
    cause = error.__cause__ or error.__context__
    if line.strip("^ ") == "" and cause is not None:
        where = re.match(r"at \d+:\d+", lines[0]) if lines else None
        line = (f"{where.group(0)}: " if where else "") + _first_error_line(cause)
    return f"{type(error).__name__}: {line}"[:400]


def _nvidia_bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _nvidia_tool(name: str) -> str:
    """The path of a CUDA tool from the triton wheel, or TRITON_<NAME>_PATH where that names a file (as
    Triton itself resolves ptxas). A missing tool is refused with the paths looked at."""
    default = os.path.join(_nvidia_bin_dir(), name)
    override = os.environ.get(f"TRITON_{name.upper().replace('-', '_')}_PATH")
    looked_at = [path for path in (override, default) if path]
    for path in looked_at:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{name} not found: looked for {' and '.join(looked_at)} (it ships with the triton "
                            "wheel on Linux)")


def check_toolchain(arch: str) -> None:
    """Refuse before compiling anything when a tool the inspection of `arch` needs is missing (FileNotFoundError
    naming the file): otherwise every config would report the same missing-tool error as a compile failure."""
    if ARCHS[arch][0] == "cuda":
        for name in ("ptxas", "cuobjdump", "nvdisasm"):
            _nvidia_tool(name)


def _missing_tool(error: Exception) -> Optional[Exception]:
    """What to raise when a compile failed for want of a tool (a broken installation, not a finding about the
    kernel): FileNotFoundError naming the file for ptxas ("Cannot find ptxas-blackwell") and for the ROCm linker
    older Tritons call ("ROCm linker /opt/rocm/llvm/bin/ld.lld not found"); None for any other error."""
    text = str(error)
    nvidia = re.search(r"Cannot find ([\w.-]+)", text)
    if nvidia:
        try:
            _nvidia_tool(nvidia.group(1))
        except FileNotFoundError as missing:
            return missing
        return error  # the file is there but Triton could not run it: not the kernel's fault either
    rocm = re.search(r"ROCm linker (\S+) not found", text)
    if rocm:
        return FileNotFoundError(f"ld.lld not found: looked for {rocm.group(1)} (this Triton links AMD code with "
                                 "ROCm's ld.lld; set TRITON_HIP_LLD_PATH to it)")
    return None


def _read_cuda(compiled, report: KernelReport) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                              check=True).stdout
    registers = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    local = re.search(r"LOCAL:(\d+)", usage)
    report.registers = int(registers.group(1)) if registers else None
    report.spill_bytes = (int(stack.group(1)) if stack else 0) + (int(local.group(1)) if local else 0)
    report.machine_code = sass
    counts = collections.Counter(sass_opcodes(sass))
    report.instruction_counts = dict(counts.most_common())
    report.matrix_instructions = {op: n for op, n in counts.items()
                                  if re.match(r"^(HMMA|HGMMA|UTC\w*MMA|IMMA|DMMA|QGMMA|WARPGROUP)", op)}
    report.global_reads = {op: n for op, n in counts.items() if re.match(r"^(LDG|LDGSTS|UTMALDG|UBLKCP|LDGDEPBAR)", op)}


def sass_opcodes(sass: str) -> list:
    """The opcode (with its modifiers, e.g. `LDG.E.128`, `HGMMA.64x128x16.F32.BF16`) of every instruction in
    nvdisasm text."""
    opcodes = []
    for match in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[0-9A-Za-z_]+)*)", sass):
        opcodes.append(match.group(1))
    return opcodes


def _read_amd(compiled, report: KernelReport) -> None:
    text = compiled.asm["amdgcn"]

    def field(name):
        match = re.search(rf"\.{name}:\s+(\d+)", text)
        return int(match.group(1)) if match else 0

    report.registers = field("vgpr_count")
    report.spill_bytes = 4 * (field("vgpr_spill_count") + field("sgpr_spill_count"))
    report.machine_code = text
    counts = collections.Counter(re.findall(r"^\s+([sv]_[a-z0-9_]+|global_[a-z0-9_]+|buffer_[a-z0-9_]+|ds_[a-z0-9_]+)",
                                            text, flags=re.MULTILINE))
    report.instruction_counts = dict(counts.most_common())
    report.matrix_instructions = {op: n for op, n in counts.items() if op.startswith("v_mfma")}
    report.global_reads = {op: n for op, n in counts.items() if op.startswith(("global_load", "buffer_load"))}


def inspect_config(arch: str, launch, config, target) -> KernelReport:
    """Compile one config of one launch for the active target and read the result."""
    from lorafuse.kernels.tuning import shared_memory_limit

    report = KernelReport(arch=arch, kernel=launch.name, config=_config_dict(config), compiled=False,
                          shared_limit=shared_memory_limit(target))
    try:
        compiled = compile_config(launch, config)
    except Exception as error:  # the compiler's refusal is the finding, not a crash of the inspection
        missing = _missing_tool(error)
        if missing is not None:
            raise missing from error
        report.error = _first_error_line(error)
        return report
    report.compiled = True
    report.shared_bytes = compiled.metadata.shared
    if target.backend == "cuda":
        _read_cuda(compiled, report)
    else:
        _read_amd(compiled, report)
    return report


def inspect_problem(arch: str, *, dtype="bf16", rank=16, dropout=0.1, bias=True, M=8192, K=4096, N=4096,
                    tf32=False, needs_dx=True, needs_dA=True, needs_dB=True, adapter_dtype=None, kernels=None,
                    dora=False) -> list:
    """KernelReports for every kernel and every autotune candidate of a training step on `arch`.

    dtype: "fp16", "bf16", "fp32" or "fp64"; adapter_dtype: lora_A/lora_B's, None for dtype's or "fp32" on an
    fp16/bf16 model; tf32 lets fp32 tiles use TF32 matrix cores (torch's `allow_tf32`). kernels: launch names
    to keep (None: all). dora: a FusedDoRALinear's step (`problem_launches`).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if adapter_dtype is not None and adapter_dtype not in DTYPES:
        raise ValueError(f"adapter_dtype must be None or one of {', '.join(DTYPES)}, got {adapter_dtype!r}")
    check_toolchain(arch)
    check_not_interpreted()
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    try:
        with compiling_for(arch) as target:
            launches = problem_launches(dtype=DTYPES[dtype], rank=rank, dropout=dropout, bias=bias, M=M, K=K, N=N,
                                        needs_dx=needs_dx, needs_dA=needs_dA, needs_dB=needs_dB,
                                        adapter_dtype=DTYPES[adapter_dtype] if adapter_dtype else None, dora=dora)
            return [inspect_config(arch, launch, config, target) for launch in launches
                    if kernels is None or launch.name in kernels for config in launch.candidate_configs()]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
