"""Tensor-parallel styles for `FusedLoRALinear`, used with `torch.distributed.tensor.parallel.parallelize_module`.

They place the parameters as DTensors (so state dicts, DCP checkpoints, optimizers and FSDP2 see ordinary
DTensor parameters), annotate the module's input and output like torch's ColwiseParallel and
RowwiseParallel, and make `sharded_lora_linear` the layer's `lora_function`: its forward runs the fused
kernel on local shards (lorafuse/distributed/sharded.py).

    plan = {"attn.q_proj": ColwiseLoRAParallel(), "attn.o_proj": RowwiseLoRAParallel(), ...}
    parallelize_module(block, tp_mesh, plan)
"""

from functools import partial

import torch.nn as nn
from torch.distributed.tensor import DeviceMesh, DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from ..dora_layer import FusedDoRALinear
from ..layer import FusedLoRALinear
from .sharded import LAYOUTS, check_row_split, contiguous_strides, normalized, shard_size, sharded_lora_linear


def _check_module(module, style):
    if not isinstance(module, FusedLoRALinear):
        raise TypeError(f"{style} shards FusedLoRALinear layers, got {type(module).__name__}; use torch's "
                        f"ColwiseParallel/RowwiseParallel for plain nn.Linear")
    if isinstance(module, FusedDoRALinear):
        # Its forward is dora_linear, not lora_function, so a sharded lora_function would never run; and the row
        # norms ||W + s B A|| need every input feature, which row-wise sharding splits over the ranks.
        raise TypeError(f"{style} cannot shard FusedDoRALinear(in_features={module.in_features}, out_features="
                        f"{module.out_features}): tensor parallelism is not implemented for DoRA layers (DoRA's "
                        "row norms of W + s B A need an all-reduce when W is split by input features); use "
                        "DDP or FSDP2 (lorafuse.distributed.shard_lora_model) for a DoRA model")


def _check_placement(name, value):
    if value is not None and not isinstance(value, Placement):
        raise TypeError(f"{name} must be a torch.distributed.tensor Placement (Replicate(), Shard(d)) or None, "
                        f"got {type(value).__name__}")


def _stored_placements(module, layout):
    """Placements of the registered parameters: the weight of a fan_in_fan_out layer is stored (in, out),
    so its shard dimension is the other one."""
    weight, lora_A, lora_B, bias = LAYOUTS[layout]
    if module.fan_in_fan_out:
        weight = Shard(1 - weight.dim)
    return {"weight": weight, "lora_A": lora_A, "lora_B": lora_B, "bias": bias}


def _partition(placements, src_data_rank, name, module, device_mesh):
    # distribute_module calls this for every submodule; a FusedLoRALinear has none of its own.
    if not isinstance(module, FusedLoRALinear):
        return
    for param_name, param in list(module.named_parameters(recurse=False)):
        if isinstance(param, DTensor):
            raise ValueError(f"{name or 'the module'}.{param_name} is already a DTensor: apply the tensor-parallel "
                             f"style before fully_shard, and only once")
        dist_param = distribute_tensor(param, device_mesh, [placements[param_name]], src_data_rank=src_data_rank)
        module.register_parameter(param_name, nn.Parameter(dist_param, requires_grad=param.requires_grad))
    module.lora_function = sharded_lora_linear


def _input_dtensor(x, input_layout, module, device_mesh):
    """The local input `x` as a DTensor. Split on the feature (last) dim, its global size is the layer's
    in_features, which need not divide over the ranks (5 over 2: 3 + 2), so it is passed to from_local, and
    this rank must hold its share. Split on another dim (Shard(1), sequence parallelism) the global size is
    known to no single rank and from_local takes it as local * ranks, as torch's SequenceParallel does: the
    sequence length must divide over the tensor-parallel ranks."""
    layout = normalized(input_layout, x.dim())
    if not (isinstance(layout, Shard) and layout.dim == x.dim() - 1):
        return DTensor.from_local(x, device_mesh, [input_layout], run_check=False)
    world, rank = device_mesh.size(), device_mesh.get_local_rank()
    expected = shard_size(module.in_features, world, rank)
    if x.shape[-1] != expected:
        raise ValueError(f"{type(module).__name__}(in_features={module.in_features}, out_features="
                         f"{module.out_features}) with input_layouts={input_layout}: tensor-parallel rank {rank} "
                         f"got an input of shape {tuple(x.shape)}, but its share of in_features={module.in_features} "
                         f"over {world} ranks is {expected} features (DTensor's split, as a column-parallel "
                         f"layer's local output has it)")
    shape = (*x.shape[:-1], module.in_features)
    return DTensor.from_local(x, device_mesh, [input_layout], run_check=False, shape=shape,
                              stride=contiguous_strides(shape))


