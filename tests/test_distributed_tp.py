"""Tensor parallelism with ColwiseLoRAParallel / RowwiseLoRAParallel: 2 gloo processes on CPU, every
result compared with the same module unsharded in the same process."""

import copy

import pytest
import torch
from dist_harness import run_workers
from tiny_llama import HIDDEN, Block, adapt, block_tp_plan, lora_grads
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

from lorafuse import FusedLoRALinear, lora_state_dict
from lorafuse.distributed import (
    ColwiseLoRAParallel,
    RowwiseLoRAParallel,
    distribute_lora_state_dict,
    gather_lora_state_dict,
)

pytestmark = pytest.mark.slow


def _close(actual, expected, name, tol=1e-5):
    # fp32 throughout; sharding only changes the order of the sums (about 1e-5 relative after a block).
    if isinstance(actual, DTensor):
        actual = actual.full_tensor()
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


def _layer(in_features, out_features, *, dropout, bias=True, fan_in_fan_out=False):
    torch.manual_seed(3)
    layer = FusedLoRALinear(in_features, out_features, bias=bias, r=4, lora_alpha=8, lora_dropout=dropout,
                            fan_in_fan_out=fan_in_fan_out)
    torch.nn.init.normal_(layer.lora_B)
    return layer


def _run_both(reference, sharded, x, *, seed):
    """Forward and backward of both modules on x with one dropout seed; returns the outputs and x grads."""
    outputs, x_grads = [], []
    for module in (reference, sharded):
        x_in = x.clone().requires_grad_()
        torch.manual_seed(seed)
        y = module(x_in)
        full = y.full_tensor() if isinstance(y, DTensor) else y
        (full * torch.linspace(-1, 1, full.numel()).view_as(full)).sum().backward()
        outputs.append(full)
        x_grads.append(x_in.grad)
    return outputs, x_grads


def _check_single_layers(rank, mesh):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(5))

    # Column-parallel with dropout: every rank sees the whole x and the same seed, so the mask is the
    # unsharded layer's and the results agree exactly, dropout included. fan_in_fan_out: a Conv1D-style weight.
    for fan_in_fan_out in (False, True):
        reference = _layer(32, 24, dropout=0.25, fan_in_fan_out=fan_in_fan_out)
        sharded = parallelize_module(copy.deepcopy(reference), mesh, ColwiseLoRAParallel(use_local_output=False))
        assert sharded.weight.placements == (Shard(1 if fan_in_fan_out else 0),)
        assert sharded.lora_A.placements == (Replicate(),) and sharded.lora_B.placements == (Shard(0),)
        (y_ref, y), (dx_ref, dx) = _run_both(reference, sharded, x, seed=11)
        _close(y, y_ref, "colwise y")
        _close(dx, dx_ref, "colwise dx")
        for name in ("lora_A", "lora_B"):
            grad = getattr(sharded, name).grad
            assert isinstance(grad, DTensor) and grad.placements == getattr(sharded, name).placements
            _close(grad, getattr(reference, name).grad, f"colwise d{name}")
        assert sharded.weight.grad is None and sharded.bias.grad is None

    # Row-parallel, input whole and split by the style (input_layouts=Replicate()).
    reference = _layer(32, 24, dropout=0.0)
    sharded = parallelize_module(copy.deepcopy(reference), mesh, RowwiseLoRAParallel(input_layouts=Replicate()))
    assert sharded.lora_A.placements == (Shard(1),) and sharded.lora_B.placements == (Replicate(),)
    (y_ref, y), (dx_ref, dx) = _run_both(reference, sharded, x, seed=12)
    _close(y, y_ref, "rowwise y")
    _close(dx, dx_ref, "rowwise dx")
    for name in ("lora_A", "lora_B"):
        _close(getattr(sharded, name).grad, getattr(reference, name).grad, f"rowwise d{name}")

    # Row-parallel with dropout: shards draw independent masks (seed offset by rank), so the output is not
    # the unsharded one, but the layer trains and its replicated B grad agrees on every rank.
    sharded = parallelize_module(_layer(32, 24, dropout=0.5), mesh, RowwiseLoRAParallel(input_layouts=Replicate()))
    y = sharded(x.clone().requires_grad_())
    y.sum().backward()
    grad_B = sharded.lora_B.grad.to_local()
    gathered = [torch.empty_like(grad_B) for _ in range(2)]
    torch.distributed.all_gather(gathered, grad_B)
    torch.testing.assert_close(gathered[0], gathered[1])


