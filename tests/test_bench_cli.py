"""`python -m lorafuse.bench` end to end on a tiny shape: every provider runs, the JSON holds what the
issue asks for, and the saved-bytes figure shows lorafuse keeping less than PEFT with dropout. No timing
is asserted: the numbers of a CPU run mean nothing."""

import json
import os
import subprocess
import sys

import pytest

from lorafuse.bench import main
from lorafuse.bench.providers import PROVIDERS

pytest.importorskip("peft")

#: Tiny and odd-sized, so interpreted kernels (TRITON_INTERPRET=1 in this suite) finish in seconds.
TINY = ["--shapes", "32,48,40", "--rank", "4", "--warmup", "0", "--repeats", "1", "--no-progress"]

RESULT_FIELDS = {"provider", "variant", "mode", "M", "K", "N", "status", "reason", "median_ms", "p20_ms", "p80_ms",
                 "flops", "tflops", "ratio_to_base", "ratio_to_peft", "peak_bytes", "saved_bytes",
                 "saved_beyond_x_bytes"}
ENVIRONMENT_FIELDS = {"device", "device_type", "lorafuse_backend", "lorafuse", "torch", "triton", "peft", "python",
                      "git_commit", "git_dirty", "date"}
CONFIG_FIELDS = {"shapes", "providers", "mode", "rank", "alpha", "dropout", "dtype", "device", "scaling", "dora"}


def test_cli_runs_every_provider_and_writes_json_and_plot(tmp_path):
    json_path, plot_path = tmp_path / "out" / "b.json", tmp_path / "b.png"
    done = subprocess.run([sys.executable, "-m", "lorafuse.bench", *TINY, "--device", "cpu", "--json", str(json_path),
                           "--plot", str(plot_path)], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No GPU" in done.stdout  # a CPU run says what its numbers are
    document = json.loads(json_path.read_text())
    assert document["schema"] == "lorafuse-bench/1"
    assert ENVIRONMENT_FIELDS <= set(document["environment"])
    assert document["environment"]["peft"] is not None and document["environment"]["device_type"] == "cpu"
    assert CONFIG_FIELDS <= set(document["config"])
    assert document["config"]["shapes"] == [[32, 48, 40]] and document["config"]["mode"] == "train"
    assert document["config"]["dora"] is False
    results = document["results"]
    assert [r["provider"] for r in results] == list(PROVIDERS)
    for r in results:
        assert set(r) == RESULT_FIELDS, r["provider"]
        assert r["status"] == "ok", r
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_bytes"] is None  # not tracked on a CPU, and not invented
        assert r["ratio_to_base"] is not None and r["ratio_to_peft"] is not None
    by_name = {r["provider"]: r for r in results}
    assert by_name["base"]["saved_bytes"] == 0  # a frozen linear keeps nothing but its weight for dx
    assert by_name["base"]["ratio_to_base"] == 1.0 and by_name["peft"]["ratio_to_peft"] == 1.0
    # Every LoRA provider did the same math: train FLOPs = 2 * 2MNK + 6 M r (K + N).
    M, K, N, r = 32, 48, 40, 4
    assert {by_name[name]["flops"] for name in PROVIDERS[1:]} == {4 * M * N * K + 6 * M * r * (K + N)}
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in PROVIDERS:
        assert name in done.stdout  # the table lists every provider


def test_lorafuse_saves_less_than_peft_with_dropout(tmp_path, capsys):
    json_path = tmp_path / "b.json"
    code = main([*TINY, "--device", "cpu", "--dropout", "0.1", "--providers", "lorafuse", "peft", "reference",
                 "unsloth", "--json", str(json_path)])
    assert code == 0, capsys.readouterr()
    by_name = {r["provider"]: r for r in json.loads(json_path.read_text())["results"]}
    M, K, r, itemsize = 32, 48, 4, 4
    x_bytes = M * K * itemsize
    lorafuse, peft = by_name["lorafuse"], by_name["peft"]
    assert lorafuse["status"] == peft["status"] == "ok"
    assert lorafuse["saved_bytes"] < peft["saved_bytes"]
    # lorafuse keeps x, xa (M*r) and a seed; PEFT keeps a dropout copy of x and its mask.
    assert M * r * itemsize <= lorafuse["saved_beyond_x_bytes"] <= M * r * itemsize + 64
    assert lorafuse["saved_bytes"] == x_bytes + lorafuse["saved_beyond_x_bytes"]
    assert peft["saved_beyond_x_bytes"] >= x_bytes + M * K  # at least the copy plus a one-byte-per-element mask
    assert by_name["unsloth"]["status"] == "skipped" and "dropout" in by_name["unsloth"]["reason"]
    assert by_name["unsloth"]["median_ms"] is None
    assert "skipped" in capsys.readouterr().out


def test_infer_mode_times_merged_and_unmerged(tmp_path):
    json_path = tmp_path / "b.json"
    assert main([*TINY, "--device", "cpu", "--mode", "infer", "--providers", "base", "lorafuse", "peft",
                 "--json", str(json_path)]) == 0
    results = json.loads(json_path.read_text())["results"]
    assert [(r["provider"], r["variant"]) for r in results] == [
        ("base", ""), ("lorafuse", ""), ("lorafuse", "merged"), ("peft", ""), ("peft", "merged")]
    assert all(r["status"] == "ok" and r["saved_bytes"] is None for r in results)
    M, K, N, r = 32, 48, 40, 4
    flops = {(r_["provider"], r_["variant"]): r_["flops"] for r_ in results}
    assert flops[("lorafuse", "merged")] == flops[("base", "")] == 2 * M * N * K
    assert flops[("lorafuse", "")] == 2 * M * N * K + 2 * M * r * (K + N)


@pytest.mark.parametrize(("argv", "names"), [
    (["--dropout", "1.5"], "--dropout"),
    (["--rank", "0"], "--rank"),
    (["--alpha", "nan"], "--alpha"),
    (["--shapes", "1,2"], "1,2"),
    (["--shapes", "llama-70b"], "llama-70b"),
    (["--providers", "vllm"], "vllm"),
    (["--mode", "decode"], "decode"),
])
def test_bad_options_exit_with_a_message_naming_them(argv, names, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--device", "cpu"])
    assert exc.value.code == 2
    assert names in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--alpha", "0"], "argument --alpha: must be a positive number, got '0'"),
    (["--alpha", "-2"], "argument --alpha: must be a positive number, got '-2'"),
    (["--alpha", "inf"], "argument --alpha: must be finite, got 'inf'"),
    (["--rank", "-1"], "argument --rank: must be a positive integer, got '-1'"),
    (["--rank", "2.5"], "argument --rank: must be a positive integer, got '2.5'"),
    (["--dropout", "-0.1"], "argument --dropout: must be in [0, 1), got '-0.1'"),
    (["--dropout", "1"], "argument --dropout: must be in [0, 1), got '1'"),
    (["--tokens", "0"], "argument --tokens: must be a positive integer, got '0'"),
    (["--repeats", "0"], "argument --repeats: must be a positive integer, got '0'"),
    (["--warmup", "-1"], "argument --warmup: must be a non-negative integer, got '-1'"),
])
def test_numeric_options_are_checked_by_the_parser(argv, message, capsys):
    from lorafuse.bench.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--plot", "--json"])
