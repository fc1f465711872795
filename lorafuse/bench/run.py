"""Running the benchmark: for each shape, every provider on identical weights and inputs is checked
against the oracle, then timed, its memory measured and its saved bytes counted."""

import gc
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from .compare import disagreement, expected_outputs, provider_outputs
from .measure import peak_memory, saved_bytes, step_flops, time_step
from .providers import ProviderUnavailable, build_provider, make_weights
from .steps import make_step, training_forward


@dataclass(frozen=True)
class Config:
    """One benchmark run. shapes: Shape list; providers: names from providers.PROVIDERS; dora: DoRA layers
    (the weights get a magnitude) instead of LoRA's."""

    shapes: tuple
    providers: tuple
    mode: str = "train"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 10
    seed: int = 0
    dora: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class Record:
    """One provider on one shape. status: "ok" (timed), "mismatch" (disagreed with the oracle, not timed),
    "skipped" (cannot run here) or "error" (raised); `reason` says why for all but "ok".
    variant: "merged" for a merged inference layer, "" otherwise."""

    provider: str
    variant: str
    mode: str
    M: int
    K: int
    N: int
    status: str
    reason: Optional[str] = None
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    flops: Optional[int] = None
    tflops: Optional[float] = None
    ratio_to_base: Optional[float] = None
    ratio_to_peft: Optional[float] = None
    peak_bytes: Optional[int] = None
    saved_bytes: Optional[int] = None
    saved_beyond_x_bytes: Optional[int] = None

    @property
    def label(self) -> str:
        return f"{self.provider} ({self.variant})" if self.variant else self.provider


def run(config: Config, *, progress=True) -> list:
    """Records for every (shape, provider), in the order given, with ratios to `base` and `peft` filled in."""
    records = []
    with tqdm(total=len(config.shapes) * len(config.providers), disable=not progress, unit="layer", leave=False) as bar:
        for shape in config.shapes:
            records.extend(_run_shape(config, shape, bar))
    add_ratios(records)
    return records


def _inputs(config, shape):
    generator = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(shape.M, shape.K, generator=generator).to(device=config.device, dtype=config.dtype)
    dy = torch.randn(shape.M, shape.N, generator=generator).to(device=config.device, dtype=config.dtype)
    return x, dy


def _run_shape(config, shape, bar):
    weights = make_weights(in_features=shape.K, out_features=shape.N, rank=config.rank, dtype=config.dtype,
                           device=config.device, seed=config.seed, dora=config.dora, scaling=config.scaling)
    x, dy = _inputs(config, shape)
    backward = config.mode != "infer"
    expected = {}
    for adapter in {name != "base" for name in config.providers}:
        kwargs = {"scaling": config.scaling, "adapter": adapter, "backward": backward}
        expected[adapter] = (expected_outputs(weights, x, dy, dtype=torch.float64, **kwargs),
                             expected_outputs(weights, x, dy, dtype=config.dtype, **kwargs))
    for name in config.providers:
        bar.set_postfix_str(f"{name} {shape}")
        yield from _run_provider(config, shape, name, weights, x, dy, expected)
        bar.update()


def _run_provider(config, shape, name, weights, x, dy, expected):
    def record(variant="", **values):
        return Record(provider=name, variant=variant, mode=config.mode, M=shape.M, K=shape.K, N=shape.N, **values)

    baseline = torch.cuda.memory_allocated(config.device) if torch.device(config.device).type == "cuda" else 0
    try:
        provider = build_provider(name, weights, alpha=config.alpha, dropout=config.dropout)
    except ProviderUnavailable as exc:
        yield record(status="skipped", reason=str(exc))
        return
    except Exception as exc:  # e.g. a peer's API changed: report it and go on with the others
        yield record(status="error", reason=f"building it raised {type(exc).__name__}: {exc}")
        return
    variants = ["", "merged"] if config.mode == "infer" and provider.merge is not None else [""]
    for variant in variants:
        try:
            if variant == "merged":
                provider.merge()
            yield _measure(config, shape, provider, x, dy, expected, baseline, record(variant, status="ok"))
        except Exception as exc:  # one provider failing must not hide the others' numbers
            yield record(variant, status="error", reason=f"{type(exc).__name__}: {exc}")
    del provider
    gc.collect()


def _measure(config, shape, provider, x, dy, expected, baseline, record):
    backward = config.mode != "infer"
    oracle, same_dtype = expected[provider.has_adapter]
    problem = disagreement(provider_outputs(provider, x, dy, backward=backward), oracle=oracle,
                           same_dtype=same_dtype, dtype=config.dtype)
    if problem is not None:
        record.status, record.reason = "mismatch", problem
        return record
    if config.mode != "infer":
        forward, x_grad = training_forward(provider.module, x)
        record.saved_bytes, record.saved_beyond_x_bytes = saved_bytes(forward, x=x_grad, module=provider.module)
    step, grads = make_step(provider.module, x, dy, mode=config.mode)
    timing = time_step(step, device=config.device, grads=grads, warmup=config.warmup, repeats=config.repeats)
    record.median_ms, record.p20_ms, record.p80_ms = timing
    record.peak_bytes = peak_memory(step, device=config.device, baseline=baseline, grads=grads)
    record.flops = step_flops(shape, rank=config.rank, mode=config.mode, adapter=provider.has_adapter,
                              merged=record.variant == "merged", dora=config.dora)
    record.tflops = record.flops / (timing.median_ms * 1e-3) / 1e12
    return record


def add_ratios(records) -> None:
    """ratio_to_base / ratio_to_peft: median time over that of `base` / `peft` on the same shape (and for
    peft, the same variant), where both were timed. A merged row gets no PEFT ratio when PEFT's merged row was
    not timed: set against PEFT's unmerged time it would credit the merge to the provider."""
    timed = {(r.provider, r.variant, r.M, r.K, r.N): r.median_ms for r in records if r.median_ms is not None}
    for r in records:
        if r.median_ms is None:
            continue
        base = timed.get(("base", "", r.M, r.K, r.N))
        peft = timed.get(("peft", r.variant, r.M, r.K, r.N))
        r.ratio_to_base = None if base is None else r.median_ms / base
        r.ratio_to_peft = None if peft is None else r.median_ms / peft
