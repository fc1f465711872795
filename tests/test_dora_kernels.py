"""DoRA's fused path (kernels on a GPU, interpreted kernels on CPU) against the PyTorch oracle."""

import dataclasses

import pytest
import torch
from conftest import DTYPES
from lora_cases import SEED, compare_to_oracle, make_problem

from lorafuse import dora_linear, reference
from lorafuse.function import dropout_mask

NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")


def make_dora_problem(M, K, N, r, *, dtype, device, adapter_dtype=None, **options):
    """make_problem's tensors plus a magnitude near the row norms of W + s B A (as training leaves it)."""
    x, weight, bias, lora_A, lora_B = make_problem(M, K, N, r, dtype=dtype, device=device,
                                                   adapter_dtype=adapter_dtype, **options)
    norms = reference.dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling=1.0)
    magnitude = (norms * (0.5 + torch.rand(N, device=device))).to(lora_A.dtype).requires_grad_()
    return x, weight, bias, lora_A, lora_B, magnitude


def _oracle(tensors, *, scaling, dropout_p, dtype, adapter_dtype):
    leaves = {}
    for name, t in zip(NAMES, tensors):
        if t is not None:
            cast = adapter_dtype if name in ("lora_A", "lora_B", "magnitude") else dtype
            leaves[name] = t.detach().to(cast).requires_grad_(t.requires_grad)
    x = leaves["x"]
    mask = dropout_mask(SEED, x.shape, dropout_p, x.device) if dropout_p > 0 else None
    y = reference.dora_linear(x, leaves["weight"], leaves.get("bias"), leaves["lora_A"], leaves["lora_B"],
                              leaves["magnitude"], scaling=scaling, keep_mask=mask, dropout_p=dropout_p)
    return y, leaves


def check_dora_against_oracle(tensors, *, scaling, dropout_p, dtype):
    """dora_linear's output and every gradient against the fp64 oracle, with PyTorch in the same dtypes as the
    yardstick (the oracle rule of conftest.assert_close_to_oracle)."""
    x, weight, bias, lora_A, lora_B, magnitude = tensors
    y = dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling=scaling, dropout_p=dropout_p, seed=SEED)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], weight.shape[0])
    dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    leaves = {name: t for name, t in zip(NAMES, tensors) if t is not None}

    def run_oracle(dtype, adapter_dtype):
        return _oracle(tensors, scaling=scaling, dropout_p=dropout_p, dtype=dtype, adapter_dtype=adapter_dtype)

    def check_dm(dm, dm64, y64):
        check_dm_against_output(dm, dm64, y, y64, dy, magnitude)

    compare_to_oracle(y, leaves, dy, run_oracle, dtype=dtype, adapter_dtype=lora_A.dtype,
                      own_checks={"magnitude": check_dm})


