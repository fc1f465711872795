"""The benchmark's parts: shape parsing, FLOP counts, saved-bytes counting, the agreement check (a wrong
provider is reported, not timed), ratios, the timer's bookkeeping and the two-GEMM baseline's gradients."""

import dataclasses
import sys

import pytest
import torch
import torch.nn as nn

from lorafuse.bench import run as run_module
from lorafuse.bench.addmm_lora import AddmmLoRALinear, _AddmmLoRAFunction
from lorafuse.bench.compare import disagreement, expected_outputs, provider_outputs
from lorafuse.bench.measure import _quantile, saved_bytes, step_flops, time_step
from lorafuse.bench.providers import PROVIDERS, Provider, ProviderUnavailable, build_provider, make_weights
from lorafuse.bench.report import format_bytes, format_table
from lorafuse.bench.run import Config, Record, add_ratios
from lorafuse.bench.shapes import PRESETS, Shape, parse_shapes
from lorafuse.reference import dora_weight_norm
from lorafuse.reference import lora_linear as reference_lora_linear


def test_presets_use_tokens_and_triples_are_taken_as_given():
    shapes = parse_shapes(["llama-7b", "7,4096,4096", "5,6,7"], tokens=7)
    assert shapes == [Shape(7, 4096, 4096), Shape(7, 4096, 11008), Shape(7, 11008, 4096), Shape(5, 6, 7)]
    assert parse_shapes(["llama-3-8b"], tokens=1)[1] == Shape(1, 4096, 1024)
    assert set(PRESETS) >= {"llama-7b", "llama-3-8b", "small"}


