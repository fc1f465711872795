"""FusedLoRALinear as users meet it: construction, wrapping, merging, repr."""

import math

import pytest
import torch
import torch.nn as nn

from lorafuse import FusedLoRALinear, reference


def test_defaults_match_nn_linear(device):
    layer = FusedLoRALinear(30, 20, device=device)
    assert layer.weight.shape == (20, 30) and layer.bias.shape == (20,)
    assert layer.lora_A.shape == (8, 30) and layer.lora_B.shape == (20, 8)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.scaling == 16.0 / 8
    # Kaiming-uniform(a=sqrt(5)) bound for fan_in 30 is 1/sqrt(30).
    bound = 1 / math.sqrt(30)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    x = torch.randn(4, 30, device=device)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_rslora_scaling():
    layer = FusedLoRALinear(8, 8, r=16, lora_alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)


def test_dtype_and_device_arguments():
    layer = FusedLoRALinear(8, 6, r=2, dtype=torch.float16, adapter_dtype="base")
    assert {p.dtype for p in layer.parameters()} == {torch.float16}


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_adapters_default_to_fp32_on_half_precision_bases(device, base_dtype):
    # PEFT's default (autocast_adapter_dtype=True): fp32 adapters, so optimizer steps keep their low bits.
    layer = FusedLoRALinear.from_linear(nn.Linear(40, 24, device=device, dtype=base_dtype), r=4)
    assert (layer.weight.dtype, layer.lora_A.dtype, layer.lora_B.dtype) == (base_dtype, torch.float32, torch.float32)
    assert "adapter_dtype=torch.float32" in repr(layer)
    assert FusedLoRALinear(8, 6, dtype=torch.float64).lora_A.dtype == torch.float64
    assert FusedLoRALinear(8, 6, dtype=base_dtype, adapter_dtype="float32").lora_A.dtype == torch.float32
    if base_dtype == torch.bfloat16 and device.type == "cpu":
        return  # the interpreter's bf16 tl.dot is wrong (DESIGN.md): the forward below is tested natively only
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 40, device=device, dtype=base_dtype, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == base_dtype and x.grad.dtype == base_dtype
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32


def test_adapter_dtype_is_checked():
    with pytest.raises(ValueError, match=r"adapter_dtype must be one of 'auto', 'base', .* got 'int8'"):
        FusedLoRALinear(8, 6, adapter_dtype="int8")
    with pytest.raises(TypeError, match=r"adapter_dtype has dtype torch.float16 but the base weight has dtype "
                                        r"torch.float32"):
        FusedLoRALinear(8, 6, adapter_dtype=torch.float16)


def test_from_linear_shares_weights(device):
    linear = nn.Linear(24, 12, device=device)
    layer = FusedLoRALinear.from_linear(linear, r=4, lora_alpha=8, lora_dropout=0.1)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    assert (layer.in_features, layer.out_features, layer.r, layer.lora_dropout) == (24, 12, 4, 0.1)
    x = torch.randn(3, 5, 24, device=device)
    torch.testing.assert_close(layer.eval()(x), linear(x))


def test_from_linear_without_bias_keeps_dtype():
    linear = nn.Linear(16, 8, bias=False, dtype=torch.float16)
    layer = FusedLoRALinear.from_linear(linear, r=2, adapter_dtype="base")
    assert layer.bias is None and layer.weight.dtype == layer.lora_A.dtype == torch.float16


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        FusedLoRALinear.from_linear(nn.Conv2d(2, 2, 1))


def _trained(device, **kwargs):
    layer = FusedLoRALinear(24, 18, r=4, device=device, **kwargs)
    nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_merge_unmerge_round_trip(device, dtype):
    layer = _trained(device, dtype=dtype).eval()
    x = torch.randn(5, 24, device=device, dtype=dtype)
    before_weight = layer.weight.detach().clone()
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged_out, atol=1e-2 if dtype == torch.float16 else 1e-5,
                               rtol=1e-2 if dtype == torch.float16 else 1e-5)
    layer.merge()  # merging twice changes nothing
    layer.unmerge()
    assert not layer.merged
    tol = 2e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(layer.weight, before_weight, atol=tol, rtol=0)


def test_to_linear_has_merged_weight(device):
    layer = _trained(device).eval()
    x = torch.randn(5, 24, device=device)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear(x), layer(x))
    assert not layer.merged, "to_linear must not change the layer"
    layer.merge()
    torch.testing.assert_close(layer.to_linear()(x), linear(x))


def test_merged_layer_refuses_training(device):
    layer = _trained(device).merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, 24, device=device))
    with torch.no_grad():
        layer(torch.randn(2, 24, device=device))  # inference on a merged layer is fine
    layer.eval()(torch.randn(2, 24, device=device))


def test_disabled_adapter_runs_the_base(device):
    layer = _trained(device)
    layer.adapter_enabled = False
    x = torch.randn(3, 24, device=device)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))


def test_merged_layer_cannot_run_the_base_alone(device):
    layer = _trained(device).eval().merge()
    layer.adapter_enabled = False
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(torch.randn(2, 24, device=device))


def test_fan_in_fan_out_layout(device):
    layer = FusedLoRALinear(24, 18, r=4, fan_in_fan_out=True, device=device)
    nn.init.normal_(layer.lora_B)
    assert layer.weight.shape == (24, 18)
    x = torch.randn(3, 24, device=device)
    expected = reference.lora_linear(x, layer.weight.t(), layer.bias, layer.lora_A, layer.lora_B,
                                     scaling=layer.scaling)
    torch.testing.assert_close(layer.eval()(x), expected)
    weight_before = layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(x @ layer.weight + layer.bias, expected)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight_before, atol=1e-6, rtol=0)


def test_repr_shows_configuration():
    text = repr(FusedLoRALinear(10, 5, r=2, lora_alpha=4, lora_dropout=0.05))
    for part in ("in_features=10", "out_features=5", "r=2", "lora_alpha=4", "lora_dropout=0.05", "merged=False"):
        assert part in text


def test_state_dict_has_nn_linear_keys_and_adapter():
    layer = FusedLoRALinear(6, 4, r=2)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    linear = nn.Linear(6, 4)
    linear.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("lora_")})


def test_training_step_updates_only_the_adapter(device):
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 8, r=4, lora_dropout=0.1, device=device)
    frozen = layer.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(32, 16, device=device), torch.randn(32, 8, device=device)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(layer.weight, frozen)


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8), (8,)])
def test_output_is_a_fresh_tensor_not_a_view(device, shape):
    # Not a view of the kernel's (M, N) output: in-place ops on it behave as on any new tensor (FSDP2 relies on it).
    layer = FusedLoRALinear(8, 6, r=2, device=device)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(shape, device=device, requires_grad=True)
    y = layer(x)
    assert y._base is None and y.shape == (*shape[:-1], 6)
    (y * 2).sum().backward()
    expected = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B)]
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    y = layer(x)
    y.mul_(2)
    y.sum().backward()
    for actual, wanted in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad), expected):
        torch.testing.assert_close(actual, wanted)
