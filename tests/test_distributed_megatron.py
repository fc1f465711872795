"""apply_lora_to_megatron_model on Megatron's ColumnParallelLinear / RowParallelLinear, tensor parallel
over 2 gloo processes on CPU, against the same block computed unsharded with lorafuse.lora_linear.

Runs on real megatron-core layers when megatron-core imports, and always on tests/megatron_standin.py,
a stand-in with Megatron's constructor, attributes and (output, bias) forward, for machines without it.
"""

import importlib.util

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from dist_harness import run_workers

from lorafuse import LoRAConfig, lora_linear
from lorafuse.integrations.megatron import MegatronLoRALinear, apply_lora_to_megatron_model

pytestmark = pytest.mark.slow

HIDDEN, QKV, FFN = 32, 48, 64
CONFIG = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear")
#: fp64 (the kernels support it) so that sharded and unsharded results agree to 1e-10, whatever the sum order.
DTYPE = torch.float64
#: The wrapped layers of `Block`, by path.
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def _layer_classes(impl, sequence_parallel):
    if impl == "megatron":
        import warnings

        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

        config = ModelParallelConfig(tensor_model_parallel_size=dist.get_world_size(), params_dtype=DTYPE,
                                     sequence_parallel=sequence_parallel, use_cpu_initialization=True)
        return ColumnParallelLinear, RowParallelLinear, config
    from megatron_standin import ColumnParallelLinear, ParallelConfig, RowParallelLinear

    return ColumnParallelLinear, RowParallelLinear, ParallelConfig(sequence_parallel=sequence_parallel,
                                                                   params_dtype=DTYPE)


class Block(nn.Module):
    """The linear layers of a Megatron TransformerLayer, under Megatron's names: skip_bias_add both ways,
    and with `gather` (no sequence parallelism) gather_output=True feeding input_is_parallel=False."""

    def __init__(self, impl, sequence_parallel, gather):
        super().__init__()
        column, row, config = _layer_classes(impl, sequence_parallel)
        group = dist.group.WORLD
        init = lambda w: nn.init.normal_(w, std=0.2)  # noqa: E731 - one RNG stream, each rank its slice
        self.self_attention, self.mlp = nn.Module(), nn.Module()
        self.self_attention.linear_qkv = column(HIDDEN, QKV, config=config, init_method=init, bias=True,
                                                gather_output=False, skip_bias_add=False, tp_group=group)
        self.self_attention.linear_proj = row(QKV, HIDDEN, config=config, init_method=init, bias=True,
                                              input_is_parallel=True, skip_bias_add=True, tp_group=group)
        self.mlp.linear_fc1 = column(HIDDEN, FFN, config=config, init_method=init, bias=True,
                                     gather_output=gather, skip_bias_add=False, tp_group=group)
        self.mlp.linear_fc2 = row(FFN, HIDDEN, config=config, init_method=init, bias=True,
                                  input_is_parallel=not gather, skip_bias_add=False, tp_group=group)

    def forward(self, x):
        h, no_bias = self.self_attention.linear_qkv(x)
        assert no_bias is None
        y, bias = self.self_attention.linear_proj(F.gelu(h))
        x = x + y + bias
        h, no_bias = self.mlp.linear_fc1(x)
        assert no_bias is None
        y, no_bias = self.mlp.linear_fc2(F.gelu(h))
        assert no_bias is None
        return x + y


def _reference_forward(full, x, scaling):
    def linear(name, inp):
        weight, bias, lora_A, lora_B = full[name]
        return lora_linear(inp, weight, bias, lora_A, lora_B, scaling=scaling)

    x = x + linear("self_attention.linear_proj", F.gelu(linear("self_attention.linear_qkv", x)))
    return x + linear("mlp.linear_fc2", F.gelu(linear("mlp.linear_fc1", x)))


def _gather(t, dim):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, dim=dim)


