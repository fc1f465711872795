"""Checking that the providers agree before any of them is timed.

Dropout makes outputs differ by construction, so the check runs with dropout off: every provider in eval
mode (where each turns dropout off as nn.Dropout does) on identical weights and inputs, with autograd on.
Each output and gradient is held to the rule the kernel tests use (`oracle_error`, which tests/conftest.py
imports): its error against a float64 oracle is at most twice PyTorch's own error in the same dtype, plus a
small tolerance relative to the output's size.

For DoRA the check is as meaningful as for LoRA: in eval mode every DoRA provider (PEFT's included) computes
g * (x @ W^T + s * x @ A^T @ B^T) + b, the function `reference.dora_linear` gives without dropout. In
training with dropout > 0 PEFT's DoRA is another function (it also rescales W @ dropout(x)), which is why
agreement is checked in eval mode only and says nothing about dropout's placement.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ..reference import dora_linear as reference_dora_linear
from ..reference import lora_linear as reference_lora_linear

#: Slack per dtype, times max(1, largest |oracle| value), on top of twice PyTorch's own error. The one table
#: for both the benchmark's check and the kernel tests (tests/conftest.py imports it).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def oracle_error(actual, torch_same_dtype, oracle, *, dtype) -> Optional[str]:
    """None when `actual` is close enough to the float64 `oracle`, else why not ("error 0.1 > bound 0.01 ...").

    The bound is flash-attention's rule: twice PyTorch's own error (`torch_same_dtype`, the same math in
    `dtype`, against `oracle`) plus ATOL[dtype] * max(1, max |oracle|). A NaN fails, and so does a shape that
    differs from the oracle's: broadcasting would compare a (1, N) result against every row of an (M, N) one.
    """
    for label, tensor in (("", actual), ("PyTorch's same-dtype result ", torch_same_dtype)):
        if tuple(tensor.shape) != tuple(oracle.shape):
            return f"{label}has shape {tuple(tensor.shape)}, expected {tuple(oracle.shape)}"
    oracle = oracle.double()
    error = (actual.double() - oracle).abs().max().item()
    torch_error = (torch_same_dtype.double() - oracle).abs().max().item()
    bound = 2 * torch_error + ATOL[dtype] * max(1.0, oracle.abs().max().item())
    if not error <= bound:  # also catches NaN
        return f"error {error:.3g} > bound {bound:.3g} (PyTorch's own error {torch_error:.3g})"
    return None


def expected_outputs(weights, x, dy, *, scaling, adapter, backward, dtype) -> dict:
    """y (and with `backward`, dx, plus dA and dB with `adapter`, and dm for DoRA weights) of the plain
    PyTorch math in `dtype`: `reference.lora_linear` without dropout (`reference.dora_linear` when the weights
    carry a magnitude), or the base linear alone when not `adapter`."""
    dora = adapter and weights.magnitude is not None
    weight, bias, lora_A, lora_B = (t.detach().to(dtype) for t in (weights.weight, weights.bias, weights.lora_A,
                                                                    weights.lora_B))
    magnitude = weights.magnitude.detach().to(dtype).requires_grad_(backward) if dora else None
    x = x.detach().to(dtype).requires_grad_(backward)
    lora_A.requires_grad_(backward and adapter)
    lora_B.requires_grad_(backward and adapter)
    with torch.set_grad_enabled(backward):
        if dora:
            y = reference_dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling=scaling)
        elif adapter:
            y = reference_lora_linear(x, weight, bias, lora_A, lora_B, scaling=scaling)
        else:
            y = F.linear(x, weight, bias)
    outputs = {"y": y.detach()}
    if backward:
        y.backward(dy.to(dtype))
        outputs["dx"] = x.grad
        if adapter:
            outputs["dA"], outputs["dB"] = lora_A.grad, lora_B.grad
        if dora:
            outputs["dm"] = magnitude.grad
    return outputs


def provider_outputs(provider, x, dy, *, backward) -> dict:
    """The same outputs from `provider`, run in eval mode (dropout off); its gradients are cleared after."""
    module = provider.module
    was_training = module.training
    module.eval()
    x = x.detach().clone().requires_grad_(backward)
    try:
        with torch.set_grad_enabled(backward):
            y = module(x)
        outputs = {"y": y.detach()}
        if backward:
            y.backward(dy)
            outputs["dx"] = x.grad
            if provider.has_adapter:
                outputs["dA"], outputs["dB"] = provider.lora_A.grad, provider.lora_B.grad
            if provider.magnitude is not None:
                outputs["dm"] = provider.magnitude.grad
    finally:
        module.train(was_training)
        for param in module.parameters():
            param.grad = None
    return outputs


def disagreement(actual, *, oracle, same_dtype, dtype) -> Optional[str]:
    """None when every output in `actual` is within the bound; otherwise which are not, with their errors.

    oracle: the float64 outputs; same_dtype: PyTorch's own outputs in `dtype`, whose error sets the bound.
    """
    failures = []
    for name, expected in oracle.items():
        value = actual.get(name)
        if value is None:
            failures.append(f"{name} missing")
            continue
        problem = oracle_error(value, same_dtype[name], expected, dtype=dtype)
        if problem is not None:
            failures.append(f"{name} {problem}")
    return "; ".join(failures) or None
