"""What a launch's compiled configs must satisfy on a GPU target (issue 9), as findings people can act on.

For the configs the autotuner would try for one launch (one kernel, one problem, one arch):
- no config fails to compile for a reason other than running out of resources (an out-of-resources config
  is pruned by the autotuner at launch; any other compiler error raises in the user's training step);
- at least one config compiles within the arch's shared memory (LDS on AMD), and for fp16/bf16 one that is
  also spill-free (local-memory traffic inside a GEMM's main loop costs more than the tiles gain);
- for fp16/bf16 (adapters in fp32 too) at r <= 64, the ranks LoRA is trained at, every config fits: it compiles
  within shared memory and spill-free (issue 10), since the autotuner may pick any of them and nothing tells
  a user that a pick spills; at larger ranks the pruning may keep the least config that still compiles;
- every compiled fp16/bf16 config runs its products on the matrix cores (HMMA on Ampere, HGMMA on Hopper,
  UTC*MMA on Blackwell, v_mfma on CDNA): a config on FMA would be ~16x slower and could still be picked. With
  fp32 adapters on an fp16/bf16 model the low-rank products are fp32 (TF32 matrix cores or FMA), so there the
  rule holds for the kernels that run the base GEMM (forward, backward_dx) only.
"""

import re

#: Opcode prefixes of matrix-core products. WARPGROUP.* (Hopper's wgmma fences) are not products.
_MATRIX = re.compile(r"^(HMMA|HGMMA|UTC\w*MMA|IMMA|DMMA|QGMMA|v_mfma|v_smfmac)")

#: Compiler messages that mean "this config needs more than the GPU has": Triton's OutOfResources (shared
#: memory or registers, "out of resource: shared memory, Required: ..."), ptxas's "uses too much shared data" /
#: "too many resources", and LLVM's AMDGPU "local memory (N) exceeds limit (M)" / "... exceeds the VGPR limit".
#: Anything else (a type the lowering refuses, a ptxas internal error, a crash) is a bug in the kernel or the
#: compiler that the autotuner does not catch.
_OUT_OF_RESOURCES = re.compile(
    r"out of resource|OutOfResources|uses too much (shared|local) data|too many resources|"
    r"local memory \(\d+\) exceeds limit|exceeds (the )?[VS]GPR limit|register (count|allocation) exceed",
    re.IGNORECASE)

_HALF = ("fp16", "bf16")
#: Up to this rank every fp16/bf16 config must fit (issue 10).
STRICT_MAX_RANK = 64
#: The launches whose main loop is the base GEMM (x @ W^T, dy @ W) in x's dtype, whatever the adapters' dtype.
_BASE_GEMM_KERNELS = ("forward", "backward_dx")


def is_out_of_resources(error: str) -> bool:
    """Whether a compiler error says the config needs more shared memory or registers than the target has."""
    return bool(_OUT_OF_RESOURCES.search(error or ""))


def matrix_instruction_count(report) -> int:
    """Matrix-core product instructions in a compiled config's machine code."""
    return sum(n for op, n in report.matrix_instructions.items() if _MATRIX.match(op))


def describe_config(config: dict) -> str:
    """`M128 N256 K64 w8 s3`: tile sizes in the order the kernel names them, warps and stages."""
    tiles = " ".join(f"{name[len('BLOCK_'):]}{value}" for name, value in config.items() if name.startswith("BLOCK_"))
    return f"{tiles} w{config['num_warps']} s{config['num_stages']}"


def within_shared(report) -> bool:
    return report.compiled and report.shared_bytes <= report.shared_limit


def _misfit(report) -> str:
    """Why a config does not fit: `needs 80 KiB of 64 KiB shared memory`, `spills 40 bytes`, `out of resources`."""
    if not report.compiled:
        return "out of resources"
    reasons = []
    if not within_shared(report):
        reasons.append(f"needs {report.shared_bytes // 1024} KiB of {report.shared_limit // 1024} KiB shared memory")
    if report.spill_bytes:
        reasons.append(f"spills {report.spill_bytes} bytes")
    return ", ".join(reasons)


def launch_findings(reports: list, *, dtype: str, adapter_dtype=None, rank=None) -> list:
    """The rules broken by one launch's configs (`reports`: one KernelReport per candidate config, all for the
    same kernel, problem and arch), each as a sentence naming the kernel and, where one is to blame, the config.
    An empty list means the launch is fine. adapter_dtype: lora_A/lora_B's dtype name (None: dtype); rank: the
    LoRA rank (None: unknown, the rule for every config at r <= STRICT_MAX_RANK is not checked)."""
    if not reports:
        raise ValueError("reports must hold the launch's candidate configs, got none")
    kernel = reports[0].kernel
    findings = []
    for report in reports:
        if not report.compiled and not is_out_of_resources(report.error):
            findings.append(f"{kernel} [{describe_config(report.config)}]: compiler error: {report.error}")
    fitting = [report for report in reports if within_shared(report)]
    compiled = [report for report in reports if report.compiled]
    if not fitting:
        least = min((report.shared_bytes for report in compiled), default=None)
        detail = (f"the least is {least // 1024} KiB of {reports[0].shared_limit // 1024} KiB" if least is not None
                  else "none compiled")
        findings.append(f"{kernel}: no config fits shared memory ({detail})")
    elif dtype in _HALF and not any(report.spill_bytes == 0 for report in fitting):
        least = min(fitting, key=lambda report: report.spill_bytes)
        findings.append(f"{kernel}: every config within shared memory spills (the least: {least.spill_bytes} bytes "
                        f"in [{describe_config(least.config)}])")
    if dtype in _HALF and rank is not None and rank <= STRICT_MAX_RANK:
        for report in reports:
            if report.fits or (not report.compiled and not is_out_of_resources(report.error)):
                continue  # a compiler error other than out of resources is a finding of its own (above)
            findings.append(f"{kernel} [{describe_config(report.config)}]: {_misfit(report)} "
                            f"(at r <= {STRICT_MAX_RANK} every config must fit)")
    half_products = adapter_dtype in (None, dtype) or kernel in _BASE_GEMM_KERNELS
    if dtype in _HALF and half_products:
        for report in compiled:
            if matrix_instruction_count(report) == 0:
                findings.append(f"{kernel} [{describe_config(report.config)}]: no matrix-core instructions")
    return findings