def check_dm_against_output(dm, dm64, y, y64, dy, magnitude):
    """dm = sum over rows of dy * (y - b) / m is read from the output y the forward stored, so its error is y's
    error carried through that sum: |dm - dm64| <= sum_rows |dy| * |y - y64| / |m|, plus the fp32 rounding of
    the sum itself (M terms: M * 2^-24 of sum |dy * y| / |m|). y's own error is held to the oracle rule above.
    (The usual rule, twice PyTorch's error in the same dtype, does not fit: PyTorch rounds the unscaled product
    where lorafuse rounds g times it, so lorafuse's dm error is up to 1 / g times larger; at g ~ 0.5 the test
    problems reach 2.5 times PyTorch's.)"""
    rows = dy.reshape(-1, dy.shape[-1]).double()
    y_error = (y.reshape(rows.shape).double() - y64.reshape(rows.shape)).abs()
    carried = (rows.abs() * y_error).sum(0) / magnitude.detach().double().abs()
    m = magnitude.detach().double().abs()
    summed = rows.shape[0] * 2**-24 * (rows.abs() * y64.reshape(rows.shape).abs()).sum(0) / m
    rounded = dm64.abs() * torch.finfo(dm.dtype).eps / 2
    bound = carried + summed + rounded + 1e-12
    error = (dm.double() - dm64).abs()
    assert (error <= bound).all(), (
        f"dmagnitude: kernel error {error.max().item():.3g} exceeds what y's error carries (bound "
        f"{bound[error.argmax()].item():.3g} there)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_odd_shapes(device, dtype, r, dropout_p, bias):
    tensors = make_dora_problem(37, 70, 45, r, dtype=dtype, device=device, bias=bias)
    check_dora_against_oracle(tensors, scaling=2.0 / r**0.5, dropout_p=dropout_p, dtype=dtype)


@pytest.mark.parametrize("dtype", [t for t in DTYPES if t != torch.float32], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_fp32_adapters_on_half_precision(device, dtype, dropout_p):
    tensors = make_dora_problem(37, 70, 45, 8, dtype=dtype, device=device, adapter_dtype=torch.float32)
    check_dora_against_oracle(tensors, scaling=2.0, dropout_p=dropout_p, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_tiles_and_base_gradients(device, dtype):
    # Several row blocks add into dm's atomics; dW and db of an unfrozen base go through g * dy too.
    tensors = make_dora_problem(150, 140, 133, 8, dtype=dtype, device=device, base_grad=True)
    check_dora_against_oracle(tensors, scaling=2.0, dropout_p=0.3, dtype=dtype)


def test_three_dim_input_and_transposed_weight(device):
    x, weight, bias, lora_A, lora_B, magnitude = make_dora_problem(None, 48, 24, 8, dtype=torch.float32,
                                                                   device=device, leading=(3, 11))
    weight_t = weight.detach().t().contiguous().t()  # GPT-2's Conv1D layout: the same values, stride (1, N)
    check_dora_against_oracle((x, weight_t, bias, lora_A, lora_B, magnitude), scaling=2.0, dropout_p=0.1,
                              dtype=torch.float32)


@pytest.mark.parametrize("needed", [("x",), ("lora_A", "lora_B"), ("magnitude",), ("x", "magnitude")])
def test_only_the_gradients_asked_for(device, needed):
    x, weight, bias, lora_A, lora_B, magnitude = make_dora_problem(21, 30, 19, 4, dtype=torch.float64,
                                                                   device=device)
    leaves = {"x": x, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}
    for name, t in leaves.items():
        t.requires_grad_(name in needed)
    y = dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling=1.3, dropout_p=0.2, seed=SEED)
    grads = torch.autograd.grad(y.sum(), [leaves[name] for name in needed])
    mask = dropout_mask(SEED, x.shape, 0.2, x.device)
    fresh = {name: t.detach().requires_grad_(name in needed) for name, t in leaves.items()}
    y_ref = reference.dora_linear(fresh["x"], weight, bias, fresh["lora_A"], fresh["lora_B"], fresh["magnitude"],
                                  scaling=1.3, keep_mask=mask, dropout_p=0.2)
    expected = torch.autograd.grad(y_ref.sum(), [fresh[name] for name in needed])
    for name, got, want in zip(needed, grads, expected):
        torch.testing.assert_close(got, want, msg=lambda text, name=name: f"d{name}: {text}")


@pytest.mark.parametrize(("dropout_p", "bias", "base_grad"), [(0.0, True, True), (0.2, False, False)])
def test_gradcheck_fp64(device, dropout_p, bias, base_grad):
    # The norm is an input of the op, held fixed here as the backward holds it (detached): gradcheck then
    # differentiates the same function the chain rule of dora_ops.py describes.
    x, weight, b, lora_A, lora_B, magnitude = make_dora_problem(5, 7, 6, 2, dtype=torch.float64, device=device,
                                                                bias=bias, base_grad=base_grad)
    norm = reference.dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), scaling=1.7)
    seed = torch.tensor([77], dtype=torch.int64, device=device)

    def fn(x, weight, b, lora_A, lora_B, magnitude):
        y, _ = torch.ops.lorafuse.dora_forward(x, weight, b, lora_A, lora_B, magnitude, norm, seed, scaling=1.7,
                                               dropout_p=dropout_p)
        return y

    inputs = (x, weight, b, lora_A, lora_B, magnitude)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("r", [1, 16, 64])
