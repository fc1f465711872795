"""The fused path (kernels on a GPU, interpreted kernels on CPU) against the PyTorch oracle."""

import pytest
import torch
from conftest import DTYPES, HAS_GPU, gpu
from lora_cases import check_against_oracle, make_problem

from lorafuse import dropout_mask, lora_linear, reference
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


HALF_DTYPES = [t for t in DTYPES if t in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_fp32_adapters_on_half_precision(device, dtype, r, dropout_p):
    # PEFT's default on fp16/bf16 models: x and W in half precision, A and B (and dA, dB) in fp32.
    tensors = make_problem(37, 70, 45, r, dtype=dtype, device=device, adapter_dtype=torch.float32)
    check_against_oracle(tensors, scaling=2.0 / r**0.5, dropout_p=dropout_p, dtype=dtype)


def test_fp32_adapters_many_tiles(device):
    tensors = make_problem(150, 140, 133, 8, dtype=torch.float16, device=device, adapter_dtype=torch.float32)
    check_against_oracle(tensors, scaling=2.0, dropout_p=0.3, dtype=torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_many_tiles(device, dtype, dropout_p):
    # Several tiles along M, N and K (interpreted tiles are at most 64 wide): the dA/dB atomics add
    # partial sums from several row blocks, only the first N column stores xa, the N loops iterate.
    tensors = make_problem(150, 140, 133, 8, dtype=dtype, device=device)
    check_against_oracle(tensors, scaling=2.0, dropout_p=dropout_p, dtype=dtype)


def test_more_row_blocks_than_a_group(device):
    # M / BLOCK_M = 10 row blocks > GROUP_M = 8: the grouped tile order wraps into a second group.
    tensors = make_problem(600, 24, 70, 4, dtype=torch.float32, device=device)
    check_against_oracle(tensors, scaling=2.0, dropout_p=0.2, dtype=torch.float32)


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


@pytest.mark.parametrize("r", [100, 128, 256])  # the dx kernel takes the rank 64 at a time: 100 ends mid-chunk
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
    # M * K > 2^31: element offsets and dropout counters must not wrap in int32, forward or backward.
    M, K, N, r, p = 2**31 // 512 + 64, 512, 16, 4, 0.1
    x, weight, bias, lora_A, lora_B = make_problem(M, K, N, r, dtype=torch.bfloat16, device=torch.device("cuda"))
    seed = 99
    y = lora_linear(x, weight, bias, lora_A, lora_B, scaling=2.0, dropout_p=p, seed=seed)
    tail = slice(M - 64, M)
    dy = torch.zeros_like(y)
    dy[tail] = torch.randn(64, N, device=y.device, dtype=y.dtype)
    y.backward(dy)
    keep = dropout_mask(seed, (M, K), p, x.device)[tail]
    tail_leaves = [t.detach()[tail].float().requires_grad_() if t is x else t.detach().float().requires_grad_()
                   for t in (x, weight, bias, lora_A, lora_B)]
    expected = reference.lora_linear(*tail_leaves, scaling=2.0, keep_mask=keep, dropout_p=p)
    expected.backward(dy[tail].float())
    torch.testing.assert_close(y[tail].float(), expected, atol=0.1, rtol=0.02)
    torch.testing.assert_close(x.grad[tail].float(), tail_leaves[0].grad, atol=0.1, rtol=0.02)
    torch.testing.assert_close(lora_A.grad.float(), tail_leaves[3].grad, atol=0.1, rtol=0.02)
    torch.testing.assert_close(lora_B.grad.float(), tail_leaves[4].grad, atol=0.1, rtol=0.02)
