"""Bad input fails loudly, naming the argument and its value."""

import pytest
import torch

from lorafuse import FusedLoRALinear, lora_linear, reference


@pytest.mark.parametrize("r", [0, -3, 2.5, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match=r"r must be a positive int, got"):
        FusedLoRALinear(8, 8, r=r)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, "0.1"])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match=r"lora_dropout must be a float in \[0, 1\), got"):
        FusedLoRALinear(8, 8, lora_dropout=p)


@pytest.mark.parametrize("alpha", [float("nan"), "16", None, 0, -8.0])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="lora_alpha must be a positive finite number"):
        FusedLoRALinear(8, 8, lora_alpha=alpha)


@pytest.mark.parametrize("name", ["in_features", "out_features"])
def test_bad_features(name):
    kwargs = {"in_features": 8, "out_features": 8, name: 0}
    with pytest.raises(ValueError, match=f"{name} must be a positive int, got 0"):
        FusedLoRALinear(**kwargs)


def test_in_features_mismatch(device):
    layer = FusedLoRALinear(8, 4, device=device)
    with pytest.raises(ValueError, match=r"x has 7 features .* in_features is 8"):
        layer(torch.randn(2, 7, device=device))


def test_dtype_mismatch(device):
    layer = FusedLoRALinear(8, 4, device=device)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float32 but x has dtype torch.float16"):
        layer(torch.randn(2, 8, device=device, dtype=torch.float16))


def test_adapter_dtype_must_be_x_dtype_or_fp32_on_half_precision(device):
    from lorafuse import lora_linear

    def call(x_dtype, a_dtype, b_dtype=None):
        x = torch.randn(2, 8, device=device, dtype=x_dtype)
        weight = torch.randn(4, 8, device=device, dtype=x_dtype)
        lora_A = torch.randn(3, 8, device=device, dtype=a_dtype)
        lora_B = torch.randn(4, 3, device=device, dtype=b_dtype or a_dtype)
        return lora_linear(x, weight, None, lora_A, lora_B, scaling=1.0)

    assert call(torch.float16, torch.float32).dtype == torch.float16
    with pytest.raises(TypeError, match=r"lora_A has dtype torch.float64 but x has dtype torch.float16; "
                                        r"adapters must be torch.float16 or torch.float32"):
        call(torch.float16, torch.float64)
    with pytest.raises(TypeError, match=r"lora_A has dtype torch.float16 but x has dtype torch.float32; "
                                        r"adapters must be torch.float32$"):
        call(torch.float32, torch.float16)
    with pytest.raises(TypeError, match=r"lora_B has dtype torch.float16 but lora_A has dtype torch.float32"):
        call(torch.float16, torch.float32, torch.float16)


def test_device_mismatch():
    layer = FusedLoRALinear(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        layer(torch.randn(2, 8))


def test_integer_input(device):
    layer = FusedLoRALinear(8, 4, device=device)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(2, 8, dtype=torch.int64, device=device))


def test_functional_shape_errors(device):
    x, weight, bias = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    A, B = torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"lora_A must have shape \(r, 8\), got \(2, 7\)"):
        lora_linear(x, weight, bias, A[:, :7], B, scaling=1.0)
    with pytest.raises(ValueError, match=r"lora_B must have shape \(4, 2\), got \(4, 3\)"):
        lora_linear(x, weight, bias, A, torch.randn(4, 3), scaling=1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\), got \(5,\)"):
        lora_linear(x, weight, torch.randn(5), A, B, scaling=1.0)
    with pytest.raises(TypeError, match="lora_A must be a torch.Tensor, got list"):
        lora_linear(x, weight, bias, [[1.0]], B, scaling=1.0)
    with pytest.raises(ValueError, match=r"lora_dropout must be a float in \[0, 1\), got 1.0"):
        lora_linear(x, weight, bias, A, B, scaling=1.0, dropout_p=1.0)


@pytest.mark.parametrize(("seed", "error", "message"), [
    (1.5, TypeError, "seed must be an int or a one-element int64 tensor, got float 1.5"),
    (True, TypeError, "seed must be an int or a one-element int64 tensor, got bool True"),
    (2**64, ValueError, "seed must fit in int64"),
    (torch.tensor([1, 2]), ValueError, r"seed must be a one-element int64 tensor, got shape \(2,\)"),
    (torch.tensor([1.0]), ValueError, "seed must be a one-element int64 tensor, got shape .* torch.float32"),
])
def test_bad_seed(device, seed, error, message):
    x, weight, A, B = (torch.randn(3, 8, device=device), torch.randn(4, 8, device=device),
                       torch.randn(2, 8, device=device), torch.randn(4, 2, device=device))
    with pytest.raises(error, match=message):
        lora_linear(x, weight, None, A, B, scaling=1.0, dropout_p=0.1, seed=seed)


def test_reference_mask_shape(device):
    x, weight = torch.randn(3, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="keep_mask must have x's shape"):
        reference.lora_linear(x, weight, None, torch.randn(2, 8), torch.randn(4, 2), scaling=1.0,
                              keep_mask=torch.ones(3, 7, dtype=torch.bool), dropout_p=0.1)


def test_launcher_validates_too(device):
    from lorafuse.kernels import lora_forward

    x = torch.randn(3, 8, device=device)
    with pytest.raises(ValueError, match=r"x must be 2-D \(M, K\) here, got shape \(1, 3, 8\)"):
        lora_forward(x[None], torch.randn(4, 8, device=device), None, torch.randn(2, 8, device=device),
                     torch.randn(4, 2, device=device), scaling=1.0, dropout_p=0.0, seed=0)
    with pytest.raises(TypeError, match="seed must be an int or a one-element int64 tensor, got float 1.5"):
        lora_forward(x, torch.randn(4, 8, device=device), None, torch.randn(2, 8, device=device),
                     torch.randn(4, 2, device=device), scaling=1.0, dropout_p=0.1, seed=1.5)


@pytest.mark.parametrize("autocast", [False, True])
def test_meta_input_with_cpu_weights_names_the_devices(autocast):
    layer = FusedLoRALinear(8, 4, r=2)
    x = torch.randn(2, 8, device="meta")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with pytest.raises(ValueError, match=r"weight is on cpu but x is on meta; they must be on one device"):
            layer(x)
