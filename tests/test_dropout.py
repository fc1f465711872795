"""Dropout: masks come from a seed, are reproducible, unstored, and statistically right."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lorafuse import FusedLoRALinear, dropout_mask, reference, torch_backend
from lorafuse.dropout_rng import drop_threshold


def test_same_seed_same_mask_different_seed_different_mask(device):
    a = dropout_mask(5, (33, 70), 0.3, device)
    b = dropout_mask(5, (33, 70), 0.3, device)
    c = dropout_mask(6, (33, 70), 0.3, device)
    assert a.dtype == torch.bool and a.shape == (33, 70)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seed_may_be_a_tensor(device):
    as_int = dropout_mask(2**40 + 3, (8, 16), 0.5, device)
    as_tensor = dropout_mask(torch.tensor([2**40 + 3]), (8, 16), 0.5, device)
    assert torch.equal(as_int, as_tensor)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(device, p):
    mask = dropout_mask(1234, (128, 400), p, device)
    n = mask.numel()
    # p is quantised to threshold / 256 (kernels/dropout.py): the kept fraction's expectation is exact.
    quantised = drop_threshold(p) / 256
    assert abs(quantised - p) <= 1 / 512
    sigma = math.sqrt(quantised * (1 - quantised) / n)
    assert abs(mask.float().mean().item() - (1 - quantised)) < 5 * sigma
    # No structure by position: every row block and column block keeps about 1-p too.
    rows = mask[:64].float().mean().item(), mask[64:].float().mean().item()
    cols = mask[:, :200].float().mean().item(), mask[:, 200:].float().mean().item()
    for fraction in rows + cols:
        assert abs(fraction - (1 - quantised)) < 5 * sigma * math.sqrt(2)


def test_p_is_quantised_to_256ths():
    assert drop_threshold(0.0) == 0
    assert drop_threshold(0.1) == 26 and drop_threshold(0.05) == 13
    assert drop_threshold(1e-6) == 1, "any p > 0 must drop something"
    assert drop_threshold(0.9999) == 255, "p < 1 must keep something"


@pytest.mark.parametrize(("seed", "shape", "p"), [(5, (33, 70), 0.3), (2**40 + 3, (3, 5, 17), 0.1),
                                                   (-7, (9, 200), 0.5), (2**63 - 1, (1, 16), 0.05)])
def test_torch_path_draws_the_kernels_mask(device, seed, shape, p):
    # The PyTorch path (no Triton) computes philox in torch: a seed drops the same elements on every path.
    from lorafuse import kernels

    assert torch.equal(torch_backend.dropout_mask(seed, shape, p, device), kernels.dropout_mask(seed, shape, p, device))


def test_mask_bytes_are_uniform(device):
    # All 16 bytes of every philox call are used: each byte position must be uniform on its own.
    mask = dropout_mask(77, (512, 16 * 8), 0.5, device).reshape(512 * 8, 16).float()
    sigma = math.sqrt(0.25 / mask.shape[0])
    assert (mask.mean(0) - 0.5).abs().max().item() < 5 * sigma


def test_p_zero_keeps_everything(device):
    assert dropout_mask(9, (10, 20), 0.0, device).all()


def test_mask_rejects_bad_p(device):
    with pytest.raises(ValueError, match=r"p must be a float in \[0, 1\), got 1.0"):
        dropout_mask(1, (4, 4), 1.0, device)


def _layer(device, dropout):
    layer = FusedLoRALinear(40, 24, r=4, lora_dropout=dropout, device=device)
    torch.nn.init.normal_(layer.lora_B)
    return layer


def test_manual_seed_reproduces_training_forward(device):
    layer = _layer(device, 0.5)
    x = torch.randn(6, 40, device=device)
    torch.manual_seed(11)
    y1 = layer(x)
    torch.manual_seed(11)
    y2 = layer(x)
    y3 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y2, y3), "a new forward must draw a new mask"


def test_eval_mode_applies_no_dropout(device):
    layer = _layer(device, 0.5).eval()
    x = torch.randn(6, 40, device=device)
    expected = reference.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                     scaling=layer.scaling)
    torch.testing.assert_close(layer(x), expected)


def test_training_dropout_changes_output(device):
    layer = _layer(device, 0.5)
    x = torch.randn(6, 40, device=device)
    with torch.no_grad():
        assert not torch.allclose(layer(x), layer.eval()(x))


def test_no_mask_is_saved_for_backward(device):
    # Saved tensors: x, the parameters, xa (M x r) and the seed (one element): nothing x-sized but x.
    layer = _layer(device, 0.1)
    x = torch.randn(32, 40, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    extra = [t for t in saved if t.data_ptr() not in params and t.data_ptr() != x.data_ptr()]
    shapes = sorted(tuple(t.shape) for t in extra)
    assert shapes == [(1,), (32, 4)], shapes


def test_checkpoint_replays_the_same_mask(device):
    layer = _layer(device, 0.3)
    x = torch.randn(2, 7, 40, device=device, requires_grad=True)

    def grads(run):
        torch.manual_seed(3)
        layer.zero_grad()
        x.grad = None
        y = run(x)
        (y * torch.arange(y.numel(), device=device).reshape(y.shape).sin()).sum().backward()
        return y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    plain = grads(layer)
    checkpointed = grads(lambda t: checkpoint(layer, t, use_reentrant=False))
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
