"""The fused LoRA linear on tensor-parallel shards: DTensor parameters in, plain local tensors to the kernel.

`ColwiseLoRAParallel` and `RowwiseLoRAParallel` make this the `lora_function` of the layers they shard, so
their forward comes here with DTensor parameters; it calls `lorafuse.lora_linear` on each rank's local
tensors (the core knows nothing of DTensor). Two layouts are understood (W is the (N, K) base weight):

Column-parallel: W, B and the bias are split on N, A is replicated, x arrives replicated.
    y_local = x @ W_local^T + b_local + s * (dropout(x) @ A^T) @ B_local^T        no forward collective
    Backward: dx and dA are partial sums over the ranks (each holds a slice of dy): both all-reduced
    (dx through DTensor's Partial -> Replicate, dA through `all_reduce_in_backward`, r*K elements).

Row-parallel: W and A are split on K, B and the bias are replicated, x arrives split on its last dim.
    Every term of y is linear in the K-sum, so each rank runs the fused kernel on its slice with no bias,
        y_r = x_r @ W_r^T + s * (dropout(x_r) @ A_r^T) @ B^T
    and sum_r y_r = x @ W^T + s * xa @ B^T with xa = sum_r xa_r: the same result as all-reducing the
    partial xa before B, in one all-reduce of y (the one the base layer needs anyway) instead of two.
    Backward: dy is whole on every rank, so dx_r and dA_r are this rank's slices; dB_r = s * dy^T @ xa_r is
    a partial sum, all-reduced (N*r elements).

Dropout: column-parallel ranks see the same x and draw the seed from their own generator, so they draw the
unsharded layer's mask when the generators agree (torch seeded alike on the tensor-parallel ranks, as
Megatron's model_parallel_cuda_manual_seed and torchtitan do). Otherwise each rank's output slice has its own
mask: still dropout at rate p, with exact gradients for that output, just not the unsharded layer's mask.
The seed is not broadcast: that would be a collective in every column-parallel training forward (and in
each checkpoint recompute) for a parity that ordinary seeding already gives.
Row-parallel ranks hold different columns of x; the mask counter restarts at each slice, so the seed is
offset by the rank to keep the slices' masks independent (not the unsharded layer's mask).

Uneven sizes: N (column) and K (row) need not divide over the ranks; DTensor splits them as torch.chunk
does (5 over 2: 3 + 2), and every DTensor made here from local pieces is given its global shape. A row
split that leaves a rank no input feature is refused (the kernel takes no empty K).
"""

from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from ..function import lora_linear, prepare_call
from ..messages import listing
from .collectives import all_reduce_in_backward

#: Placements (W, A, B, bias) per layout, each on a 1-D tensor-parallel mesh.
LAYOUTS = {
    "column": (Shard(0), Replicate(), Shard(0), Shard(0)),
    "row": (Shard(1), Shard(1), Replicate(), Replicate()),
}


def normalized(placement, ndim):
    """Shard(-1) as Shard(ndim - 1), so placements compare equal however they were written."""
    if isinstance(placement, Shard) and placement.dim < 0:
        return Shard(placement.dim + ndim)
    return placement


