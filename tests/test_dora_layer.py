"""FusedDoRALinear and dora_linear: a new layer equals its base, the oracle's outputs and gradients, merging,
to_linear, GPT-2's Conv1D, the magnitude's dtype, and the errors a user can run into."""

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from lorafuse import FusedDoRALinear, FusedLoRALinear, dora_linear, reference


def _linear(in_features=24, out_features=20, *, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


@torch.no_grad()
def _randomize(layer, *, seed=1):
    """Non-zero B and a magnitude away from the row norms, so that g != 1 and the adapter does something."""
    generator = torch.Generator().manual_seed(seed)
    layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))
    spread = 1 + 0.3 * torch.randn(layer.lora_magnitude_vector.shape, generator=generator)
    layer.lora_magnitude_vector.mul_(spread.to(layer.lora_magnitude_vector.dtype))
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_new_layer_equals_its_base_and_starts_at_the_row_norms(bias):
    base = _linear(bias=bias)
    layer = FusedDoRALinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.weight is base.weight and layer.lora_magnitude_vector.requires_grad
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), base.weight.detach().norm(dim=1))
    x = torch.randn(3, 5, 24)
    # g = ||W|| / ||W|| is 1 up to one rounding of the division: a few fp32 ulps of the output.
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


def test_adapter_parameters_name_the_magnitude_too():
    dora = FusedDoRALinear(8, 6, r=2)
    lora = FusedLoRALinear(8, 6, r=2)
    assert dora.adapter_parameters() == [dora.lora_A, dora.lora_B, dora.lora_magnitude_vector]
    assert lora.adapter_parameters() == [lora.lora_A, lora.lora_B]
    assert "use_dora=True" in repr(dora)


@pytest.mark.parametrize("bias", [True, False])
def test_output_and_gradients_match_the_fp64_oracle(bias):
    layer = _randomize(FusedDoRALinear.from_linear(_linear(bias=bias), r=4, lora_alpha=8)).double()
    x = torch.randn(7, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 20, dtype=torch.float64)
    params = layer.adapter_parameters()
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params], dy)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    y_ref = reference.dora_linear(x_ref, layer.weight, layer.bias, *ref_params, scaling=layer.scaling)
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *ref_params], dy)
    torch.testing.assert_close(y, y_ref)
    for name, grad, ref in zip(("x", "lora_A", "lora_B", "lora_magnitude_vector"), grads, ref_grads):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(grad, ref, msg=name)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_and_unmerge_round_trip(fan_in_fan_out):
    if fan_in_fan_out:
        torch.manual_seed(0)
        conv = Conv1D(20, 24)
        nn.init.normal_(conv.weight, std=0.2)
        layer = FusedDoRALinear.from_conv1d(conv, r=4, lora_alpha=8)
    else:
        layer = FusedDoRALinear.from_linear(_linear(), r=4, lora_alpha=8)
    layer = _randomize(layer).eval()
    weight = layer.weight.detach().clone()
    x = torch.randn(6, 24)
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        assert layer.merged and layer.weight.shape == weight.shape
        # fp32: W' = g * (W + s B A) rounds each entry once or twice, 1e-6 relative to |W'| ~ 0.1-1.
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.merged_weight(), layer.base_weight())
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(layer.weight, weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_to_linear_computes_the_layer_and_leaves_it_alone():
    layer = _randomize(FusedDoRALinear.from_linear(_linear(), r=4, lora_alpha=8)).eval()
    weight = layer.weight.detach().clone()
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and plain.weight.data_ptr() != layer.weight.data_ptr()
    x = torch.randn(6, 24)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, weight) and not layer.merged


def test_from_conv1d_reads_gpt2s_weight_layout():
    torch.manual_seed(0)
    conv = Conv1D(20, 24)  # weight (in, out) = (24, 20)
    nn.init.normal_(conv.weight, std=0.2)
    nn.init.normal_(conv.bias, std=0.1)
    layer = FusedDoRALinear.from_conv1d(conv, r=4, lora_alpha=8)
    assert layer.fan_in_fan_out and layer.weight is conv.weight
    assert layer.lora_magnitude_vector.shape == (20,)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), conv.weight.detach().norm(dim=0))
    x = torch.randn(4, 24)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-6, atol=1e-6)
    _randomize(layer)
    expected = reference.dora_linear(x, conv.weight.t(), conv.bias, layer.lora_A, layer.lora_B,
                                     layer.lora_magnitude_vector, scaling=layer.scaling)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize(("adapter_dtype", "expected"), [("auto", torch.float32), ("base", torch.float16)])
def test_magnitude_takes_the_adapters_dtype(adapter_dtype, expected):
    layer = FusedDoRALinear.from_linear(_linear(dtype=torch.float16), r=4, adapter_dtype=adapter_dtype)
    assert layer.lora_magnitude_vector.dtype == layer.lora_A.dtype == expected
    # fp16 rows are exact in fp32: the norm is that of the weight as stored.
    torch.testing.assert_close(layer.lora_magnitude_vector.float(), layer.weight.float().norm(dim=1),
                               rtol=1e-3 if expected == torch.float16 else 1e-6, atol=0)
    x = torch.randn(3, 24, dtype=torch.float16)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and layer.lora_magnitude_vector.grad.dtype == expected


def test_modifying_the_output_in_place_before_backward_raises():
    # dm is computed from the saved output y, so autograd must notice a change of y.
    layer = _randomize(FusedDoRALinear.from_linear(_linear(), r=4))
    y = layer(torch.randn(3, 24))
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_dora_linear_refuses_a_magnitude_of_the_wrong_shape_or_dtype():
    layer = FusedDoRALinear.from_linear(_linear(), r=4)
    x = torch.randn(3, 24)
    operands = (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(20,\), got \(24,\)"):
        dora_linear(*operands, torch.ones(24), scaling=1.0)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(20,\), got \(1, 20\)"):
        dora_linear(*operands, torch.ones(1, 20), scaling=1.0)
    with pytest.raises(TypeError, match=r"magnitude must be torch.float32 \(the adapters' dtype\)"):
        dora_linear(*operands, torch.ones(20, dtype=torch.float64), scaling=1.0)


def test_magnitude_gradient_is_not_finite_at_an_entry_of_exactly_zero():
    # Documented (lorafuse/dora_ops.py, docs/model_api.md): dm = sum(dy * (y - b)) / m, so m = 0.0 has no
    # finite gradient; the other entries are unaffected.
    layer = _randomize(FusedDoRALinear.from_linear(_linear(), r=4))
    with torch.no_grad():
        layer.lora_magnitude_vector[0] = 0.0
    layer(torch.randn(3, 24)).sum().backward()
    grad = layer.lora_magnitude_vector.grad
    assert not torch.isfinite(grad[0]) and torch.isfinite(grad[1:]).all()