def _same_everywhere(t):
    gathered = _gather(t.unsqueeze(0), 0)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _check(rank, world_size, impl, sequence_parallel):
    torch.manual_seed(0)  # Megatron initialises each weight from one CPU stream, the same on every rank
    # Megatron's own gathers allocate on CUDA (mappings.py), so on CPU its layers run neither gather_output nor
    # sequence parallelism themselves: those branches of the wrapper are checked through the stand-in.
    megatron_runs_base = impl == "standin" or not sequence_parallel
    block = Block(impl, sequence_parallel, gather=impl == "standin" and not sequence_parallel)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in block.named_modules():
            if getattr(layer, "bias", None) is not None:
                full = torch.randn(layer.output_size, generator=generator, dtype=DTYPE)
                layer.bias.copy_(full.chunk(world_size)[rank] if hasattr(layer, "gather_output") else full)
    x_full = torch.randn(4, 2, HIDDEN, generator=generator, dtype=DTYPE)
    x = x_full.chunk(world_size)[rank] if sequence_parallel else x_full
    base_out = block(x) if megatron_runs_base else None

    apply_lora_to_megatron_model(block, CONFIG)
    wrapped = {name: m for name, m in block.named_modules() if isinstance(m, MegatronLoRALinear)}
    assert sorted(wrapped) == sorted(LINEARS)
    assert [n for n, p in block.named_parameters() if p.requires_grad] == \
        [f"{name}.lora_{ab}" for name in wrapped for ab in "AB"]
    if base_out is not None:
        # B starts at zero: the adapted block is the base block, through Megatron's own forward.
        with torch.no_grad():
            torch.testing.assert_close(block(x), base_out, atol=1e-10, rtol=1e-10)

    full = {}
    with torch.no_grad():
        for name, layer in wrapped.items():
            base = layer.base_layer
            column = layer.parallel_mode == "column"
            full_B = torch.randn((base.output_size, CONFIG.r), generator=generator, dtype=DTYPE)
            layer.lora_B.copy_(full_B.chunk(world_size)[rank] if column else full_B)
            replicated = layer.lora_A if column else layer.lora_B
            assert _same_everywhere(replicated), f"{name}: replicated adapter differs across ranks"
            shard_dim = 0 if column else 1
            full[name] = [_gather(base.weight, shard_dim),
                          _gather(base.bias, 0) if column else base.bias.detach().clone(),
                          layer.lora_A.detach().clone() if column else _gather(layer.lora_A, 1),
                          _gather(layer.lora_B, 0) if column else layer.lora_B.detach().clone()]
    for tensors in full.values():
        tensors[2].requires_grad_()
        tensors[3].requires_grad_()

    x = x.clone().requires_grad_()
    x_ref = x_full.clone().requires_grad_()
    weights = torch.linspace(-1, 1, x_full.numel(), dtype=DTYPE).view_as(x_full)
    local_weights = weights.chunk(world_size)[rank] if sequence_parallel else weights
    (block(x) * local_weights).sum().backward()
    y_ref = _reference_forward(full, x_ref, wrapped["mlp.linear_fc1"].scaling)
    (y_ref * weights).sum().backward()

    with torch.no_grad():
        y = block(x)
    expected_y = y_ref.chunk(world_size)[rank] if sequence_parallel else y_ref
    torch.testing.assert_close(y, expected_y.detach(), atol=1e-10, rtol=1e-10)
    expected_dx = x_ref.grad.chunk(world_size)[rank] if sequence_parallel else x_ref.grad
    torch.testing.assert_close(x.grad, expected_dx, atol=1e-10, rtol=1e-10)
    for name, layer in wrapped.items():
        column = layer.parallel_mode == "column"
        ref_A, ref_B = full[name][2].grad, full[name][3].grad
        expected_A = ref_A if column else ref_A.chunk(world_size, dim=1)[rank]
        expected_B = ref_B.chunk(world_size)[rank] if column else ref_B
        for grad, expected, label in ((layer.lora_A.grad, expected_A, "dA"), (layer.lora_B.grad, expected_B, "dB")):
            torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-10,
                                       msg=lambda m, n=f"{name} {label}": f"{n}: {m}")
        sharded = layer.lora_B if column else layer.lora_A
        assert sharded.tensor_model_parallel and sharded.partition_dim == (0 if column else 1)
    assert all(p.grad is None for p in block.parameters() if not p.requires_grad)


