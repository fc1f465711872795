"""FSDP2 + tensor parallelism on a 2-D (dp=2, tp=2) mesh: 4 gloo processes on CPU against one process."""

import pytest
import torch
from dist_harness import FP64_TOLERANCE, mean_over_ranks, run_workers
from tiny_llama import block_tp_plan, build, tokens, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import parallelize_module

from lorafuse import lora_state_dict
from lorafuse.distributed import ColwiseLoRAParallel, RowwiseLoRAParallel, gather_lora_state_dict, shard_lora_model

pytestmark = pytest.mark.slow

STEPS = 2


def _fsdp_tp_worker(rank, world_size):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    batches = [tokens(4, 9, seed=step) for step in range(STEPS)]
    # float64: the claim is that the sharded training is the same training, not that it sums in the same order.
    reference = build(dtype=torch.float64)
    reference_losses = train(reference, batches)

    model = build(dtype=torch.float64)
    for block in model.layers:
        parallelize_module(block, mesh["tp"], block_tp_plan(ColwiseLoRAParallel, RowwiseLoRAParallel))
    shard_lora_model(model, mesh["dp"])
    o_proj = model.layers[0].self_attn.o_proj
    # dp shards dim 0 of the tp-local tensor: a row-parallel A is (Shard(0) over dp, Shard(1) over tp).
    assert o_proj.lora_A.placements == (Shard(0), Shard(1)) and o_proj.lora_B.placements == (Shard(0), Replicate())

    dp_rank = mesh.get_local_rank("dp")
    local = [batch.chunk(2)[dp_rank] for batch in batches]
    losses = train(model, local, reduce=mean_over_ranks)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), **FP64_TOLERANCE)

    expected = lora_state_dict(reference)
    state = gather_lora_state_dict(model)
    assert state.keys() == expected.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, expected[name], **FP64_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")


def test_fsdp2_with_tensor_parallel_on_2d_mesh():
    run_workers(_fsdp_tp_worker, 4, timeout=300)