@pytest.mark.parametrize(("specs", "tokens", "message"), [
    (["1,2"], 8, "'1,2'"),
    (["1,x,3"], 8, "integers"),
    (["0,2,3"], 8, "positive"),
    (["llama-70b"], 8, "'llama-70b'"),
    ([], 8, "non-empty"),
    (["small"], 0, "tokens must be a positive int, got 0"),
])
def test_bad_shapes_say_which(specs, tokens, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_shapes(specs, tokens=tokens)


def test_flops_count_the_math_of_each_mode():
    shape, r = Shape(3, 5, 7), 2
    base, lora_fwd, lora_bwd = 2 * 3 * 5 * 7, 2 * 3 * r * (5 + 7), 4 * 3 * r * (5 + 7)
    assert step_flops(shape, rank=r, mode="fwd", adapter=False) == base
    assert step_flops(shape, rank=r, mode="fwd", adapter=True) == base + lora_fwd
    assert step_flops(shape, rank=r, mode="bwd", adapter=True) == base + lora_bwd
    assert step_flops(shape, rank=r, mode="train", adapter=True) == 2 * base + lora_fwd + lora_bwd
    assert step_flops(shape, rank=r, mode="infer", adapter=True, merged=True) == base
    with pytest.raises(ValueError, match="'decode'"):
        step_flops(shape, rank=r, mode="decode", adapter=True)
    # DoRA's forward adds the weight norm's B @ A (2NKr); its backward and a merged layer add nothing.
    norm = 2 * 7 * 5 * r
    assert step_flops(shape, rank=r, mode="fwd", adapter=True, dora=True) == base + lora_fwd + norm
    assert step_flops(shape, rank=r, mode="bwd", adapter=True, dora=True) == base + lora_bwd
    assert step_flops(shape, rank=r, mode="infer", adapter=True, merged=True, dora=True) == base
    assert step_flops(shape, rank=r, mode="fwd", adapter=False, dora=True) == base


def test_saved_bytes_counts_unique_storages_without_parameters():
    linear = nn.Linear(6, 4).requires_grad_(False)
    x = torch.randn(3, 6, requires_grad=True)
    # A frozen linear needs only its weight (a parameter) for dx.
    assert saved_bytes(lambda: linear(x), x=x, module=linear) == (0, 0)
    # x * x.t().t() saves two views of x: one storage, all of it x.
    assert saved_bytes(lambda: x * x.t().t(), x=x, module=linear) == (3 * 6 * 4, 0)
    # sin saves x; its result y saved by y * y is new: 72 bytes beyond x.
    assert saved_bytes(lambda: (lambda y: y * y)(x.sin()), x=x, module=linear) == (2 * 72, 72)


def test_weights_have_a_non_zero_lora_B_and_providers_get_copies():
    weights = make_weights(in_features=6, out_features=5, rank=2, dtype=torch.float32, device="cpu")
    assert weights.lora_B.abs().min() > 0
    provider = build_provider("lorafuse", weights, alpha=4, dropout=0.0)
    assert provider.module.training and provider.has_adapter
    assert torch.equal(provider.lora_B, weights.lora_B)
    assert provider.lora_B.data_ptr() != weights.lora_B.data_ptr()
    assert not build_provider("base", weights, alpha=4, dropout=0.0).has_adapter
    with pytest.raises(ValueError, match="'vllm'"):
        build_provider("vllm", weights, alpha=4, dropout=0.0)


def test_dora_weights_are_the_lora_weights_plus_a_magnitude_that_is_not_the_norm():
    lora = make_weights(in_features=12, out_features=10, rank=3, dtype=torch.float32, device="cpu", seed=5)
    dora = make_weights(in_features=12, out_features=10, rank=3, dtype=torch.float32, device="cpu", seed=5,
                        dora=True, scaling=2.0)
    assert lora.magnitude is None and not lora.dora and dora.dora
    for name in ("weight", "bias", "lora_A", "lora_B"):
        assert torch.equal(getattr(lora, name), getattr(dora, name)), name
    assert dora.magnitude.shape == (10,) and dora.magnitude.dtype == torch.float32
    # g = m / ||W + s B A|| is in [0.5, 1.5) per row and not 1: a provider that drops g or uses another
    # scaling in the norm computes another function.
    g = dora.magnitude / dora_weight_norm(dora.weight, dora.lora_A, dora.lora_B, scaling=2.0)
    assert ((g >= 0.5) & (g < 1.5)).all() and (g - 1).abs().max() > 0.1
    with pytest.raises(ValueError, match="scaling=None"):
        make_weights(in_features=12, out_features=10, rank=3, dtype=torch.float32, device="cpu", dora=True)


def test_peft_is_skipped_with_a_reason_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    weights = make_weights(in_features=6, out_features=5, rank=2, dtype=torch.float32, device="cpu")
    with pytest.raises(ProviderUnavailable, match="peft is not installed"):
        build_provider("peft", weights, alpha=4, dropout=0.0)


@pytest.mark.parametrize("name", [n for n in PROVIDERS if n != "base"])
def test_every_lora_provider_agrees_with_the_oracle(name):
    if name == "peft":
        pytest.importorskip("peft")
    weights = make_weights(in_features=12, out_features=10, rank=3, dtype=torch.float32, device="cpu")
    x, dy = torch.randn(7, 12), torch.randn(7, 10)
    kwargs = {"scaling": 2.0, "adapter": True, "backward": True}
    oracle = expected_outputs(weights, x, dy, dtype=torch.float64, **kwargs)
    same = expected_outputs(weights, x, dy, dtype=torch.float32, **kwargs)
    provider = build_provider(name, weights, alpha=6, dropout=0.0)
    assert disagreement(provider_outputs(provider, x, dy, backward=True), oracle=oracle, same_dtype=same,
                        dtype=torch.float32) is None
    assert provider.module.training and all(p.grad is None for p in provider.module.parameters())


def _dora_weights():
    return make_weights(in_features=12, out_features=10, rank=3, dtype=torch.float32, device="cpu", dora=True,
                        scaling=2.0)


@pytest.mark.parametrize("name", ["lorafuse", "reference", "peft"])
def test_every_dora_provider_agrees_with_the_oracle(name):
    if name == "peft":
        pytest.importorskip("peft")
    weights = _dora_weights()
    x, dy = torch.randn(7, 12), torch.randn(7, 10)
    kwargs = {"scaling": 2.0, "adapter": True, "backward": True}
    oracle = expected_outputs(weights, x, dy, dtype=torch.float64, **kwargs)
    same = expected_outputs(weights, x, dy, dtype=torch.float32, **kwargs)
    assert set(oracle) == {"y", "dx", "dA", "dB", "dm"}
    provider = build_provider(name, weights, alpha=6, dropout=0.1)  # dropout is off in the check (eval)
    assert torch.equal(provider.magnitude, weights.magnitude)
    assert disagreement(provider_outputs(provider, x, dy, backward=True), oracle=oracle, same_dtype=same,
                        dtype=torch.float32) is None
    assert provider.module.training and all(p.grad is None for p in provider.module.parameters())


def test_the_addmm_layer_has_no_dora():
    with pytest.raises(ProviderUnavailable, match="no DoRA"):
        build_provider("unsloth", _dora_weights(), alpha=6, dropout=0.0)


def test_a_dora_provider_with_a_wrong_magnitude_or_none_is_reported_not_timed(monkeypatch):
    real_build = run_module.build_provider

    def build(name, weights, *, alpha, dropout):
        provider = real_build(name, weights, alpha=alpha, dropout=dropout)
        if name == "reference":  # a magnitude 1% off: y and every gradient but dm (which does not depend on m)
            with torch.no_grad():
                provider.magnitude.mul_(1.01)
        if name == "lorafuse":  # a LoRA layer on the DoRA weights: g = 1, and no magnitude to train
            lora_weights = dataclasses.replace(weights, magnitude=None)
            provider = real_build(name, lora_weights, alpha=alpha, dropout=dropout)
        return provider

    monkeypatch.setattr(run_module, "build_provider", build)
    config = Config(shapes=(Shape(9, 8, 6),), providers=("base", "reference", "lorafuse"), rank=2, alpha=4.0,
                    warmup=0, repeats=1, dora=True)
    base, wrong, lora = run_module.run(config, progress=False)
    assert base.status == "ok"
    assert wrong.status == "mismatch" and "y error" in wrong.reason and "dm" not in wrong.reason
    assert wrong.median_ms is None
    assert lora.status == "mismatch" and "y error" in lora.reason and "dm missing" in lora.reason


def test_disagreement_names_the_output_and_catches_nan():
    oracle = {"y": torch.ones(2, 2, dtype=torch.float64), "dx": torch.ones(2, 2, dtype=torch.float64)}
    same = {"y": torch.ones(2, 2), "dx": torch.ones(2, 2)}
    assert disagreement({"y": torch.ones(2, 2), "dx": torch.ones(2, 2)}, oracle=oracle, same_dtype=same,
                        dtype=torch.float32) is None
    bad = disagreement({"y": torch.ones(2, 2), "dx": torch.full((2, 2), 1.01)}, oracle=oracle, same_dtype=same,
                       dtype=torch.float32)
    # Only dx is out of bounds: one failure, and y (within its bound) is not reported.
    assert bad.startswith("dx error") and ";" not in bad and "y error" not in bad
    assert "y error nan" in disagreement({"y": torch.full((2, 2), float("nan")), "dx": torch.ones(2, 2)},
                                         oracle=oracle, same_dtype=same, dtype=torch.float32)
    assert "dx missing" in disagreement({"y": torch.ones(2, 2)}, oracle=oracle, same_dtype=same, dtype=torch.float32)


class _WrongScaling(nn.Module):
    """The reference math with scaling off by 2x: an adapter path bug the check must catch."""

    def __init__(self, weights, *, scaling):
        super().__init__()
        self.weight, self.bias = weights.weight, weights.bias
        self.lora_A, self.lora_B = nn.Parameter(weights.lora_A.clone()), nn.Parameter(weights.lora_B.clone())
        self.scaling = scaling

    def forward(self, x):
        return reference_lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, scaling=2 * self.scaling)