def _check_checkpoint_entries(rank, world_size):
    """Megatron distributed-checkpoint metadata of a wrapped layer: the base weight under the module's key and
    the unwrapped on-disk key, the column-parallel B as this rank's slice of the global (N, r), A replicated."""
    torch.manual_seed(0)
    block = apply_lora_to_megatron_model(Block("megatron", False, gather=False), CONFIG)
    data_parallel = [dist.new_group([r]) for r in range(world_size)][rank]  # tp = world: dp groups of one
    entries = block.self_attention.linear_qkv.sharded_state_dict(prefix="layer.linear_qkv.",
                                                                 metadata={"dp_cp_group": data_parallel})
    assert {"layer.linear_qkv.base_layer.weight", "layer.linear_qkv.lora_A", "layer.linear_qkv.lora_B"} <= set(entries)
    weight = entries["layer.linear_qkv.base_layer.weight"]
    assert weight.key == "layer.linear_qkv.weight" and tuple(weight.global_shape) == (QKV, HIDDEN)
    lora_B, lora_A = entries["layer.linear_qkv.lora_B"], entries["layer.linear_qkv.lora_A"]
    assert tuple(lora_B.global_shape) == (QKV, CONFIG.r)
    assert tuple(lora_B.global_offset) == (rank * QKV // world_size, 0)
    assert tuple(lora_A.global_shape) == (CONFIG.r, HIDDEN) and tuple(lora_A.global_offset) == (0, 0)
    row = block.self_attention.linear_proj.sharded_state_dict(prefix="p.", metadata={"dp_cp_group": data_parallel})
    assert tuple(row["p.lora_A"].global_shape) == (CONFIG.r, QKV)
    assert tuple(row["p.lora_A"].global_offset) == (0, rank * QKV // world_size)


def _saved(entries):
    """What a distributed checkpoint stores for `entries` at tp=1 (global = local): each ShardedTensor's or
    ShardedObject's data under its on-disk key. megatron-core's own writer needs CUDA, hence this stand-in."""
    return {entry.key: entry.data.detach().clone() if torch.is_tensor(entry.data) else entry.data
            for entry in entries.values()}


def _loaded(entries, disk):
    """What `dist_checkpointing.load(entries, ...)` returns and Megatron passes to `model.load_state_dict`:
    the dict keys of `entries`, each filled from disk by its entry's on-disk key."""
    return {name: disk[entry.key] for name, entry in entries.items()}


def _block_entries(block, data_parallel):
    """The checkpoint entries of the block's four linears, each with its path as prefix, as Megatron's
    MegatronModule.sharded_state_dict collects them from a TransformerLayer."""
    entries = {}
    for name in LINEARS:
        entries.update(block.get_submodule(name).sharded_state_dict(prefix=f"{name}.",
                                                                    metadata={"dp_cp_group": data_parallel}))
    return entries


def _seeded_block(seed):
    """A tp=1 Megatron Block whose weights and biases depend on `seed` only (a layer holding a process group
    cannot be deep-copied)."""
    torch.manual_seed(seed)
    block = Block("megatron", False, gather=False)
    with torch.no_grad():
        for name, param in block.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    return block


def _check_checkpoint_round_trip(rank, world_size):
    """sharded_state_dict's dict keys are the module's state_dict keys and its base on-disk keys the unwrapped
    layer's: a wrapped checkpoint loads into a fresh wrapped model with load_state_dict(strict=True), an
    unwrapped (base) checkpoint into the wrapped model's base layers, and the wrapped one into an unwrapped model."""
    group = dist.group.WORLD
    base = _seeded_block(0)
    wrapped = apply_lora_to_megatron_model(_seeded_block(0), CONFIG)
    with torch.no_grad():
        for layer in wrapped.modules():
            if isinstance(layer, MegatronLoRALinear):
                layer.lora_B.normal_()

    entries = _block_entries(wrapped, group)
    assert set(entries) == set(wrapped.state_dict()), "dict keys must be the module's state_dict keys"
    base_entries = _block_entries(base, group)
    adapter_keys = {f"{name}.lora_{ab}" for name in LINEARS for ab in "AB"}
    assert {entry.key for entry in entries.values()} == {entry.key for entry in base_entries.values()} | adapter_keys

    # Wrapped checkpoint -> fresh wrapped model (resuming LoRA training).
    disk = _saved(entries)
    fresh = apply_lora_to_megatron_model(_seeded_block(1), CONFIG)
    fresh.load_state_dict(_loaded(_block_entries(fresh, group), disk), strict=True)
    for key, tensor in wrapped.state_dict().items():
        if torch.is_tensor(tensor):
            torch.testing.assert_close(fresh.state_dict()[key], tensor, rtol=0, atol=0)

    # Base checkpoint -> the wrapped model's base layers (the adapter entries are not in it).
    adapted = apply_lora_to_megatron_model(_seeded_block(1), CONFIG)
    base_disk = _saved(base_entries)
    requested = {name: entry for name, entry in _block_entries(adapted, group).items() if ".lora_" not in name}
    result = adapted.load_state_dict(_loaded(requested, base_disk), strict=False)
    assert sorted(result.missing_keys) == sorted(name for name in adapted.state_dict() if ".lora_" in name)
    assert not result.unexpected_keys
    for name, tensor in base.state_dict().items():
        if torch.is_tensor(tensor):
            path, _, leaf = name.rpartition(".")
            torch.testing.assert_close(adapted.state_dict()[f"{path}.base_layer.{leaf}"], tensor, rtol=0, atol=0)

    # Wrapped checkpoint -> an unwrapped model (the base weights without the adapter).
    unwrapped = _seeded_block(1)
    unwrapped.load_state_dict(_loaded(_block_entries(unwrapped, group), disk), strict=True)
    for name, tensor in base.state_dict().items():
        if torch.is_tensor(tensor):
            torch.testing.assert_close(unwrapped.state_dict()[name], tensor, rtol=0, atol=0)


def _megatron_worker(rank, world_size, impl):
    for sequence_parallel in (False, True):
        _check(rank, world_size, impl, sequence_parallel)
    if impl == "megatron":
        _check_checkpoint_entries(rank, world_size)


def test_megatron_standin_tensor_parallel_matches_unsharded():
    run_workers(_megatron_worker, 2, "standin")


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None or
                    importlib.util.find_spec("megatron.core") is None,
                    reason="megatron-core is not installed (the stand-in test covers the interface)")
def test_megatron_core_tensor_parallel_matches_unsharded():
    run_workers(_megatron_worker, 2, "megatron")


@pytest.mark.skipif(importlib.util.find_spec("megatron") is None or
                    importlib.util.find_spec("megatron.core") is None,
                    reason="megatron-core is not installed (sharded_state_dict needs its checkpoint classes)")
def test_megatron_core_checkpoint_keys_match_module():
    run_workers(_check_checkpoint_round_trip, 1)


def test_apply_rejects_what_it_cannot_wrap():
    block = nn.Module()
    block.linear_qkv = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="linear_qkv.*not a Megatron"):
        apply_lora_to_megatron_model(block, LoRAConfig(target_modules=["linear_qkv"]))
    with pytest.raises(ValueError, match="bias must be 'none'"):
        apply_lora_to_megatron_model(block, LoRAConfig(bias="all"))
    with pytest.raises(TypeError, match="LoRAConfig"):
        apply_lora_to_megatron_model(block, {"r": 8})
    with pytest.raises(TypeError, match="ColumnParallelLinear or RowParallelLinear"):
        MegatronLoRALinear(nn.Linear(4, 4))