def shard_size(total: int, world: int, rank: int) -> int:
    """This rank's share when `total` is split over `world` ranks as DTensor's Shard splits it (torch.chunk:
    ceil(total / world) each, the last ranks short or empty; 5 over 2 -> 3, 2)."""
    chunk = -(-total // world)
    return max(0, min(chunk, total - rank * chunk))


def check_row_split(layer: str, in_features: int, world: int) -> None:
    """ValueError when splitting in_features over `world` ranks leaves a rank no input feature (1 over 2, or
    5 over 4: 2, 2, 1, 0): the fused kernel takes no empty K. An empty output slice (column-parallel) works."""
    empty = [rank for rank in range(world) if shard_size(in_features, world, rank) == 0]
    if empty:
        raise ValueError(f"row-parallel {layer} cannot split in_features={in_features} over {world} tensor-parallel "
                         f"ranks: DTensor gives {-(-in_features // world)} per rank and leaves rank(s) "
                         f"[{listing(empty)}] none; use fewer ranks or column-parallel for this layer")


def contiguous_strides(shape) -> tuple:
    """The strides of a contiguous tensor of `shape`: what `DTensor.from_local` needs beside `shape=`."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _placement(name, tensor):
    if not isinstance(tensor, DTensor):
        raise TypeError(f"{name} is a plain {type(tensor).__name__} while other LoRA parameters are DTensors; "
                        f"shard the layer with ColwiseLoRAParallel or RowwiseLoRAParallel so all of them are")
    if tensor.device_mesh.ndim != 1:
        raise ValueError(f"{name} is a DTensor on a {tensor.device_mesh.ndim}-D mesh; the fused layer shards over "
                         f"one tensor-parallel mesh dimension (FSDP2 gathers the data-parallel one before forward)")
    return tensor.placements[0]


def layout_of(weight, bias, lora_A, lora_B) -> str:
    """"column" or "row": which tensor-parallel layout the DTensor parameters have (ValueError otherwise)."""
    named = {"weight": weight, "lora_A": lora_A, "lora_B": lora_B}
    if bias is not None:
        named["bias"] = bias
    found = {name: _placement(name, tensor) for name, tensor in named.items()}
    mesh = weight.device_mesh
    for name, tensor in named.items():
        if tensor.device_mesh != mesh:
            raise ValueError(f"{name} lives on {tensor.device_mesh}, weight on {mesh}; they must share one mesh")
    for layout, expected in LAYOUTS.items():
        wanted = dict(zip(("weight", "lora_A", "lora_B", "bias"), expected))
        if all(found[name] == wanted[name] for name in found):
            return layout
    raise ValueError(f"LoRA parameters have placements {found}; expected column-parallel {LAYOUTS['column']} "
                     f"or row-parallel {LAYOUTS['row']} for (weight, lora_A, lora_B, bias)")


def _expect_input(x, placement, layout, in_features):
    if not isinstance(x, DTensor):
        raise TypeError(f"x is a plain tensor but the layer's parameters are {layout}-parallel DTensors; "
                        f"parallelize_module with ColwiseLoRAParallel/RowwiseLoRAParallel turns the input into a "
                        f"DTensor in a forward pre-hook")
    if tuple(normalized(p, x.dim()) for p in x.placements) != (placement,):
        raise ValueError(f"x has placements {tuple(x.placements)}; a {layout}-parallel LoRA layer needs "
                         f"({placement},)")
    if x.shape[-1] != in_features:
        # A feature-sharded DTensor made by from_local without shape= takes its global size as local * ranks,
        # which is wrong when in_features does not divide over the ranks.
        raise ValueError(f"x has global shape {tuple(x.shape)} but the {layout}-parallel layer has in_features="
                         f"{in_features}; build a feature-sharded input with DTensor.from_local(..., shape=...)")


def sharded_lora_linear(x, weight, bias, lora_A, lora_B, *, scaling, dropout_p=0.0, training=True, seed=None):
    """`lora_linear` (same arguments) over DTensors of a column- or row-parallel layer. Returns a DTensor:
    (..., N) with placement Shard(-1) (column), Partial (row, no bias) or Replicate (row, with bias)."""
    layout = layout_of(weight, bias, lora_A, lora_B)
    # lora_linear's own checks, autocast and seed, once for the whole layer: every rank then uses this seed.
    x, weight, bias, lora_A, lora_B, dropout_p, seed = prepare_call(x, weight, bias, lora_A, lora_B,
                                                                    dropout_p=dropout_p, training=training, seed=seed)
    scaling = float(scaling)
    mesh = weight.device_mesh
    group = mesh.get_group()
    last = x.dim() - 1
    # Global sizes of the DTensors: (r, K) and (N, r), however unevenly K or N split over the ranks.
    in_features, out_features = lora_A.shape[1], lora_B.shape[0]
    if layout == "column":
        _expect_input(x, Replicate(), layout, in_features)
        # Each rank holds a slice of dy, so its dx is a partial sum: Partial, reduced by DTensor upstream.
        x_local = x.to_local(grad_placements=[Partial()])
        lora_A_local = all_reduce_in_backward(lora_A.to_local(), group)
        y = lora_linear(x_local, weight.to_local(), None if bias is None else bias.to_local(), lora_A_local,
                        lora_B.to_local(), scaling=scaling, dropout_p=dropout_p, seed=seed)
        # The global shape is given, not inferred: from_local would take it as (..., N_local * ranks), which is
        # wrong when N does not divide (N=5 on 2 ranks holds 3 + 2 columns, not 2 * 3 or 2 * 2).
        shape = (*y.shape[:-1], out_features)
        return DTensor.from_local(y, mesh, [Shard(last)], run_check=False, shape=shape,
                                  stride=contiguous_strides(shape))

    _expect_input(x, Shard(last), layout, in_features)
    check_row_split(f"layer (in_features={in_features}, out_features={out_features})", in_features, mesh.size())
    if dropout_p > 0.0:
        seed = seed + mesh.get_local_rank()
    lora_B_local = all_reduce_in_backward(lora_B.to_local(), group)
    y = lora_linear(x.to_local(), weight.to_local(), None, lora_A.to_local(), lora_B_local, scaling=scaling,
                    dropout_p=dropout_p, seed=seed)
    y = DTensor.from_local(y, mesh, [Partial()], run_check=False)
    if bias is None:
        # Left Partial: the style's output hook reduces it to the layout the user asked for (all-reduce to
        # Replicate, reduce-scatter to Shard(1) for sequence parallelism).
        return y
    return y.redistribute(mesh, [Replicate()]) + bias