def test_a_provider_that_disagrees_is_reported_not_timed(monkeypatch):
    real_build = run_module.build_provider

    def build(name, weights, *, alpha, dropout):
        if name != "reference":
            return real_build(name, weights, alpha=alpha, dropout=dropout)
        module = _WrongScaling(weights, scaling=alpha / weights.lora_A.shape[0])
        return Provider("reference", module, module.lora_A, module.lora_B)

    monkeypatch.setattr(run_module, "build_provider", build)
    config = Config(shapes=(Shape(9, 8, 6),), providers=("base", "reference"), rank=2, alpha=4.0, warmup=0,
                    repeats=1)
    base, wrong = run_module.run(config, progress=False)
    assert base.status == "ok" and base.median_ms is not None
    assert wrong.status == "mismatch" and "y error" in wrong.reason
    assert wrong.median_ms is None and wrong.ratio_to_base is None and wrong.saved_bytes is None
    assert "mismatch: y error" in format_table([base, wrong])


def test_a_provider_that_raises_is_reported_and_the_run_goes_on(monkeypatch):
    real_build = run_module.build_provider

    def build(name, weights, *, alpha, dropout):
        if name == "reference":
            raise RuntimeError("boom")
        return real_build(name, weights, alpha=alpha, dropout=dropout)

    monkeypatch.setattr(run_module, "build_provider", build)
    config = Config(shapes=(Shape(9, 8, 6),), providers=("reference", "base"), rank=2, warmup=0, repeats=1)
    broken, base = run_module.run(config, progress=False)
    assert broken.status == "error" and "RuntimeError: boom" in broken.reason and broken.median_ms is None
    assert base.status == "ok"