def _prepare_input(input_layout, desired_layout, module, inputs, device_mesh):
    x = inputs[0]
    if not isinstance(x, DTensor):
        x = _input_dtensor(x, input_layout, module, device_mesh)
    if tuple(normalized(p, x.dim()) for p in x.placements) != (normalized(desired_layout, x.dim()),):
        x = x.redistribute(placements=[desired_layout])
    return (x, *inputs[1:])


def _prepare_output(output_layout, use_local_output, module, outputs, device_mesh):
    ndim = outputs.dim()
    if tuple(normalized(p, ndim) for p in outputs.placements) != (normalized(output_layout, ndim),):
        outputs = outputs.redistribute(placements=[output_layout])
    return outputs.to_local() if use_local_output else outputs


class _LoRAParallel(ParallelStyle):
    layout = ""

    def __init__(self, *, input_layouts=None, output_layouts=None, use_local_output=True):
        _check_placement("input_layouts", input_layouts)
        _check_placement("output_layouts", output_layouts)
        if not isinstance(use_local_output, bool):
            raise TypeError(f"use_local_output must be True or False, got {use_local_output!r}")
        self.input_layouts = input_layouts or self._default_input
        self.output_layouts = output_layouts or self._default_output
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _check_module(module, type(self).__name__)
        if device_mesh.ndim != 1:
            raise ValueError(f"{type(self).__name__} needs a 1-D tensor-parallel mesh, got {device_mesh.ndim}-D "
                             f"{device_mesh}; pass mesh['tp'] of a 2-D mesh")
        if self.layout == "row":
            check_row_split(f"FusedLoRALinear(in_features={module.in_features}, out_features={module.out_features})",
                            module.in_features, device_mesh.size())
        placements = _stored_placements(module, self.layout)
        return distribute_module(
            module, device_mesh,
            partial(_partition, placements, self.src_data_rank),
            partial(_prepare_input, self.input_layouts, self._desired_input),
            partial(_prepare_output, self.output_layouts, self.use_local_output),
        )

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_layouts={self.input_layouts}, output_layouts={self.output_layouts}, "
                f"use_local_output={self.use_local_output})")


class ColwiseLoRAParallel(_LoRAParallel):
    """Column-parallel FusedLoRALinear: W, lora_B and the bias split on the output dim, lora_A replicated.

    input_layouts: how the input arrives (default Replicate(); Shard(1) for a sequence-parallel input, which
    is all-gathered). output_layouts: the output's layout (default Shard(-1), each rank its slice of the
    features). use_local_output: return a plain tensor (default) rather than a DTensor.
    """

    layout = "column"
    _default_input = Replicate()
    _desired_input = Replicate()
    _default_output = Shard(-1)


class RowwiseLoRAParallel(_LoRAParallel):
    """Row-parallel FusedLoRALinear: W and lora_A split on the input dim, lora_B and the bias replicated.

    input_layouts: how the input arrives (default Shard(-1), a column-parallel layer's local output).
    output_layouts: the output's layout (default Replicate(), an all-reduce; Shard(1) for sequence
    parallelism, a reduce-scatter). use_local_output: return a plain tensor (default) rather than a DTensor.
    """

    layout = "row"
    _default_input = Shard(-1)
    _desired_input = Shard(-1)
    _default_output = Replicate()
