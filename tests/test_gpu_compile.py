"""Every kernel compiles and fits on sm_80, sm_90, sm_100 and gfx942, checked without a GPU (issue 9).

Each variant's launches are compiled config by config with Triton's real compiler for the target
(lorafuse.inspect) in worker processes, and must satisfy lorafuse.inspect.rules: no compiler error other than
out-of-resources, a config within shared memory (spill-free for fp16/bf16), matrix cores for fp16/bf16.

`make test` checks representative variants; `make check-gpu-compile` (LORAFUSE_GPU_COMPILE=all) every one.
"""

import os
import subprocess
import sys

import pytest

from lorafuse.inspect import KernelReport
from lorafuse.inspect import compile as inspect_compile
from lorafuse.inspect import sweep as sweep_module
from lorafuse.inspect.cli import main as cli_main
from lorafuse.inspect.report import format_table, global_reads_summary
from lorafuse.inspect.rules import is_out_of_resources, launch_findings
from lorafuse.inspect.sweep import all_variants, representative_variants, run_sweep

pytest.importorskip("triton")

_VARIANTS = all_variants() if os.environ.get("LORAFUSE_GPU_COMPILE") == "all" else representative_variants()


@pytest.fixture(scope="module")
def sweep():
    """One sweep over the selected variants, shared by their tests (distinct compiles run once)."""
    return run_sweep(_VARIANTS)


@pytest.mark.parametrize("variant", _VARIANTS, ids=lambda variant: variant.label)
def test_variant_compiles_and_fits(sweep, variant):
    findings = sweep.findings[variant]
    assert not findings, f"{variant.label}:\n  " + "\n  ".join(findings)


# ---- the rules, on reports with known answers --------------------------------------------------------------

def _report(**fields):
    base = dict(arch="sm_90", kernel="forward", config={"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4,
                                                        "num_stages": 3},
                compiled=True, registers=128, spill_bytes=0, shared_bytes=100 * 1024, shared_limit=227 * 1024,
                matrix_instructions={"HGMMA.64x128x16.F32.BF16": 8}, global_reads={"LDG.E.128": 4},
                instruction_counts={"HGMMA.64x128x16.F32.BF16": 8, "LDG.E.128": 4, "LDS": 3, "STL": 0})
    return KernelReport(**{**base, **fields})


def test_out_of_resources_is_told_from_other_compiler_errors():
    assert is_out_of_resources("OutOfResources: out of resource: shared memory, Required: 237568, Hardware limit: "
                               "232448")
    assert is_out_of_resources("ptxas error   : Entry function 'k' uses too much shared data (0x3a000 bytes)")
    assert is_out_of_resources("LLVM ERROR: local memory (98304) exceeds limit (65536) in function 'k'")
    assert not is_out_of_resources("CompilationError: shared-memory element type bit width must be a multiple of "
                                   "8; got 1")
    assert not is_out_of_resources("PTXASError: ptxas fatal   : Internal error: register allocation failed")
    assert not is_out_of_resources(None)


def test_the_error_line_is_the_one_that_names_the_problem():
    ptxas = RuntimeError("Internal Triton PTX codegen error\n`ptxas` stderr:\nptxas fatal   : Unresolved extern "
                         "function 'f'\nRepro command: ptxas ...")
    assert inspect_compile._first_error_line(ptxas) == "RuntimeError: ptxas fatal   : Unresolved extern function 'f'"
    try:  # Triton's CompilationError shows the source and a caret; the reason is the cause's
        try:
            raise AssertionError("input_precision must be one of ('ieee',). Got tf32")
        except AssertionError as cause:
            raise ValueError("at 43:13:\n    da = _mma(tl.trans(dxa), x)\n         ^") from cause
    except ValueError as error:
        assert inspect_compile._first_error_line(error) == (
            "ValueError: at 43:13: AssertionError: input_precision must be one of ('ieee',). Got tf32")


