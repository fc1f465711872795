"""Building blocks for the core tests: random LoRA problems and their oracle gradients."""

import torch
from conftest import assert_close_to_oracle

from lorafuse import lora_linear, reference
from lorafuse.function import dropout_mask


def make_problem(M, K, N, r, *, dtype, device, bias=True, base_grad=False, leading=None, scale=1.0,
                 adapter_dtype=None):
    """Random x, W, b, A, B with requires_grad set as a training step has it.

    B is random (not zeros as at init) so the adapter path is exercised. `leading` replaces M by a
    tuple of leading dims (3-D inputs). adapter_dtype: A and B's dtype (default: dtype).
    """
    adapter_dtype = adapter_dtype or dtype
    x_shape = (*leading, K) if leading is not None else (M, K)
    x = (torch.randn(x_shape, device=device) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype).requires_grad_(base_grad)
    b = (torch.randn(N, device=device)).to(dtype).requires_grad_(base_grad) if bias else None
    lora_A = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype).requires_grad_()
    lora_B = (torch.randn(N, r, device=device) / r**0.5).to(adapter_dtype).requires_grad_()
    return x, weight, b, lora_A, lora_B


def oracle(tensors, *, scaling, dropout_p, seed, dtype, adapter_dtype=None):
    """Output and gradients of the reference with the kernels' own mask, inputs cast to `dtype` (the
    adapters to `adapter_dtype`, default `dtype`).

    Returns (y, grads) where grads maps names to gradients of sum(y * dy) with a fixed dy.
    """
    names = ("x", "weight", "bias", "lora_A", "lora_B")
    leaves = {}
    for name, t in zip(names, tensors):
        if t is not None:
            cast = adapter_dtype or dtype if name in ("lora_A", "lora_B") else dtype
            leaves[name] = t.detach().to(cast).requires_grad_(t.requires_grad)
    x = leaves["x"]
    mask = None
    if dropout_p > 0:
        mask = dropout_mask(seed, x.shape, dropout_p, x.device)
    y = reference.lora_linear(x, leaves["weight"], leaves.get("bias"), leaves["lora_A"], leaves["lora_B"],
                              scaling=scaling, keep_mask=mask, dropout_p=dropout_p)
    return y, leaves


def grads_of(y, leaves, dy):
    wanted = [(name, t) for name, t in leaves.items() if t.requires_grad]
    grads = torch.autograd.grad(y, [t for _, t in wanted], dy.to(y.dtype))
    return {name: g for (name, _), g in zip(wanted, grads)}


SEED = 20261123


def check_against_oracle(tensors, *, scaling, dropout_p, dtype, seed=SEED):
    """Run lora_linear and the oracle (fp64 and `dtype`) with one mask and compare y and every gradient."""
    x, weight, bias, lora_A, lora_B = tensors
    y = lora_linear(x, weight, bias, lora_A, lora_B, scaling=scaling, dropout_p=dropout_p, seed=seed)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    # dy in y's dtype from the start, so every run (fp64 oracle included) differentiates the same dy: its
    # rounding is an input, not an error of the computation under test.
    dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    leaves = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    leaves = {name: t for name, t in leaves.items() if t is not None}

    def run_oracle(dtype, adapter_dtype):
        return oracle(tensors, scaling=scaling, dropout_p=dropout_p, seed=seed, dtype=dtype,
                      adapter_dtype=adapter_dtype)

    compare_to_oracle(y, leaves, dy, run_oracle, dtype=dtype, adapter_dtype=lora_A.dtype)


def compare_to_oracle(y, leaves, dy, run_oracle, *, dtype, adapter_dtype, own_checks=None):
    """y and the gradients of `leaves` (name -> tensor) for `dy` against the oracle, by the oracle rule.

    run_oracle(dtype, adapter_dtype) -> (y, leaves) runs the oracle in those dtypes: fp64, and PyTorch's own
    result in the dtypes under test (x, W and b in `dtype`, the adapters in theirs: fp32 adapters on a
    half-precision model compute the low-rank path in fp32, as PEFT does). own_checks: name -> check(grad,
    grad64, y64) for a gradient the rule does not fit.
    """
    kernel_grads = grads_of(y, leaves, dy)
    y64, leaves64 = run_oracle(torch.float64, torch.float64)
    y_same, leaves_same = run_oracle(dtype, adapter_dtype)
    grads64 = grads_of(y64, leaves64, dy)
    grads_same = grads_of(y_same, leaves_same, dy)
    assert_close_to_oracle(y, y_same, y64, name="y", dtype=dtype)
    assert set(kernel_grads) == set(grads64)
    for name in grads64:
        assert kernel_grads[name].dtype == leaves[name].dtype
        if own_checks and name in own_checks:
            own_checks[name](kernel_grads[name], grads64[name], y64)
            continue
        grad_dtype = leaves[name].dtype  # fp32 adapters get fp32 gradients, held to fp32's tolerance
        assert_close_to_oracle(kernel_grads[name], grads_same[name], grads64[name], name=f"d{name}",
                               dtype=grad_dtype)
