"""DDP over a lorafuse model: 2 gloo processes on CPU, each training on half the batch, against one
process training on all of it."""

import pytest
import torch
from dist_harness import FP64_TOLERANCE, mean_over_ranks, run_workers
from tiny_llama import adapter_of, build, tokens, train
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

pytestmark = pytest.mark.slow

STEPS = 2


def _ddp_worker(rank, world_size):
    batches = [tokens(2 * world_size, 9, seed=step) for step in range(STEPS)]
    # float64: the claim is that DDP computes the same training, not that it sums in the same order.
    reference = build(dtype=torch.float64)
    reference_losses = train(reference, batches)

    model = build(dtype=torch.float64)
    ddp = DistributedDataParallel(model)
    reduced = set()

    def recording_hook(state, bucket):
        reduced.update(id(p) for p in bucket.parameters())
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_hook)
    # Equal local batches: the mean of the ranks' token-mean losses is the global token mean.
    local = [batch.chunk(world_size)[rank] for batch in batches]
    losses = train(ddp, local, reduce=mean_over_ranks)

    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), **FP64_TOLERANCE)
    adapters = {id(p) for name, p in model.named_parameters() if name.endswith(("lora_A", "lora_B"))}
    assert reduced == adapters, "DDP must reduce the adapter parameters and nothing else"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    expected = adapter_of(reference)
    for name, value in adapter_of(model).items():
        torch.testing.assert_close(value, expected[name], **FP64_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")


def test_ddp_matches_single_process():
    run_workers(_ddp_worker, 2)