def test_rules_accept_a_fitting_launch_and_name_what_breaks():
    assert launch_findings([_report(), _report(shared_bytes=300 * 1024)], dtype="bf16") == []
    broken = launch_findings([_report(compiled=False, error="CompilationError: bit width 1"),
                              _report(shared_bytes=300 * 1024), _report(spill_bytes=64, matrix_instructions={})],
                             dtype="bf16")
    assert broken == ["forward [M128 N128 w4 s3]: compiler error: CompilationError: bit width 1",
                      "forward: every config within shared memory spills (the least: 64 bytes in [M128 N128 w4 s3])",
                      "forward [M128 N128 w4 s3]: no matrix-core instructions"]
    # Spills and FMA are allowed for fp64 (no fp64 matrix cores on most targets); shared memory is not.
    assert launch_findings([_report(spill_bytes=64, matrix_instructions={})], dtype="fp64") == []
    assert launch_findings([_report(shared_bytes=300 * 1024)], dtype="fp64") == [
        "forward: no config fits shared memory (the least is 300 KiB of 227 KiB)"]
    assert launch_findings([_report(compiled=False, error="OutOfResources: out of resource: shared memory")],
                           dtype="fp64") == ["forward: no config fits shared memory (none compiled)"]
    # Hopper's wgmma fences are not products: a config with only them does not use the matrix cores.
    assert launch_findings([_report(matrix_instructions={"WARPGROUP.ARRIVE": 2})], dtype="fp16") == [
        "forward [M128 N128 w4 s3]: no matrix-core instructions"]


def test_at_ranks_up_to_64_every_half_precision_config_must_fit():
    """Issue 10: the autotuner may pick any candidate, so at r <= 64 (fp16/bf16, adapters in fp32 too) one that
    spills or needs too much shared memory is a finding even when another config fits."""
    spilling = _report(spill_bytes=40, config={"BLOCK_M": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3},
                       kernel="forward_xa")
    too_big = _report(shared_bytes=80 * 1024, shared_limit=64 * 1024, kernel="forward_xa")
    out_of_resources = _report(compiled=False, error="OutOfResources: out of resource: shared memory",
                               kernel="forward_xa")
    launch = [_report(kernel="forward_xa"), spilling, too_big, out_of_resources]
    assert launch_findings(launch, dtype="fp16", adapter_dtype="fp32", rank=64) == [
        "forward_xa [M64 K128 w8 s3]: spills 40 bytes (at r <= 64 every config must fit)",
        "forward_xa [M128 N128 w4 s3]: needs 80 KiB of 64 KiB shared memory (at r <= 64 every config must fit)",
        "forward_xa [M128 N128 w4 s3]: out of resources (at r <= 64 every config must fit)"]
    # Larger ranks, fp32 and an unknown rank keep the rule of one config that fits.
    assert launch_findings(launch, dtype="fp16", adapter_dtype="fp32", rank=256) == []
    assert launch_findings(launch, dtype="fp32", rank=16) == []
    assert launch_findings(launch, dtype="bf16") == []


def _candidates(arch, kernel, **problem):
    """The configs the autotuner would try for one launch of a llama-7b q_proj training step on `arch`."""
    from lorafuse.inspect.compile import problem_launches
    from lorafuse.inspect.targets import compiling_for

    with compiling_for(arch):
        launches = problem_launches(bias=True, M=8192, K=4096, N=4096, **problem)
        return next(launch for launch in launches if launch.name == kernel).candidate_configs()


