"""Stand-ins for Megatron-Core's ColumnParallelLinear and RowParallelLinear, for machines without
megatron-core: the constructor keywords, attributes, weight layouts and `forward -> (output, bias)`
contract of megatron/core/tensor_parallel/layers.py (0.16), computed with plain torch.distributed.

Only what lorafuse's wrapper relies on is reproduced (no gradient-accumulation fusion, no expert or
TE paths). The forward is for checking the wrapper against the base layer; it is run under no_grad.
"""

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class ParallelConfig:
    """The fields of Megatron's ModelParallelConfig these layers read."""

    sequence_parallel: bool = False
    params_dtype: torch.dtype = torch.float32


def _split_init(full_shape, dim, init_method, group, dtype):
    # Megatron's _initialize_affine_weight_cpu: the whole matrix from one RNG stream, each rank its slice.
    master = torch.empty(full_shape, dtype=dtype)
    init_method(master)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return master.chunk(world, dim=dim)[rank].contiguous()


def _gather(t, dim, group):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size, output_size, *, config, init_method, bias=True, gather_output=False,
                 skip_bias_add=False, tp_group=None):
        super().__init__()
        self.config = config
        self.tp_group = tp_group if tp_group is not None else dist.group.WORLD
        world = dist.get_world_size(self.tp_group)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = output_size // world
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel = config.sequence_parallel and world > 1
        self.is_expert = False
        self.weight = nn.Parameter(_split_init((output_size, input_size), 0, init_method, self.tp_group,
                                               config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=config.params_dtype)) \
            if bias else None

    @torch.no_grad()
    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.sequence_parallel:
            input_ = _gather(input_, 0, self.tp_group)
        output = F.linear(input_, self.weight, None if self.skip_bias_add else self.bias)
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = _gather(output, output.dim() - 1, self.tp_group)
        return output, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(nn.Module):
    def __init__(self, input_size, output_size, *, config, init_method, bias, input_is_parallel, skip_bias_add,
                 tp_group=None):
        super().__init__()
        self.config = config
        self.tp_group = tp_group if tp_group is not None else dist.group.WORLD
        world = dist.get_world_size(self.tp_group)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size // world
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = config.sequence_parallel
        self.is_expert = False
        self.weight = nn.Parameter(_split_init((output_size, input_size), 1, init_method, self.tp_group,
                                               config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype)) if bias else None

    @torch.no_grad()
    def forward(self, input_):
        if not self.input_is_parallel:
            rank, world = dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group)
            input_ = input_.chunk(world, dim=-1)[rank]
        output = F.linear(input_, self.weight)
        dist.all_reduce(output, group=self.tp_group)
        if self.sequence_parallel:
            rank, world = dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group)
            output = output.chunk(world, dim=0)[rank].contiguous()
        if self.skip_bias_add or self.bias is None:
            return output, (self.bias if self.skip_bias_add else None)
        return output + self.bias, None