def test_ratios_compare_the_same_shape_and_variant():
    def record(provider, variant, median, N=4):
        return Record(provider=provider, variant=variant, mode="infer", M=1, K=2, N=N, status="ok", median_ms=median)

    records = [record("base", "", 1.0), record("peft", "", 4.0), record("peft", "merged", 2.0),
               record("lorafuse", "", 2.0), record("lorafuse", "merged", 1.0), record("lorafuse", "", 3.0, N=8)]
    add_ratios(records)
    assert [(r.ratio_to_base, r.ratio_to_peft) for r in records] == [
        (1.0, 0.25), (4.0, 1.0), (2.0, 1.0), (2.0, 0.5), (1.0, 0.5), (None, None)]


def test_timer_clears_grads_before_each_call_and_orders_its_quantiles():
    x = torch.randn(4, requires_grad=True)
    seen = []

    def step():
        seen.append(x.grad)
        (x * 2).sum().backward()

    timing = time_step(step, device="cpu", grads=[x], warmup=1, repeats=5)
    assert seen == [None] * 6
    assert timing.p20_ms <= timing.median_ms <= timing.p80_ms
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 0"):
        time_step(step, device="cpu", repeats=0)


def test_quantile_interpolates_like_torch():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert _quantile(samples, q) == pytest.approx(torch.quantile(torch.tensor(samples), q).item())


def test_format_bytes():
    assert [format_bytes(n) for n in (None, 0, 520, 32 * 1024, 3 * 2**20, 5 * 2**30)] == [
        "n/a", "0 B", "520 B", "32.0 KiB", "3.0 MiB", "5.00 GiB"]


