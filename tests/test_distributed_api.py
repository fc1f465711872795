"""Argument checking of lorafuse.distributed, in one process (a world of one gloo rank where a mesh is needed)."""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from dist_harness import free_port
from tiny_llama import build, lora_config
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module

from lorafuse import FusedLoRALinear, lora_state_dict
from lorafuse.distributed import (
    ColwiseLoRAParallel,
    RowwiseLoRAParallel,
    default_blocks,
    distribute_lora_state_dict,
    gather_lora_state_dict,
    shard_lora_model,
)
from lorafuse.distributed.sharded import sharded_lora_linear


@pytest.fixture
def mesh():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_styles_check_their_module_mesh_and_options(mesh):
    with pytest.raises(TypeError, match="shards FusedLoRALinear layers, got Linear"):
        parallelize_module(nn.Linear(4, 4), mesh, ColwiseLoRAParallel())
    two_d = init_device_mesh("cpu", (1, 1))
    with pytest.raises(ValueError, match="needs a 1-D tensor-parallel mesh"):
        RowwiseLoRAParallel()._apply(FusedLoRALinear(4, 4, r=2), two_d)
    with pytest.raises(TypeError, match="input_layouts must be a torch.distributed.tensor Placement"):
        ColwiseLoRAParallel(input_layouts="replicate")
    with pytest.raises(TypeError, match="use_local_output must be True or False"):
        RowwiseLoRAParallel(use_local_output=1)
    sharded_first = fully_shard(FusedLoRALinear(4, 4, r=2), mesh=mesh)
    with pytest.raises(ValueError, match="already a DTensor: apply the tensor-parallel style before fully_shard"):
        parallelize_module(sharded_first, mesh, RowwiseLoRAParallel())


def test_dtensor_parameters_need_a_dtensor_input_and_a_known_layout(mesh):
    layer = parallelize_module(FusedLoRALinear(4, 6, r=2), mesh, ColwiseLoRAParallel())
    x = torch.randn(3, 4)
    assert layer.lora_function is sharded_lora_linear  # set by the style
    with pytest.raises(TypeError, match="x is a plain tensor but the layer's parameters are column-parallel"):
        sharded_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, scaling=1.0)
    assert layer(x).shape == (3, 6)  # through the style's input hook it works
    everything_replicated = distribute_tensor(layer.lora_B.full_tensor().detach(), mesh, [Replicate()])
    with pytest.raises(ValueError, match="expected column-parallel"):
        sharded_lora_linear(x, layer.weight, layer.bias, layer.lora_A, everything_replicated, scaling=1.0)
    with pytest.raises(TypeError, match="lora_B is a plain Tensor while other LoRA parameters are DTensors"):
        sharded_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B.full_tensor(), scaling=1.0)


def test_shard_lora_model_checks_its_arguments(mesh):
    with pytest.raises(TypeError, match="mesh must be a DeviceMesh"):
        shard_lora_model(build(), "cpu")
    with pytest.raises(ValueError, match="has no FusedLoRALinear layer"):
        shard_lora_model(nn.Sequential(nn.Linear(2, 2)), mesh)
    model = build()
    with pytest.raises(ValueError, match="blocks must be submodules of the model"):
        shard_lora_model(model, mesh, blocks=[nn.Linear(2, 2)])
    assert default_blocks(model) == list(model.layers)


def test_state_dict_round_trip_and_errors_on_an_unsharded_model():
    source, target = build(), build(seed=99)
    state = gather_lora_state_dict(source)
    assert state.keys() == lora_state_dict(source).keys()
    result = distribute_lora_state_dict(target, {key.removeprefix("base_model.model."): v for key, v in state.items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    for key, value in lora_state_dict(target).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)

    key = next(iter(state))
    with pytest.raises(KeyError, match=f"missing keys: {key}; unexpected keys: none"):
        distribute_lora_state_dict(target, {k: v for k, v in state.items() if k != key})
    result = distribute_lora_state_dict(target, {k: v for k, v in state.items() if k != key}, strict=False)
    assert result.missing_keys == [key]
    with pytest.raises(ValueError, match="adapter shapes do not match"):
        distribute_lora_state_dict(target, {**state, key: torch.zeros(1)})
    with pytest.raises(TypeError, match="must be a tensor"):
        distribute_lora_state_dict(target, {**state, key: [1.0]})
    with pytest.raises(ValueError, match="has no FusedLoRALinear layer"):
        gather_lora_state_dict(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="config must be a LoRAConfig or None"):
        gather_lora_state_dict(source, config={"r": 4})
    assert lora_config().r == 4


def test_loading_into_a_meta_model_is_refused():
    # Copying into a meta tensor stores nothing; the loader must say so instead of returning quietly.
    state = gather_lora_state_dict(build())
    meta_model = build().to("meta")
    with pytest.raises(ValueError, match="on the meta device"):
        distribute_lora_state_dict(meta_model, state)


def test_missing_keys_are_listed_as_the_single_device_loader_lists_them():
    state = gather_lora_state_dict(build())
    kept = dict(list(state.items())[:2])
    with pytest.raises(KeyError, match=r"missing keys: .*, \.\.\. \(14 more\); unexpected keys: none"):
        distribute_lora_state_dict(build(seed=99), kept)


def test_fsdp2_sees_an_output_that_is_no_view(mesh):
    # FSDP2 hooks its pre-backward on the module's output and warns when that output is a view: an in-place op on
    # it (out += residual) would skip the hook. The fused layer's output is a fresh tensor for any input rank.
    layer = fully_shard(FusedLoRALinear(8, 6, r=2), mesh=mesh)
    for shape in [(5, 8), (2, 3, 8), (8,)]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = layer(torch.randn(shape))
        assert not [w for w in caught if "returned a view tensor" in str(w.message)], shape
        assert y._base is None and y.shape == (*shape[:-1], 6)
        y += 1.0  # in place, as a residual add would be
        y.sum().backward()
        assert layer.lora_B.grad is not None