def _check_sequence_parallel(rank, mesh):
    # Column layer fed a sequence-sharded input (all-gathered), row layer leaving a sequence-sharded output
    # (reduce-scattered): the pair equals the unsharded pair.
    torch.manual_seed(4)
    up, down = _layer(32, 48, dropout=0.0, bias=False), _layer(48, 32, dropout=0.0, bias=False)
    reference = torch.nn.Sequential(up, down)
    sharded = parallelize_module(copy.deepcopy(reference), mesh, {
        "0": ColwiseLoRAParallel(input_layouts=Shard(1)),
        "1": RowwiseLoRAParallel(output_layouts=Shard(1), use_local_output=False),
    })
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(6))
    y_ref = reference(x)
    y = sharded(x.chunk(2, dim=1)[rank])
    assert y.placements == (Shard(1),)
    _close(y, y_ref, "sequence-parallel y")


def _check_llama_block(rank, mesh):
    torch.manual_seed(0)
    reference = adapt(Block())
    sharded = parallelize_module(copy.deepcopy(reference), mesh,
                                 block_tp_plan(ColwiseLoRAParallel, RowwiseLoRAParallel))
    assert sharded.self_attn.q_proj.weight.to_local().shape == (HIDDEN // 2, HIDDEN)
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(8))
    (y_ref, y), (dx_ref, dx) = _run_both(reference, sharded, x, seed=13)
    _close(y, y_ref, "block y", tol=1e-4)
    _close(dx, dx_ref, "block dx", tol=1e-4)
    expected = lora_grads(reference)
    actual = lora_grads(sharded)
    assert actual.keys() == expected.keys() and len(actual) == 14
    for name in expected:
        _close(actual[name], expected[name], f"block grad {name}", tol=1e-4)

    # The adapter leaves the sharded block whole and goes back into the shards.
    state = gather_lora_state_dict(sharded)
    expected = lora_state_dict(reference)
    assert state.keys() == expected.keys()
    for key, tensor in state.items():
        assert not isinstance(tensor, DTensor)
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=0)
    torch.manual_seed(0)
    fresh = parallelize_module(adapt(Block(), seed=99), mesh, block_tp_plan(ColwiseLoRAParallel, RowwiseLoRAParallel))
    distribute_lora_state_dict(fresh, state)
    _close(fresh(x), y_ref, "block y after load", tol=1e-4)


