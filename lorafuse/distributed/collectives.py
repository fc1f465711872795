"""Differentiable collectives over a tensor-parallel process group, each the transpose of its backward.

The fused kernels only ever see local shards; these functions put the communication around them:

    all_reduce_in_backward   identity      | all-reduce      (a replicated input or weight used by every rank)
    all_reduce_in_forward    all-reduce    | identity        (partial sums of a row-parallel product)
    all_gather_last_dim      all-gather    | keep own slice  (column-parallel output gathered)
    split_last_dim           keep own slice| all-gather      (row-parallel input that arrives whole)
    all_gather_first_dim     all-gather    | reduce-scatter  (sequence-parallel input)
    reduce_scatter_first_dim reduce-scatter| all-gather      (sequence-parallel output)

"First dim" is Megatron's sequence dimension ([s, b, h] layout). Sizes must divide evenly by the group
size (Megatron's rule); a ValueError says which tensor does not.
"""

import torch
import torch.distributed as dist

# torch 2.13 renamed the *_tensor collectives to *_single and deprecated the old names; torch >= 2.4
# (setup.py's floor) has only the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _world(group) -> int:
    return dist.get_world_size(group)


def _all_reduce(tensor, group):
    tensor = tensor.contiguous() if not tensor.is_contiguous() else tensor.clone()
    dist.all_reduce(tensor, group=group)
    return tensor


def _gather(tensor, group, dim):
    world = _world(group)
    moved = tensor.movedim(dim, 0).contiguous()
    out = moved.new_empty((world * moved.shape[0], *moved.shape[1:]))
    _all_gather(out, moved, group=group)
    return out.movedim(0, dim)


def _own_slice(tensor, group, dim, *, name):
    world = _world(group)
    if tensor.shape[dim] % world:
        raise ValueError(f"{name} has size {tensor.shape[dim]} in dim {dim}, which does not divide over "
                         f"{world} tensor-parallel ranks")
    return tensor.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def _scatter_sum(tensor, group, dim, *, name):
    world = _world(group)
    if tensor.shape[dim] % world:
        raise ValueError(f"{name} has size {tensor.shape[dim]} in dim {dim}, which does not divide over "
                         f"{world} tensor-parallel ranks")
    moved = tensor.movedim(dim, 0).contiguous()
    out = moved.new_empty((moved.shape[0] // world, *moved.shape[1:]))
    _reduce_scatter(out, moved, group=group)
    return out.movedim(0, dim)


class _AllReduceInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _AllReduceInForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        return _all_reduce(tensor, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _gather(tensor, group, tensor.dim() - 1)

    @staticmethod
    def backward(ctx, grad):
        return _own_slice(grad, ctx.group, grad.dim() - 1, name="the output gradient"), None


class _SplitLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _own_slice(tensor, group, tensor.dim() - 1, name="the input")

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, grad.dim() - 1), None


class _GatherFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _gather(tensor, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_sum(grad, ctx.group, 0, name="the input gradient"), None


class _ReduceScatterFirstDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return _scatter_sum(tensor, group, 0, name="the output")

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, ctx.group, 0), None


def all_reduce_in_backward(tensor: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; the gradient is summed over `group` (Megatron's copy_to_tensor_model_parallel_region)."""
    return _AllReduceInBackward.apply(tensor, group)


def all_reduce_in_forward(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum over `group`; the gradient passes through (reduce_from_tensor_model_parallel_region)."""
    return _AllReduceInForward.apply(tensor, group)


def all_gather_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """(..., n) on each rank -> (..., world * n), rank order; the gradient keeps this rank's slice."""
    return _GatherLastDim.apply(tensor, group)


def split_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """(..., world * n) -> this rank's (..., n); the gradient is all-gathered."""
    return _SplitLastDim.apply(tensor, group)


def all_gather_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """(s, ...) on each rank -> (world * s, ...); the gradient is reduce-scattered."""
    return _GatherFirstDim.apply(tensor, group)


def reduce_scatter_first_dim(tensor: torch.Tensor, group) -> torch.Tensor:
    """(world * s, ...) partial sums -> this rank's (s, ...) of the total; the gradient is all-gathered."""
    return _ReduceScatterFirstDim.apply(tensor, group)