def test_two_gemm_baseline_gradients_pass_gradcheck():
    weight, bias = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    lora_A, lora_B = torch.randn(3, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    layer = AddmmLoRALinear(weight, bias, lora_A, lora_B, scaling=0.7)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert layer(x).shape == (2, 4, 5)
    inputs = (x.detach().reshape(8, 6).requires_grad_(), lora_A.clone().requires_grad_(),
              lora_B.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, A, B: _AddmmLoRAFunction.apply(x, weight, bias, A, B, 0.7), inputs)
    # Beyond the parameters it keeps x alone: xa is recomputed in backward.
    assert saved_bytes(lambda: layer(x), x=x, module=layer) == (2 * 4 * 6 * 8, 0)


def test_kernel_tests_and_the_benchmark_share_one_tolerance_rule():
    import conftest

    from lorafuse.bench import compare

    assert conftest.ATOL is compare.ATOL
    oracle = torch.ones(3, 4, dtype=torch.float64)
    conftest.assert_close_to_oracle(torch.ones(3, 4), torch.ones(3, 4), oracle, name="y", dtype=torch.float32)
    with pytest.raises(AssertionError, match=r"^y: kernel error 0\.001 > bound 1e-05"):
        conftest.assert_close_to_oracle(torch.full((3, 4), 1.001, dtype=torch.float64), torch.ones(3, 4), oracle,
                                        name="y", dtype=torch.float32)
    # A (1, 4) result would broadcast against every row of the oracle: its shape alone fails it.
    with pytest.raises(AssertionError, match=r"y: kernel has shape \(1, 4\), expected \(3, 4\)"):
        conftest.assert_close_to_oracle(torch.ones(1, 4), torch.ones(3, 4), oracle, name="y", dtype=torch.float32)


def test_peak_memory_clears_stale_gradients_before_measuring(monkeypatch):
    from lorafuse.bench import measure

    x = torch.randn(4, requires_grad=True)
    x.grad = torch.ones(4)  # left by the timed calls: it would count towards the peak
    seen = {}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: seen.update(at_reset=x.grad))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 100)

    def step():
        seen["in_step"] = x.grad

    assert measure.peak_memory(step, device="cuda", grads=[x], baseline=30) == 70
    assert seen == {"at_reset": None, "in_step": None}


def test_run_hands_the_step_gradients_to_peak_memory(monkeypatch):
    handed = []

    def peak_memory(step, *, device, baseline, grads):
        handed.append(len(grads))
        return None

    monkeypatch.setattr(run_module, "peak_memory", peak_memory)
    config = Config(shapes=(Shape(9, 8, 6),), providers=("reference",), rank=2, warmup=0, repeats=1)
    (record,) = run_module.run(config, progress=False)
    assert record.status == "ok" and handed == [3]  # x, lora_A and lora_B


def test_no_peft_ratio_for_a_variant_peft_did_not_time():
    def record(provider, variant, median):
        return Record(provider=provider, variant=variant, mode="infer", M=1, K=2, N=4, status="ok", median_ms=median)

    records = [record("peft", "", 4.0), record("lorafuse", "", 2.0), record("lorafuse", "merged", 1.0)]
    add_ratios(records)
    # Merged lorafuse against unmerged PEFT would credit lorafuse with the merge itself.
    assert [r.ratio_to_peft for r in records] == [1.0, 0.5, None]


def test_git_commit_is_recorded_only_for_lorafuse_own_checkout(monkeypatch, tmp_path):
    import pathlib

    import lorafuse
    from lorafuse.bench import environment

    checkout = pathlib.Path(lorafuse.__file__).resolve().parents[1]
    answers = {("rev-parse", "HEAD"): "abc123", ("status", "--porcelain", "--untracked-files=no"): " M x.py"}
    for toplevel, commit, dirty in ((str(checkout), "abc123", True), (str(tmp_path), None, None)):
        # tmp_path: lorafuse installed inside another repository (a venv in a project), whose commit says
        # nothing about lorafuse's code.
        monkeypatch.setattr(environment, "_git", lambda *args, top=toplevel: answers.get(args, top))
        described = environment.describe("cpu")
        assert (described["git_commit"], described["git_dirty"]) == (commit, dirty)