def test_fallback_tiles_are_tried_only_where_no_other_config_fits():
    import torch

    from lorafuse.kernels.backward import _DY_FALLBACKS
    from lorafuse.kernels.forward import _XA_FALLBACKS

    for arch in ("sm_90", "gfx942"):
        for kernel, fallbacks in (("backward_dy", _DY_FALLBACKS), ("forward_xa", _XA_FALLBACKS)):
            usual = _candidates(arch, kernel, dtype=torch.bfloat16, rank=16, dropout=0.1)
            assert usual and not [config for config in usual if config in fallbacks], (arch, kernel, usual)
    # gfx942's 64 KiB at r=256: the smallest usual tiles needed 66 KiB (fp32 with dB) and 68 KiB (fp64 forward_xa).
    assert all(config in _DY_FALLBACKS for config in
               _candidates("gfx942", "backward_dy", dtype=torch.float32, rank=256, dropout=0.1))
    assert _candidates("gfx942", "forward_xa", dtype=torch.float64, rank=256, dropout=0.1) == list(_XA_FALLBACKS)


def test_weight_norm_walks_the_rank_in_chunks_only_in_split_precision_above_64():
    """DoRA's norm holds B's [BLOCK_N, r] rows through its K loop, except in split precision (fp32 adapters on
    the GPU: 3xTF32, bf16x6 on AMD) at r > 64, where they spilled 592-2912 bytes at r=256 on every arch."""
    import torch

    def chunk(arch, rank, adapter_dtype):
        from lorafuse.inspect.compile import problem_launches
        from lorafuse.inspect.targets import compiling_for

        with compiling_for(arch):
            launches = problem_launches(dtype=torch.bfloat16, rank=rank, dropout=0.1, bias=True, M=64, K=256, N=128,
                                        adapter_dtype=adapter_dtype, dora=True)
            meta = next(launch for launch in launches if launch.name == "dora_norm").meta
            return meta["BLOCK_R"], meta["RANK_CHUNK"]

    assert chunk("sm_90", 256, torch.float32) == (256, 64)
    assert chunk("gfx942", 256, torch.float32) == (256, 64)
    assert chunk("sm_90", 256, None) == (256, 256)  # bf16 adapters: B stays whole, W's loads stay pipelined
    assert chunk("sm_80", 64, torch.float32) == (64, 64)


