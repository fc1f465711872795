"""FSDP2 (`fully_shard`) over a lorafuse model, frozen base weights and adapters in the same groups:
2 gloo processes on CPU against one process, plus the adapter saved from and loaded into shards."""

import pytest
import torch
import torch.distributed as dist
from dist_harness import FP64_TOLERANCE, mean_over_ranks, run_workers
from tiny_llama import build, lora_config, lora_grads, loss_fn, tokens, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Shard

from lorafuse import lora_state_dict
from lorafuse.adapter_io import read_adapter_weights
from lorafuse.distributed import default_blocks, gather_lora_state_dict, load_adapter, save_adapter, shard_lora_model

pytestmark = pytest.mark.slow

STEPS = 2


def _fsdp_worker(rank, world_size, directory):
    batches = [tokens(2 * world_size, 9, seed=step) for step in range(STEPS)]
    # float64: the claim is that FSDP2 computes the same training, not that it sums in the same order.
    reference = build(dtype=torch.float64)
    reference_losses = train(reference, batches)

    mesh = init_device_mesh("cpu", (world_size,))
    model = build(dtype=torch.float64)
    blocks = default_blocks(model)
    assert blocks == list(model.layers)
    shard_lora_model(model, mesh)
    assert all(isinstance(block, FSDPModule) for block in blocks) and isinstance(model, FSDPModule)
    q_proj = model.layers[0].self_attn.q_proj
    # One FSDP group holds the frozen weight and the trainable adapter of the same layer.
    assert isinstance(q_proj.weight, DTensor) and q_proj.weight.placements == (Shard(0),)
    assert not q_proj.weight.requires_grad and q_proj.lora_A.requires_grad

    local = [batch.chunk(world_size)[rank] for batch in batches]
    losses = train(model, local, reduce=mean_over_ranks)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), **FP64_TOLERANCE)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)

    # Saved whole from the shards, in PEFT's files: equal to the single-process adapter after the same training.
    state = gather_lora_state_dict(model)
    expected = lora_state_dict(reference)
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert not isinstance(value, DTensor)
        torch.testing.assert_close(value, expected[key], **FP64_TOLERANCE, msg=lambda m, k=key: f"{k}: {m}")
    save_adapter(model, directory, config=lora_config())
    torch.testing.assert_close(read_adapter_weights(directory), state, rtol=0, atol=0)

    # Loaded into a fresh sharded model whose adapter started elsewhere: each rank keeps its own shard.
    fresh = shard_lora_model(build(seed=99, dtype=torch.float64), mesh)
    load_adapter(fresh, directory, config=lora_config())
    check = tokens(2, 9, seed=50)
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(fresh, check), loss_fn(reference, check), **FP64_TOLERANCE)
    local_A = fresh.layers[1].mlp.down_proj.lora_A.to_local()
    full_A = expected["base_model.model.layers.1.mlp.down_proj.lora_A.weight"]
    torch.testing.assert_close(local_A, full_A.chunk(world_size)[rank], **FP64_TOLERANCE)


def _fsdp_mixed_precision_worker(rank, world_size):
    # fp16 compute with fp32 sharded parameters and fp32 gradient reduction: the fused layer sees the fp16
    # unsharded parameters FSDP2 gathers, and the fp32 adapter gets fp32 gradients close to fp32 training's.
    batch = tokens(2 * world_size, 9, seed=0)
    reference = build()
    reference_loss = loss_fn(reference, batch)
    reference_loss.backward()
    expected = lora_grads(reference)

    mesh = init_device_mesh("cpu", (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    model = shard_lora_model(build(), mesh, mp_policy=policy)
    seen = []
    model.layers[0].self_attn.q_proj.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    loss = loss_fn(model, batch.chunk(world_size)[rank])
    assert seen == [torch.float16]
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.testing.assert_close(mean_loss / world_size, reference_loss.detach(), rtol=5e-3, atol=5e-3)
    for name, grad in lora_grads(model).items():
        assert grad.dtype == torch.float32, name
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=2e-2 * scale, msg=lambda m, n=name: f"{n}: {m}")


def test_fsdp2_mixed_precision_policy():
    run_workers(_fsdp_mixed_precision_worker, 2)


def test_fsdp2_matches_single_process_and_round_trips_the_adapter(tmp_path):
    run_workers(_fsdp_worker, 2, str(tmp_path))
