"""DoRA under FSDP2: the magnitude is an ordinary parameter, sharded, trained, gathered and loaded like lora_A /
lora_B (2 gloo processes on CPU against one process)."""


import pytest
import torch
from dist_harness import FP64_TOLERANCE, mean_over_ranks, run_workers
from tiny_llama import ATTENTION, MLP, TinyLlama, loss_fn, tokens, train
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from lorafuse import LoRAConfig, apply_lora, lora_state_dict
from lorafuse.distributed import gather_lora_state_dict, load_adapter, save_adapter, shard_lora_model
from lorafuse.targeting import lora_layers

pytestmark = pytest.mark.slow

CONFIG = LoRAConfig(r=4, lora_alpha=8, target_modules=list(ATTENTION + MLP), use_dora=True)


def _build(*, seed=7):
    """A float64 TinyLlama (base weights from seed 0) with DoRA layers whose B and magnitude come from `seed`."""
    torch.manual_seed(0)
    model = apply_lora(TinyLlama(2), CONFIG)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) / layer.r ** 0.5)
            layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=generator))
    return model.double()


def _dora_fsdp_worker(rank, world_size, directory):
    batches = [tokens(2 * world_size, 9, seed=step) for step in range(2)]
    reference = _build()
    reference_losses = train(reference, batches)

    mesh = init_device_mesh("cpu", (world_size,))
    model = shard_lora_model(_build(), mesh)
    magnitude = model.layers[0].self_attn.q_proj.lora_magnitude_vector
    assert isinstance(magnitude, DTensor) and magnitude.requires_grad
    local = [batch.chunk(world_size)[rank] for batch in batches]
    losses = train(model, local, reduce=mean_over_ranks)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses), **FP64_TOLERANCE)

    state = gather_lora_state_dict(model)
    expected = lora_state_dict(reference)
    assert state.keys() == expected.keys()
    assert sum(key.endswith(".lora_magnitude_vector") for key in state) == len(lora_layers(reference))
    for key, value in state.items():
        torch.testing.assert_close(value, expected[key], **FP64_TOLERANCE, msg=lambda m, k=key: f"{k}: {m}")
    save_adapter(model, directory, config=CONFIG)

    fresh = shard_lora_model(_build(seed=99), mesh)
    load_adapter(fresh, directory, config=CONFIG)
    check = tokens(2, 9, seed=50)
    with torch.no_grad():
        torch.testing.assert_close(loss_fn(fresh, check), loss_fn(reference, check), **FP64_TOLERANCE)


def test_fsdp2_trains_saves_and_loads_the_dora_magnitude(tmp_path):
    run_workers(_dora_fsdp_worker, 2, str(tmp_path))