def test_output_paths_are_checked_before_the_benchmark_runs(tmp_path, flag, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr("lorafuse.bench.cli.run", never)
    a_file = tmp_path / "file"
    a_file.write_text("")
    bad = [str(a_file / "out.png"), str(tmp_path)] + (["/proc/x.png"] if os.path.isdir("/proc/self") else [])
    for path in bad:
        with pytest.raises(SystemExit) as exc:
            main([*TINY, "--device", "cpu", flag, path])
        assert exc.value.code == 2
        assert f"argument {flag}: cannot write {path}: " in capsys.readouterr().err
    # A folder that does not exist yet is created when the results are written.
    from lorafuse.bench.cli import unwritable

    assert unwritable(tmp_path / "new" / "deeper" / "b.png") is None and not (tmp_path / "new").exists()


def test_dora_run_checks_every_dora_provider_and_records_dora(tmp_path, capsys):
    json_path = tmp_path / "b.json"
    code = main([*TINY, "--device", "cpu", "--dora", "--json", str(json_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("DoRA layers; ")  # the title line says which method was timed
    document = json.loads(json_path.read_text())
    assert document["config"]["dora"] is True
    by_name = {r["provider"]: r for r in document["results"]}
    assert list(by_name) == list(PROVIDERS)
    # Each passed the agreement check on y, dx, dA, dB and dm (a mismatch would not be "ok") and was timed.
    for name in ("base", "lorafuse", "reference", "peft"):
        assert by_name[name]["status"] == "ok" and by_name[name]["median_ms"] is not None, by_name[name]
    assert by_name["unsloth"]["status"] == "skipped" and "DoRA" in by_name["unsloth"]["reason"]
    # DoRA's forward adds B @ A for the weight norm (2NKr) to LoRA's train FLOPs.
    M, K, N, r = 32, 48, 40, 4
    assert {by_name[name]["flops"] for name in ("lorafuse", "reference", "peft")} == {
        4 * M * N * K + 6 * M * r * (K + N) + 2 * N * K * r}


def test_dora_infer_mode_times_merged_and_unmerged(tmp_path):
    json_path = tmp_path / "b.json"
    assert main([*TINY, "--device", "cpu", "--dora", "--mode", "infer", "--providers", "lorafuse", "reference",
                 "peft", "--json", str(json_path)]) == 0
    results = json.loads(json_path.read_text())["results"]
    # The merged layers were checked against the unmerged oracle: g * (W + s B A) folded into W.
    assert [(r["provider"], r["variant"], r["status"]) for r in results] == [
        ("lorafuse", "", "ok"), ("lorafuse", "merged", "ok"), ("reference", "", "ok"), ("peft", "", "ok"),
        ("peft", "merged", "ok")]


def test_dora_with_static_goes_to_the_static_estimate(monkeypatch):
    from lorafuse.bench import static

    calls = []
    monkeypatch.setattr(static, "check_compilable", lambda: None)  # this process interprets its kernels
    monkeypatch.setattr(static, "run_static", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr("lorafuse.bench.cli.run", lambda *args, **kwargs: pytest.fail("the timed benchmark ran"))
    assert main(["--static", "--dora", "--adapter-dtype", "fp32", "--shapes", "64,64,64"]) == 0
    (kwargs,) = calls
    assert kwargs["dora"] is True and kwargs["adapter_dtype"] == "fp32"


def test_adapter_dtype_is_refused_outside_static(capsys):
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--device", "cpu", "--dora", "--adapter-dtype", "fp32"])
    assert exc.value.code == 2
    assert "--adapter-dtype applies to --static only" in capsys.readouterr().err
