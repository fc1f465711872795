"""pytest-benchmark suites: every provider of `python -m lorafuse.bench` per shape, mode and dropout.

Run with `make bench` (python -m pytest -q bench --benchmark-only); kept out of `make test`. On a GPU the
shapes are Llama-7B's projections with 8192 tokens in bf16; on a CPU the `small` preset in fp32 with
lorafuse on its PyTorch path, which shows that the suite runs, not how fast the kernels are. Each case is
checked against the float64 oracle (dropout off) before it is timed, and its saved-for-backward bytes go
into the benchmark's extra_info. Compare providers within a group:
    python -m pytest -q bench --benchmark-only --benchmark-group-by=group --benchmark-json=out.json
"""

import pytest
import torch

from lorafuse.bench.compare import disagreement, expected_outputs, provider_outputs
from lorafuse.bench.environment import describe
from lorafuse.bench.measure import saved_bytes, step_flops
from lorafuse.bench.providers import PROVIDERS, ProviderUnavailable, build_provider, make_weights
from lorafuse.bench.shapes import parse_shapes
from lorafuse.bench.steps import make_step, training_forward

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32
SHAPES = parse_shapes(["llama-7b"], tokens=8192) if HAS_GPU else parse_shapes(["small"], tokens=512)
RANK, ALPHA = 16, 32.0
#: Timed calls per case. A GPU call of these shapes takes about a millisecond, a CPU one tens of them.
ROUNDS, WARMUP_ROUNDS = (50, 10) if HAS_GPU else (5, 1)
#: "infer-merged" is the eval forward after merge(), for providers that can merge.
MODES = ("fwd", "bwd", "train", "infer", "infer-merged")


def _sync():
    if HAS_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("provider_name", PROVIDERS)
def test_layer(benchmark, provider_name, shape, mode, dropout):
    if mode.startswith("infer") and dropout:
        pytest.skip("eval forward: dropout is off, so it equals the dropout=0 case")
    weights = make_weights(in_features=shape.K, out_features=shape.N, rank=RANK, dtype=DTYPE, device=DEVICE)
    try:
        provider = build_provider(provider_name, weights, alpha=ALPHA, dropout=dropout)
    except ProviderUnavailable as exc:
        pytest.skip(str(exc))
    merged = mode == "infer-merged"
    if merged and provider.merge is None:
        pytest.skip(f"{provider_name} has no merge()")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape.M, shape.K, generator=generator).to(device=DEVICE, dtype=DTYPE)
    dy = torch.randn(shape.M, shape.N, generator=generator).to(device=DEVICE, dtype=DTYPE)
    backward = not mode.startswith("infer")
    if merged:
        provider.merge()
    expected = {dtype: expected_outputs(weights, x, dy, scaling=ALPHA / RANK, adapter=provider.has_adapter,
                                        backward=backward, dtype=dtype) for dtype in (torch.float64, DTYPE)}
    problem = disagreement(provider_outputs(provider, x, dy, backward=backward), oracle=expected[torch.float64],
                           same_dtype=expected[DTYPE], dtype=DTYPE)
    assert problem is None, f"{provider_name} disagrees with the oracle: {problem}"

    if backward:
        forward, x_grad = training_forward(provider.module, x)
        benchmark.extra_info["saved_bytes"], benchmark.extra_info["saved_beyond_x_bytes"] = saved_bytes(
            forward, x=x_grad, module=provider.module)
    step, grads = make_step(provider.module, x, dy, mode="infer" if merged else mode)
    flops = step_flops(shape, rank=RANK, mode="infer" if merged else mode, adapter=provider.has_adapter,
                       merged=merged)
    benchmark.group = f"{mode} {shape} dropout={dropout}"
    benchmark.extra_info.update(flops=flops, device=describe(DEVICE)["device"], dtype=str(DTYPE), rank=RANK,
                                alpha=ALPHA, dropout=dropout)

    def clear_grads():
        for tensor in grads:
            tensor.grad = None

    def timed():
        step()
        _sync()  # pytest-benchmark reads a wall clock; on a GPU the call is done only when the stream is

    benchmark.pedantic(timed, setup=clear_grads, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12
