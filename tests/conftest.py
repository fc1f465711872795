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

gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

# Imported only now: TRITON_INTERPRET must be set first. One definition of the tolerances and the rule,
# shared with the benchmark's agreement check.
from lorafuse.bench.compare import ATOL, oracle_error  # noqa: E402

__all__ = ["ATOL", "DEVICE", "DTYPES", "HAS_GPU", "assert_close_to_oracle", "gpu"]


def assert_close_to_oracle(actual, torch_same_dtype, oracle_fp64, *, name, dtype):
    """The kernel's error against the fp64 oracle is at most twice PyTorch's own error in the same
    dtype, plus ATOL[dtype] * max(1, max |oracle|) (flash-attention's rule; `oracle_error`), and its shape
    is the oracle's."""
    problem = oracle_error(actual, torch_same_dtype, oracle_fp64, dtype=dtype)
    assert problem is None, f"{name}: kernel {problem}"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)
