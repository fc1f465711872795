"""fp64 gradcheck through the kernel path (interpreted on CPU), with and without dropout."""

import pytest
import torch
from lora_cases import make_problem

from lorafuse import lora_linear


@pytest.mark.parametrize(("dropout_p", "bias", "base_grad"), [(0.0, True, True), (0.2, True, False),
                                                               (0.2, False, True)])
def test_gradcheck_fp64(device, dropout_p, bias, base_grad):
    x, weight, b, lora_A, lora_B = make_problem(5, 7, 6, 2, dtype=torch.float64, device=device, bias=bias,
                                                 base_grad=base_grad)

    # A fixed seed: gradcheck calls the function many times and needs the same mask each time.
    def fn(x, weight, b, lora_A, lora_B):
        return lora_linear(x, weight, b, lora_A, lora_B, scaling=1.7, dropout_p=dropout_p, seed=77)

    assert torch.autograd.gradcheck(fn, (x, weight, b, lora_A, lora_B), eps=1e-6, atol=1e-7, rtol=1e-5)
