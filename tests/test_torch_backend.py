"""The PyTorch path (no Triton, or a device the kernels do not serve) keeps the same contract."""

import pytest
import torch
from lora_cases import check_against_oracle, make_problem

from lorafuse import FusedLoRALinear, torch_backend
from lorafuse.function import select_backend


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("LORAFUSE_BACKEND", "torch")
    assert select_backend(torch.empty(1)) is torch_backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("base_grad", [False, True])
def test_against_oracle(torch_path, dtype, dropout_p, base_grad):
    tensors = make_problem(None, 40, 24, 8, dtype=dtype, device="cpu", leading=(3, 7), base_grad=base_grad)
    check_against_oracle(tensors, scaling=2.0, dropout_p=dropout_p, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_fp32_adapters_against_oracle(torch_path, dtype, dropout_p):
    tensors = make_problem(23, 40, 24, 8, dtype=dtype, device="cpu", adapter_dtype=torch.float32)
    check_against_oracle(tensors, scaling=2.0, dropout_p=dropout_p, dtype=dtype)


def test_gradcheck(torch_path):
    tensors = make_problem(5, 7, 6, 2, dtype=torch.float64, device="cpu", base_grad=True)

    def fn(*args):
        from lorafuse import lora_linear

        return lora_linear(*args, scaling=1.3, dropout_p=0.25, seed=5)

    assert torch.autograd.gradcheck(fn, tensors)


def test_same_layer_both_backends_agree_without_dropout(monkeypatch):
    layer = FusedLoRALinear(40, 24, r=4)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(9, 40)
    kernel_out = layer(x)
    monkeypatch.setenv("LORAFUSE_BACKEND", "torch")
    torch.testing.assert_close(layer(x), kernel_out, atol=1e-5, rtol=1e-5)


def test_kept_fraction(torch_path):
    mask = torch_backend.dropout_mask(3, (100, 300), 0.2, "cpu")
    assert abs(mask.float().mean().item() - 0.8) < 0.012
