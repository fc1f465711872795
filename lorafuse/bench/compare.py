"""Checking that the providers agree before any of them is timed.

Dropout makes outputs differ by construction, so the check runs with dropout off: every provider in eval
mode (where each turns dropout off as nn.Dropout does) on identical weights and inputs, with autograd on.
Each output and gradient is held to the rule the kernel tests use: its error against a float64 oracle is at
most twice PyTorch's own error in the same dtype, plus a small tolerance relative to the output's size.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from ..reference import lora_linear as reference_lora_linear

#: Slack relative to the largest |oracle| value, on top of twice PyTorch's error (tests/conftest.py's values).
RELATIVE_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def expected_outputs(weights, x, dy, *, scaling, adapter, backward, dtype) -> dict:
    """y (and with `backward`, dx, plus dA and dB with `adapter`) of the plain PyTorch math in `dtype`:
    `reference.lora_linear` without dropout, or the base linear alone when not `adapter`."""
    weight, bias, lora_A, lora_B = (t.detach().to(dtype) for t in (weights.weight, weights.bias, weights.lora_A,
                                                                    weights.lora_B))
    x = x.detach().to(dtype).requires_grad_(backward)
    lora_A.requires_grad_(backward and adapter)
    lora_B.requires_grad_(backward and adapter)
    with torch.set_grad_enabled(backward):
        if adapter:
            y = reference_lora_linear(x, weight, bias, lora_A, lora_B, scaling=scaling)
        else:
            y = F.linear(x, weight, bias)
    outputs = {"y": y.detach()}
    if backward:
        y.backward(dy.to(dtype))
        outputs["dx"] = x.grad
        if adapter:
            outputs["dA"], outputs["dB"] = lora_A.grad, lora_B.grad
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
        if tuple(value.shape) != tuple(expected.shape):
            failures.append(f"{name} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}")
            continue
        error = (value.double() - expected).abs().max().item()
        torch_error = (same_dtype[name].double() - expected).abs().max().item()
        bound = 2 * torch_error + RELATIVE_ATOL[dtype] * max(1.0, expected.abs().max().item())
        if not error <= bound:  # also catches NaN
            failures.append(f"{name} error {error:.3g} > bound {bound:.3g}")
    return "; ".join(failures) or None
