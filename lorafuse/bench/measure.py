"""Measuring one step: its time, its peak memory, the bytes autograd saves for backward, and its FLOPs."""

import statistics
import time
from typing import NamedTuple, Optional

import torch

#: On a GPU, triton.testing.do_bench's budgets (ms): long enough for a stable median of a 4096-wide GEMM.
GPU_WARMUP_MS = 25
GPU_REP_MS = 100


class Timing(NamedTuple):
    """Milliseconds per call: the median and the 20th and 80th percentiles."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def time_step(step, *, device, grads=(), warmup=2, repeats=10) -> Timing:
    """Time `step()`, setting each tensor in `grads` to .grad = None before every call (so backward never
    accumulates). On CUDA triton's do_bench, which also flushes the L2 cache between calls; elsewhere
    time.perf_counter over `warmup` untimed and `repeats` timed calls."""
    for name, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if torch.device(device).type == "cuda":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(step, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, grad_to_none=list(grads),
                                                   quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    samples = []
    for i in range(warmup + repeats):
        for tensor in grads:
            tensor.grad = None
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            samples.append(elapsed * 1e3)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8))


def _quantile(samples, q):
    """Linear interpolation between order statistics (what torch.quantile and numpy do by default)."""
    ordered = sorted(samples)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def peak_memory(step, *, device, baseline, grads=()) -> Optional[int]:
    """The most bytes allocated while one `step()` runs, above `baseline` (what was allocated before the
    provider was built: the shared inputs and master weights). None where torch tracks no allocations (CPU).

    `grads` (x and the adapter parameters, as make_step gives them) get .grad = None first: the timed calls
    leave their gradients allocated, and a step that starts with them counts them on top of its own."""
    if torch.device(device).type != "cuda":
        return None
    for tensor in grads:
        tensor.grad = None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


class SavedBytes(NamedTuple):
    """Bytes autograd keeps for backward: `total` over unique storages other than parameters; `beyond_x` is
    `total` less the storage of the input x, when x itself is among them."""

    total: int
    beyond_x: int


def saved_bytes(forward, *, x, module) -> SavedBytes:
    """Count what autograd saves while `forward()` runs, once per storage (views of one tensor count once),
    excluding `module`'s parameters. The figure is the same on every device."""
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        # Keeping the tensor alive keeps its address unique while the graph exists.
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    total = sum(storages.values())
    x_bytes = storages.get(x.untyped_storage().data_ptr(), 0)
    del output
    return SavedBytes(total, total - x_bytes)


def step_flops(shape, *, rank, mode, adapter, merged=False, dora=False) -> int:
    """FLOPs of the math of one step, 2 per multiply-add, counting GEMMs only (bias, scaling, dropout are
    O(M*N) or O(M*K)). A recomputation a provider chooses is not counted, so TFLOP/s compares like for like.

    Forward: x @ W^T is 2MNK; the adapter adds xa = x @ A^T (2MKr) and xa @ B^T (2MNr).
    Backward (input gradient, W frozen): dy @ W is 2MNK; the adapter adds dy @ B (2MNr), dB = dy^T @ xa
    (2MNr), dA = dxa^T @ x (2MKr) and dxa @ A (2MKr). A merged layer is a plain linear.
    DoRA (`dora` with `adapter`) adds to the forward the row norms ||W + s B A||: B @ A is 2NKr (the norm's
    squares are O(NK)). Its backward has the same GEMMs (the norm is detached; g and dm are O(MN)).
    PEFT's DoRA in training with dropout > 0 also multiplies W by the dropped x (another 2MNK): that is a
    different function, and not counted.
    """
    M, K, N = shape
    base = 2 * M * N * K
    lora_fwd = 2 * M * rank * (K + N) if adapter and not merged else 0
    if dora and adapter and not merged:
        lora_fwd += 2 * N * K * rank
    lora_bwd = 4 * M * rank * (K + N) if adapter else 0
    if mode in ("fwd", "infer"):
        return base + lora_fwd
    if mode == "bwd":
        return base + lora_bwd
    if mode == "train":
        return 2 * base + lora_fwd + lora_bwd
    raise ValueError(f"mode must be fwd, bwd, train or infer, got {mode!r}")
