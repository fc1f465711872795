"""torch.compile over lorafuse layers: fullgraph tracing through the `lorafuse::` custom ops (no graph
breaks, no tracing into Triton), results equal to eager, dropout included."""

import warnings

import pytest
import torch
import torch._dynamo
from tiny_llama import build, lora_grads, loss_fn, tokens
from torch._dynamo.testing import AotEagerAndRecordGraphs

from lorafuse import FusedDoRALinear, FusedLoRALinear


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with warnings.catch_warnings():
        # The recording backend returns unboxed functions; AOTAutograd warns and copes.
        warnings.filterwarnings("ignore", message="Your compiler for AOTAutograd")
        yield
    torch._dynamo.reset()


def _layer(device, *, dropout):
    layer = FusedLoRALinear(32, 24, r=4, lora_alpha=8, lora_dropout=dropout, device=device)
    torch.nn.init.normal_(layer.lora_B)
    return layer


def _run(module, x, seed):
    """Output and (x, lora_A, lora_B) gradients, the dropout seed drawn after manual_seed(seed)."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    y = module(x)
    y.pow(2).sum().backward()
    layer = module._orig_mod if hasattr(module, "_orig_mod") else module
    grads = (x.grad, layer.lora_A.grad, layer.lora_B.grad)
    layer.zero_grad(set_to_none=True)
    return y.detach(), grads


def _calls(graphs):
    return [str(node.target) for graph in graphs for node in graph.graph.nodes if node.op == "call_function"]


def test_layer_fullgraph_is_one_custom_op_each_way(device):
    layer = _layer(device, dropout=0.1)
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(layer, fullgraph=True, backend=recorder)
    y, grads = _run(compiled, x, seed=3)
    y_eager, grads_eager = _run(layer, x, seed=3)

    forward, backward = _calls(recorder.fw_graphs), _calls(recorder.bw_graphs)
    assert forward.count("lorafuse.lora_forward.default") == 1 and "lorafuse.lora_backward.default" not in forward
    assert backward.count("lorafuse.lora_backward.default") == 1
    # The seed comes from torch's generator inside the graph, so a compiled step reproduces an eager one.
    assert "aten.randint.low" in forward
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_backward_skips_gradients_nobody_needs(device):
    layer = _layer(device, dropout=0.0)
    layer.lora_A.requires_grad_(False)
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(layer, fullgraph=True, backend=recorder)
    compiled(torch.randn(4, 32, device=device)).sum().backward()
    (call,) = [node for graph in recorder.bw_graphs for node in graph.graph.nodes
               if node.target is torch.ops.lorafuse.lora_backward.default]
    assert (call.kwargs["needs_dx"], call.kwargs["needs_dA"], call.kwargs["needs_dB"]) == (False, False, True)
    assert layer.lora_B.grad is not None and layer.lora_A.grad is None


def test_tiny_llama_compiles_fullgraph_and_matches_eager():
    model = build(lora_dropout=0.1)
    batch = tokens(2, 8)
    torch.manual_seed(4)
    loss_eager = loss_fn(model, batch)
    loss_eager.backward()
    grads_eager = lora_grads(model)
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(4)
    loss = loss_fn(compiled, batch)
    loss.backward()
    torch.testing.assert_close(loss, loss_eager, rtol=1e-6, atol=1e-6)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, grads_eager[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_inductor_matches_eager_with_dropout(device):
    # Inductor draws random numbers its own way unless fallback_random is set; with it, the seed comes
    # from torch's generator as in eager, so the dropout masks match.
    torch.manual_seed(0)
    model = torch.nn.Sequential(_layer(device, dropout=0.1), torch.nn.GELU(),
                                FusedLoRALinear(24, 16, r=2, device=device))
    x = torch.randn(3, 32, device=device, requires_grad=True)
    torch.manual_seed(6)
    y_eager = model(x)
    y_eager.pow(2).sum().backward()
    grads_eager = [x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    x.grad = None

    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(model, fullgraph=True)
        torch.manual_seed(6)
        y = compiled(x)
        y.pow(2).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]
    # Inductor fuses the GELU and the loss into its own kernels, which round in another order.
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, grads_eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dora_layer_fullgraph_matches_eager(device):
    # The weight norm, the forward and the backward are one custom op each; y is saved through the compiled
    # graph, and the magnitude's gradient comes out as in eager.
    layer = FusedDoRALinear(32, 24, r=4, lora_alpha=8, lora_dropout=0.1, device=device)
    torch.nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(layer, fullgraph=True, backend=recorder)
    results = []
    for module in (compiled, layer):
        x_run = x.detach().clone().requires_grad_()
        torch.manual_seed(3)
        module(x_run).pow(2).sum().backward()
        results.append([x_run.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.grad])
        layer.zero_grad(set_to_none=True)
    forward, backward = _calls(recorder.fw_graphs), _calls(recorder.bw_graphs)
    assert forward.count("lorafuse.dora_weight_norm.default") == 1
    assert forward.count("lorafuse.dora_forward.default") == 1
    assert backward.count("lorafuse.dora_backward.default") == 1
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