def _check_uneven(rank, mesh):
    """out_features (column) and in_features (row) that do not divide over 2 ranks: DTensor splits them as
    torch.chunk does (5 -> 3 + 2), and outputs and gradients equal the unsharded layer's."""
    world = mesh.size()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(21))

    # Column-parallel, N = 5, with dropout (every rank the same seed): the output as a DTensor of global (3, 5).
    reference = _layer(8, 5, dropout=0.25)
    sharded = parallelize_module(copy.deepcopy(reference), mesh, ColwiseLoRAParallel(use_local_output=False))
    assert sharded.lora_B.to_local().shape == ((3, 4) if rank == 0 else (2, 4))
    (y_ref, y), (dx_ref, dx) = _run_both(reference, sharded, x, seed=22)
    assert y.shape == (3, 5)
    _close(y, y_ref, "uneven colwise y")
    _close(dx, dx_ref, "uneven colwise dx")
    for name in ("lora_A", "lora_B"):
        _close(getattr(sharded, name).grad, getattr(reference, name).grad, f"uneven colwise d{name}")

    # Row-parallel, K = 5, the whole input split by the style.
    x5 = torch.randn(3, 5, generator=torch.Generator().manual_seed(23))
    reference = _layer(5, 8, dropout=0.0)
    sharded = parallelize_module(copy.deepcopy(reference), mesh, RowwiseLoRAParallel(input_layouts=Replicate()))
    assert sharded.lora_A.to_local().shape == ((4, 3) if rank == 0 else (4, 2))
    (y_ref, y), (dx_ref, dx) = _run_both(reference, sharded, x5, seed=24)
    _close(y, y_ref, "uneven rowwise y")
    _close(dx, dx_ref, "uneven rowwise dx")
    for name in ("lora_A", "lora_B"):
        _close(getattr(sharded, name).grad, getattr(reference, name).grad, f"uneven rowwise d{name}")

    # The usual pair: the column layer's local (3, 3) / (3, 2) output is the row layer's Shard(-1) input.
    torch.manual_seed(5)
    reference = torch.nn.Sequential(_layer(8, 5, dropout=0.0), _layer(5, 8, dropout=0.0, bias=False))
    sharded = parallelize_module(copy.deepcopy(reference), mesh,
                                 {"0": ColwiseLoRAParallel(), "1": RowwiseLoRAParallel()})
    (y_ref, y), (dx_ref, dx) = _run_both(reference, sharded, x, seed=25)
    _close(y, y_ref, "uneven pair y")
    _close(dx, dx_ref, "uneven pair dx")
    for index in ("0", "1"):
        for name in ("lora_A", "lora_B"):
            _close(getattr(sharded.get_submodule(index), name).grad,
                   getattr(reference.get_submodule(index), name).grad, f"uneven pair {index}.d{name}")

    # A column-parallel layer fed a feature-sharded input (Shard(-1), K = 5): all-gathered into the whole x.
    reference = _layer(5, 8, dropout=0.0)
    sharded = parallelize_module(copy.deepcopy(reference), mesh, ColwiseLoRAParallel(input_layouts=Shard(-1)))
    x_local = x5.chunk(world, dim=-1)[rank].clone().requires_grad_()
    y = sharded(x_local)
    y_ref = reference(x5)
    _close(y, y_ref.chunk(world, dim=-1)[rank], "feature-sharded colwise input, y")

    # A Shard(-1) input that is not this rank's share of in_features is refused, naming the layer and sizes.
    row = parallelize_module(_layer(5, 8, dropout=0.0), mesh, RowwiseLoRAParallel())
    with pytest.raises(ValueError, match=rf"in_features=5, out_features=8.*rank {rank}.*\(3, 4\).*over {world}"):
        row(torch.zeros(3, 4))

    # Splitting in_features = 1 leaves rank 1 no input feature, which the kernel cannot take: refused on every
    # rank when the style is applied. (An empty output slice works: column-parallel out_features = 1.)
    with pytest.raises(ValueError, match=r"FusedLoRALinear\(in_features=1, out_features=8\).*over 2 .*\[1\]"):
        parallelize_module(_layer(1, 8, dropout=0.0), mesh, RowwiseLoRAParallel())
    reference = _layer(8, 1, dropout=0.0)
    sharded = parallelize_module(copy.deepcopy(reference), mesh, ColwiseLoRAParallel(output_layouts=Replicate()))
    (y_ref, y), _ = _run_both(reference, sharded, x, seed=26)
    _close(y, y_ref, "colwise out_features=1 y")
    _close(sharded.lora_A.grad, reference.lora_A.grad, "colwise out_features=1 dA")


def _check_dropout_seed_per_rank(rank, mesh):
    """Column-parallel dropout when the tensor-parallel ranks' generators differ (docs/distributed.md): each rank
    draws its own mask for its slice of the output, and the gradients are those of that output, i.e. the
    unsharded layer run once per rank's seed, each run contributing the output columns that rank holds."""
    world = mesh.size()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(31))
    reference = _layer(8, 5, dropout=0.5)
    sharded = parallelize_module(copy.deepcopy(reference), mesh, ColwiseLoRAParallel(use_local_output=False))
    weights = torch.linspace(-1, 1, 15).view(3, 5)

    x_in = x.clone().requires_grad_()
    torch.manual_seed(100 + rank)
    y = sharded(x_in).full_tensor()
    (y * weights).sum().backward()

    x_ref = x.clone().requires_grad_()
    expected = torch.empty(3, 5)
    for owner, columns in enumerate(torch.arange(5).chunk(world)):
        torch.manual_seed(100 + owner)
        y_owner = reference(x_ref)
        expected[:, columns] = y_owner[:, columns].detach()
        (y_owner[:, columns] * weights[:, columns]).sum().backward()
    assert not torch.equal(expected[:, :3], reference.eval()(x)[:, :3]), "dropout must have dropped something"
    _close(y, expected, "per-rank-seed colwise y")
    _close(x_in.grad, x_ref.grad, "per-rank-seed colwise dx")
    for name in ("lora_A", "lora_B"):
        _close(getattr(sharded, name).grad, getattr(reference, name).grad, f"per-rank-seed colwise d{name}")


def _uneven_worker(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    _check_uneven(rank, mesh)
    _check_dropout_seed_per_rank(rank, mesh)


def _tp_worker(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    _check_single_layers(rank, mesh)
    _check_sequence_parallel(rank, mesh)
    _check_llama_block(rank, mesh)


def test_tensor_parallel_matches_unsharded():
    run_workers(_tp_worker, 2)


def test_tensor_parallel_uneven_shards_match_unsharded():
    run_workers(_uneven_worker, 2)
