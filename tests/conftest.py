"""Shared test set-up: interpreted kernels on CPU-only machines, tolerances, seeds, devices."""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if os.environ.get("LORAFUSE_REQUIRE_GPU") == "1" and not HAS_GPU:
    raise RuntimeError("LORAFUSE_REQUIRE_GPU=1 (make test-gpu) but torch sees no CUDA device")
if not HAS_GPU:
    # Must be set before lorafuse.kernels is imported: Triton decides at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: Where the kernels run in this session.
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")

#: Interpreted bf16 `tl.dot` is wrong in Triton 3.9 (DESIGN.md): bf16 is tested natively only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])

#: Small absolute slack per dtype, on top of "twice PyTorch's own error" (see assert_close_to_oracle).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def assert_close_to_oracle(actual, torch_same_dtype, oracle_fp64, *, name, dtype):
    """The kernel's error against the fp64 oracle is at most twice PyTorch's own error in the same
    dtype, plus a small atol (the rule flash-attention's tests use)."""
    oracle = oracle_fp64.double()
    kernel_err = (actual.double() - oracle).abs().max().item()
    torch_err = (torch_same_dtype.double() - oracle).abs().max().item()
    bound = 2 * torch_err + ATOL[dtype] * max(1.0, oracle.abs().max().item())
    assert kernel_err <= bound, f"{name}: kernel error {kernel_err:.3g} > bound {bound:.3g} (torch {torch_err:.3g})"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)
