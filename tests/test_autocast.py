"""torch.autocast around FusedLoRALinear behaves as it does around nn.Linear: the same output dtype,
fp32 gradients for fp32 parameters, and values as accurate as PyTorch's own low-precision LoRA."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_oracle

from lorafuse import FusedLoRALinear, reference

# Interpreted bf16 dots go through fp32 in the kernels (kernels/common.py UPCAST), so bf16 runs on CPU too.
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def _layer(device):
    layer = FusedLoRALinear(32, 40, r=4, lora_alpha=8, device=device)
    torch.nn.init.normal_(layer.lora_B)
    return layer


def _unfused(x, layer):
    """LoRA written with nn.functional ops, which autocast casts like nn.Linear."""
    return (F.linear(x, layer.weight, layer.bias)
            + layer.scaling * F.linear(F.linear(x, layer.lora_A), layer.lora_B))


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_autocast_output_dtype_and_accuracy(device, dtype):
    layer = _layer(device)
    x = torch.randn(3, 7, 32, device=device, requires_grad=True)
    with torch.autocast(device.type, dtype=dtype):
        y = layer(x)
        y_torch = _unfused(x, layer)
        y_linear = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == y_linear.dtype == dtype
    operands = [t.detach().to(dtype).double() for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
    oracle = reference.lora_linear(*operands, scaling=layer.scaling)
    assert_close_to_oracle(y, y_torch, oracle, name=f"autocast {dtype} y", dtype=dtype)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_autocast_gradients_keep_parameter_dtypes(device, dtype):
    layer = _layer(device)
    x = torch.randn(5, 32, device=device, requires_grad=True)
    dy = torch.randn(5, 40, device=device)
    with torch.autocast(device.type, dtype=dtype):
        y = layer(x)
    (y.float() * dy).sum().backward()
    grads = {"x": x.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}

    x_ref = x.detach().clone().requires_grad_()
    A_ref = layer.lora_A.detach().clone().requires_grad_()
    B_ref = layer.lora_B.detach().clone().requires_grad_()
    with torch.autocast(device.type, dtype=dtype):
        y_ref = (F.linear(x_ref, layer.weight, layer.bias) + layer.scaling * F.linear(F.linear(x_ref, A_ref), B_ref))
    (y_ref.float() * dy).sum().backward()
    expected = {"x": x_ref.grad, "lora_A": A_ref.grad, "lora_B": B_ref.grad}
    for name, grad in grads.items():
        # As with nn.Linear under autocast: gradients come back in the leaves' own dtype (fp32).
        assert grad.dtype == torch.float32, name
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grad, expected[name], atol=3e-2 * scale, rtol=0,
                                   msg=lambda m, n=name: f"{dtype} d{n}: {m}")
    assert layer.weight.grad is None


def test_autocast_disabled_inside_runs_in_parameter_dtype(device):
    layer = _layer(device)
    x = torch.randn(4, 32, device=device)
    with torch.autocast(device.type, dtype=torch.float16):
        assert layer(x).dtype == torch.float16
        with torch.autocast(device.type, enabled=False):
            assert layer(x).dtype == F.linear(x, layer.weight).dtype == torch.float32


def test_autocast_leaves_float64_alone(device):
    # Autocast never casts fp64 tensors; nn.Linear stays fp64 under it, and so must the layer.
    layer = _layer(device).double()
    x = torch.randn(5, 32, device=device, dtype=torch.float64)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        linear_out = F.linear(x, layer.weight, layer.bias)
        out = layer(x)
    assert linear_out.dtype == out.dtype == torch.float64
    torch.testing.assert_close(out, _unfused(x, layer))
