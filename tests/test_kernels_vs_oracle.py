"""The fused path (kernels on a GPU, interpreted kernels on CPU) against the PyTorch oracle."""

import pytest
import torch
from conftest import DTYPES, HAS_GPU, gpu
from lora_cases import check_against_oracle, make_problem

from lorafuse import lora_linear
from lorafuse.function import select_backend


def test_kernel_backend_is_used(device):
    # Guards every test below: on CPU they must exercise the interpreted kernels, not the torch path.
    from lorafuse import kernels

    assert select_backend(torch.empty(1, device=device)) is kernels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 4, 16, 64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_odd_shapes(device, dtype, r, dropout_p, bias):
    tensors = make_problem(37, 70, 45, r, dtype=dtype, device=device, bias=bias)
    check_against_oracle(tensors, scaling=2.0 / r**0.5, dropout_p=dropout_p, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_base_weight_and_bias_gradients(device, dtype, dropout_p):
    tensors = make_problem(29, 40, 33, 8, dtype=dtype, device=device, base_grad=True)
    check_against_oracle(tensors, scaling=1.5, dropout_p=dropout_p, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_three_dim_input(device, dtype):
    tensors = make_problem(None, 48, 24, 8, dtype=dtype, device=device, leading=(3, 11))
    check_against_oracle(tensors, scaling=2.0, dropout_p=0.1, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(device, dtype):
    x, weight, bias, lora_A, lora_B = make_problem(40, 33, 20, 4, dtype=dtype, device=device)
    x_t = x.detach().t().contiguous().t().requires_grad_()  # same values, column-major strides
    assert not x_t.is_contiguous()
    check_against_oracle((x_t, weight, bias, lora_A, lora_B), scaling=2.0, dropout_p=0.1, dtype=dtype)
    x_sliced = torch.randn(25, 66, device=device).to(dtype)[:, ::2].requires_grad_()  # stride 2 columns
    check_against_oracle((x_sliced, weight, bias, lora_A, lora_B), scaling=2.0, dropout_p=0.0, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_weight_view(device, dtype):
    x, weight, bias, lora_A, lora_B = make_problem(21, 34, 18, 4, dtype=dtype, device=device)
    stored_in_out = weight.detach().t().contiguous()  # GPT-2 Conv1D layout (in, out)
    weight_view = stored_in_out.t()
    assert weight_view.data_ptr() == stored_in_out.data_ptr() and not weight_view.is_contiguous()
    check_against_oracle((x, weight_view, bias, lora_A, lora_B), scaling=2.0, dropout_p=0.1, dtype=dtype)


@pytest.mark.parametrize("r", [128, 256])
def test_large_ranks(device, r):
    tensors = make_problem(19, 40, 24, r, dtype=torch.float32, device=device)
    check_against_oracle(tensors, scaling=16 / r, dropout_p=0.1, dtype=torch.float32)


def test_input_without_grad_still_trains_adapter(device):
    x, weight, bias, lora_A, lora_B = make_problem(16, 24, 20, 4, dtype=torch.float32, device=device)
    x = x.detach()
    check_against_oracle((x, weight, bias, lora_A, lora_B), scaling=2.0, dropout_p=0.1, dtype=torch.float32)


def test_only_input_grad(device):
    x, weight, bias, lora_A, lora_B = make_problem(16, 24, 20, 4, dtype=torch.float32, device=device)
    lora_A.requires_grad_(False)
    lora_B.requires_grad_(False)
    check_against_oracle((x, weight, bias, lora_A, lora_B), scaling=2.0, dropout_p=0.1, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_tokens(device, dtype):
    x, weight, bias, lora_A, lora_B = make_problem(0, 24, 20, 4, dtype=dtype, device=device)
    y = lora_linear(x, weight, bias, lora_A, lora_B, scaling=2.0, dropout_p=0.1)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert x.grad.shape == (0, 24)
    assert torch.count_nonzero(lora_A.grad) == 0 and torch.count_nonzero(lora_B.grad) == 0


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_llm_shape_on_gpu(dtype, dropout_p):
    # One LLM-sized projection (natively only: interpreted, this would take minutes).
    assert HAS_GPU
    tensors = make_problem(2048, 4096, 1024, 16, dtype=dtype, device=torch.device("cuda"))
    check_against_oracle(tensors, scaling=2.0, dropout_p=dropout_p, dtype=dtype)


@gpu
def test_int64_offsets_on_gpu():
    # M * K > 2^31: the element index and the dropout counter must not wrap in int32.
    M, K, N = 2**31 // 512 + 64, 512, 16
    tensors = make_problem(M, K, N, 4, dtype=torch.bfloat16, device=torch.device("cuda"))
    x, weight, bias, lora_A, lora_B = tensors
    with torch.no_grad():
        y = lora_linear(x, weight, bias, lora_A, lora_B, scaling=2.0, dropout_p=0.0)
        tail = slice(M - 64, M)
        expected = torch.nn.functional.linear(x[tail].float(), weight.float(), bias.float())
        expected += 2.0 * (x[tail].float() @ lora_A.float().t()) @ lora_B.float().t()
    torch.testing.assert_close(y[tail].float(), expected, atol=0.1, rtol=0.02)