@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=str)
def test_weight_norm_kernel(device, r, adapter_dtype):
    weight = torch.randn(45, 70, device=device).to(torch.float16)
    lora_A = torch.randn(r, 70, device=device).to(adapter_dtype)
    lora_B = torch.randn(45, r, device=device).to(adapter_dtype)
    norm = torch.ops.lorafuse.dora_weight_norm(weight, lora_A, lora_B, scaling=0.3)
    expected = reference.dora_weight_norm(weight.double(), lora_A.double(), lora_B.double(), scaling=0.3)
    assert norm.dtype == torch.float32 and norm.shape == (45,)
    # fp32 sums of 70 squares of exactly representable products: a few fp32 ulps.
    torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=str)
def test_weight_norm_kernel_in_rank_chunks(device, adapter_dtype):
    # The rank walked RANK_CHUNK columns at a time in each K step, as weight_norm_launch does with fp32 adapters
    # at r > 64 on a GPU. Forced here at r=40 with chunks of 16: the third is partly past r, the fourth wholly.
    from lorafuse.kernels import INTERPRETED
    from lorafuse.kernels.dora import weight_norm_launch
    from lorafuse.kernels.launches import run

    weight = torch.randn(45, 70, device=device).to(torch.float16)
    lora_A = torch.randn(40, 70, device=device).to(adapter_dtype)
    lora_B = torch.randn(45, 40, device=device).to(adapter_dtype)
    norm = torch.empty(45, device=device)
    launch = weight_norm_launch(weight, lora_A, lora_B, norm, scaling=0.3, interpreted=INTERPRETED)
    assert launch.meta["BLOCK_R"] == 64
    run(dataclasses.replace(launch, meta={**launch.meta, "RANK_CHUNK": 16}), weight)
    expected = reference.dora_weight_norm(weight.double(), lora_A.double(), lora_B.double(), scaling=0.3)
    # As test_weight_norm_kernel: fp32 sums of 70 squares, a few fp32 ulps.
    torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)


def test_weight_norm_without_cancellation(device):
    # s B A nearly cancels W (an adapter that removes a direction). Forming W + s B A tile by tile leaves the
    # rounding of B A (~2^-24 of ||W|| per row); expanding ||W||^2 + 2s (W A^T).B + s^2 ||B A||^2 in fp32 would
    # leave sqrt(2^-24) = 2^-12 of ||W|| (a result of ~1e-7 computed from terms of ~256).
    lora_A = torch.randn(4, 64, device=device, dtype=torch.float64)
    lora_B = torch.randn(32, 4, device=device, dtype=torch.float64)
    weight = (-(lora_B @ lora_A) + 1e-8 * torch.randn(32, 64, device=device, dtype=torch.float64)).float()
    norm = torch.ops.lorafuse.dora_weight_norm(weight, lora_A.float(), lora_B.float(), scaling=1.0)
    expected = reference.dora_weight_norm(weight.double(), lora_A, lora_B, scaling=1.0)
    weight_norms = weight.double().norm(dim=1)
    assert expected.max() < 1e-5 * weight_norms.min()  # the case is the cancelling one
    assert ((norm.double() - expected).abs() / weight_norms).max() < 2**-16


def test_output_modified_in_place_is_caught(device):
    x, weight, bias, lora_A, lora_B, magnitude = make_dora_problem(6, 8, 5, 2, dtype=torch.float32, device=device,
                                                                   leading=None)
    y = dora_linear(x, weight, bias, lora_A, lora_B, magnitude, scaling=1.0)
    y.add_(1.0)  # the backward reads y: an in-place change must fail loudly, not corrupt dm
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bad_magnitude_is_named(device):
    x, weight, bias, lora_A, lora_B, magnitude = make_dora_problem(6, 8, 5, 2, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match=r"magnitude must have shape \(5,\), got \(4,\)"):
        dora_linear(x, weight, bias, lora_A, lora_B, magnitude[:4], scaling=1.0)
    with pytest.raises(TypeError, match="magnitude must be torch.float32"):
        dora_linear(x, weight, bias, lora_A, lora_B, magnitude.double(), scaling=1.0)