def test_ampere_pipeline_buffers_are_stages_less_one():
    """As compiled: 128x128x64 with 4 stages takes 96 KiB of shared memory on sm_80 (3 buffers of 32), 136 on
    sm_90 (4 and the barriers); gfx942's stream pipeliner also keeps num_stages - 1."""
    from lorafuse.inspect.targets import compiling_for
    from lorafuse.kernels import tuning

    four_stages = tuning.config(4, 8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
    buffers = {}
    for arch in ("sm_80", "sm_90", "sm_100", "gfx942"):
        with compiling_for(arch):
            buffers[arch] = tuning.pipeline_buffers(four_stages)
    assert buffers == {"sm_80": 3, "sm_90": 4, "sm_100": 4, "gfx942": 3}


def test_dy_pruning_counts_db_on_its_way_to_the_atomics():
    """gfx942, fp16, r=64: 32x128 on 8 warps with 3 stages compiled to 80 KiB of LDS (48 of loads, 32 for dB's
    result) while the estimate said 60; it is pruned now, and kept where dB is not computed."""
    import torch

    def described(configs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]

    with_db = _candidates("gfx942", "backward_dy", dtype=torch.float16, rank=64, dropout=0.0)
    without_db = _candidates("gfx942", "backward_dy", dtype=torch.float16, rank=64, dropout=0.0, needs_dB=False)
    assert (32, 128, 8, 3) not in described(with_db)
    assert (32, 128, 8, 3) in described(without_db)


def test_table_shows_each_config_and_the_compiler_error():
    table = format_table([_report(), _report(compiled=False, error="PTXASError: ptxas fatal   : boom",
                                             kernel="backward_dx")])
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["arch", "kernel", "config", "result"]
    assert "fits" in lines[2] and "100/227" in lines[2] and "HGMMA.64x128x16.F32.BF16*8" in lines[2]
    assert "backward_dx" in lines[3] and "ERROR" in lines[3]
    assert lines[4].strip() == "error: PTXASError: ptxas fatal   : boom"
    assert global_reads_summary(_report(global_reads={"LDG.E.128": 3, "LDG.E.U16": 1, "LDGSTS.E.BYPASS.128": 36,
                                                      "LDGDEPBAR": 6, "UTMALDG.2D": 2})) == \
        "LDG 128b*3 16b*1, cp.async 128b*36, TMA*2"
    assert global_reads_summary(_report(global_reads={"buffer_load_dwordx4": 16, "buffer_load_dwordx2": 6})) == \
        "buffer_load 128b*16 64b*6"


# ---- the command line --------------------------------------------------------------------------------------

def _cli(*args):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "lorafuse.inspect", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("args, named", [
    (["--arch", "sm_75"], "'sm_75'"),
    (["--arch", "sm_90", "--dtype", "int8"], "'int8'"),
    (["--arch", "sm_90", "--shape", "8192,4096"], "'8192,4096'"),
    (["--arch", "sm_90", "--shape", "8192,0,4096"], "'8192,0,4096'"),
    (["--arch", "sm_90", "--grads", "dx,dW"], "dW"),
    (["--arch", "sm_90", "--rank", "0"], "'0'"),
])
def test_cli_refuses_bad_options_by_name(args, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_names_the_missing_cuda_tool(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(inspect_compile, "_nvidia_bin_dir", lambda: str(tmp_path))
    for name in ("PTXAS", "CUOBJDUMP", "NVDISASM"):
        monkeypatch.delenv(f"TRITON_{name}_PATH", raising=False)
    assert cli_main(["--arch", "sm_90"]) == 1
    assert f"ptxas not found: looked for {tmp_path / 'ptxas'}" in capsys.readouterr().err


def test_cli_compiles_and_writes_json(tmp_path):
    """A real compile through the command line (gfx942 compiles fastest): the table, the JSON, exit status 0."""
    out = tmp_path / "report.json"
    done = _cli("--arch", "gfx942", "--dtype", "fp16", "--rank", "16", "--dropout", "0.1", "--kernels",
                "forward_xa", "--json", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "forward_xa" in done.stdout and "v_mfma" in done.stdout
    import json

    document = json.loads(out.read_text())
    assert document["problem"]["dtype"] == "fp16" and document["triton"]
    reports = document["archs"]["gfx942"]["reports"]
    assert reports and all(report["kernel"] == "forward_xa" and report["compiled"] for report in reports)


# ---- worker processes --------------------------------------------------------------------------------------

_FAKE_WORKER = """
import json, os, signal, sys, time
request = json.load(sys.stdin)
for job in request["jobs"]:
    if job["kernel"] == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if job["kernel"] == "hang":
        time.sleep(60)
    print(json.dumps({"arch": "sm_90", "kernel": job["kernel"], "config": job["config"], "compiled": True}), flush=True)
"""


def test_a_crashing_or_hanging_compile_fails_that_config_only(monkeypatch):
    """A compiler that kills its process (a ptxas or LLVM crash) or hangs costs the config it was compiling; the
    sweep goes on with the next config in a fresh worker."""
    monkeypatch.setattr(sweep_module, "WORKER_COMMAND", (sys.executable, "-c", _FAKE_WORKER))
    monkeypatch.setattr(sweep_module, "JOB_TIMEOUT_S", 2)
    jobs = [{"variant": {"arch": "sm_90"}, "kernel": kernel, "config": {"num_warps": 4, "num_stages": index}}
            for index, kernel in enumerate(["forward", "crash", "backward_dy", "hang", "backward_dx"])]
    results = sweep_module.compile_jobs(jobs, workers=1)
    assert [result["compiled"] for result in results] == [True, False, True, False, True]
    assert results[1]["error"].startswith("compiler process died (signal 11)")
    assert results[3]["error"] == "compile took over 2 s and was killed"
    assert [result["kernel"] for result in results] == [job["kernel"] for job in jobs]
