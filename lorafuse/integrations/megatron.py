"""LoRA for Megatron-Core models: the fused kernel on each tensor-parallel rank's shard of
`ColumnParallelLinear` / `RowParallelLinear` (linear_qkv, linear_proj, linear_fc1, linear_fc2).

    model = apply_lora_to_megatron_model(model, LoRAConfig(r=16, lora_alpha=32,
                                          target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]))

The wrapped layer keeps Megatron's interface: `forward(input_)` returns `(output, bias)`, honouring
gather_output, skip_bias_add, input_is_parallel and sequence_parallel. Its parameters:

    column-parallel: W (N/tp, K) and B (N/tp, r) sharded like Megatron's weight, A (r, K) replicated
    row-parallel:    W (N, K/tp) and A (r, K/tp) sharded on the input dim, B (N, r) replicated

with the same collectives as Megatron's own layers (see lorafuse/distributed/sharded.py for the math; the
row-parallel adapter's partial sums ride on the base layer's all-reduce). Megatron is imported only
for checkpoint metadata, so the wrapper also works with any layer that has these attributes.

Only the local (non-Transformer-Engine) layer specs are supported: TE's fused LayerNorm+linear layers
run their own GEMM and are refused with a TypeError.
"""

import inspect
import math
from typing import List, Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import ALL_LINEAR, LoRAConfig
from ..distributed.collectives import (
    all_gather_first_dim,
    all_gather_last_dim,
    all_reduce_in_backward,
    all_reduce_in_forward,
    reduce_scatter_first_dim,
    split_last_dim,
)
from ..function import draw_seed, lora_linear
from ..layer import lora_scaling
from ..targeting import layer_index, matches_names, pattern_value

#: Megatron-Core's names for the four linear layers of a transformer block.
MEGATRON_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
#: Targets when the config names none: the attention layers, as `lorafuse.targeting.DEFAULT_TARGETS` has them.
DEFAULT_MEGATRON_TARGETS = ("linear_qkv", "linear_proj")

_COLUMN_ATTRIBUTES = ("weight", "bias", "gather_output", "skip_bias_add", "sequence_parallel",
                      "input_size", "output_size", "output_size_per_partition")
_ROW_ATTRIBUTES = ("weight", "bias", "input_is_parallel", "skip_bias_add", "sequence_parallel",
                   "input_size", "output_size", "input_size_per_partition")


def parallel_mode(module: nn.Module) -> Optional[str]:
    """"column" for a Megatron ColumnParallelLinear, "row" for a RowParallelLinear, else None (by the
    attributes the wrapper reads, so Megatron forks and stand-ins with the same interface qualify)."""
    if all(hasattr(module, name) for name in _COLUMN_ATTRIBUTES):
        return "column"
    if all(hasattr(module, name) for name in _ROW_ATTRIBUTES):
        return "row"
    return None


def _tp_group(base: nn.Module):
    group = getattr(base, "tp_group", None)
    if group is None and dist.is_available() and dist.is_initialized():
        # Megatron-Core before tp_group was a layer attribute (< 0.13).
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


def _mark_tensor_parallel(param, *, partition_dim: Optional[int]):
    # The attributes Megatron's grad-norm clipping and checkpoint code read (tensor_parallel.layers):
    # a replicated parameter counts once, a sharded one on every rank.
    param.tensor_model_parallel = partition_dim is not None
    param.partition_dim = -1 if partition_dim is None else partition_dim
    param.partition_stride = 1


class MegatronLoRALinear(nn.Module):
    """A Megatron tensor-parallel linear (`base_layer`, frozen) plus a LoRA adapter, fused per rank.

    forward(input_) -> (output, bias), like the wrapped layer. Input and output follow Megatron's
    [sequence, batch, hidden] layout; with sequence_parallel the sequence dim is sharded across ranks.
    """

    def __init__(self, base_layer: nn.Module, *, r: int = 8, lora_alpha: float = 16.0, lora_dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        mode = parallel_mode(base_layer)
        if mode is None:
            raise TypeError(f"base_layer must be a Megatron ColumnParallelLinear or RowParallelLinear (local spec), "
                            f"got {type(base_layer).__name__}; Transformer Engine layers run their own GEMM and "
                            f"cannot take a fused adapter")
        if getattr(base_layer, "is_expert", False):
            raise TypeError("expert (MoE) parallel linears are not supported: their communication is explicit")
        if base_layer.weight is None:
            raise ValueError("base_layer has no weight (skip_weight_param_allocation=True); the adapter needs it")
        # A bare LoRAConfig check: the same rules as FusedLoRALinear.
        config = LoRAConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora)
        self.base_layer = base_layer
        self.parallel_mode = mode
        self.r, self.lora_alpha, self.lora_dropout = config.r, config.lora_alpha, config.lora_dropout
        self.use_rslora = config.use_rslora
        self.tp_group = _tp_group(base_layer)
        self.tp_size = dist.get_world_size(self.tp_group) if self.tp_group is not None else 1
        for param in base_layer.parameters():
            param.requires_grad_(False)

        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        lora_A = self._initial_A(base_layer.input_size, factory)
        if mode == "column":
            self.lora_A = nn.Parameter(lora_A)
            self.lora_B = nn.Parameter(torch.zeros((base_layer.output_size_per_partition, r), **factory))
            _mark_tensor_parallel(self.lora_A, partition_dim=None)
            _mark_tensor_parallel(self.lora_B, partition_dim=0)
        else:
            rank = dist.get_rank(self.tp_group) if self.tp_group is not None else 0
            self.lora_A = nn.Parameter(lora_A.chunk(self.tp_size, dim=1)[rank].contiguous())
            self.lora_B = nn.Parameter(torch.zeros((base_layer.output_size, r), **factory))
            _mark_tensor_parallel(self.lora_A, partition_dim=1)
            _mark_tensor_parallel(self.lora_B, partition_dim=None)

    def _initial_A(self, in_features, factory):
        """A as nn.Linear initialises a weight (bound 1/sqrt(in_features) over the whole input dim), drawn on
        tensor-parallel rank 0 and broadcast, so replicas agree and shards are slices of one matrix."""
        bound = 1.0 / math.sqrt(in_features)
        lora_A = torch.empty((self.r, in_features), **factory).uniform_(-bound, bound)
        if self.tp_size > 1:
            dist.broadcast(lora_A, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return lora_A

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        if weight is not None:
            raise ValueError("MegatronLoRALinear uses its base layer's weight; an explicit weight is not supported")
        if self.parallel_mode == "column":
            return self._column_forward(input_, runtime_gather_output)
        if runtime_gather_output is not None:
            raise TypeError("runtime_gather_output applies to column-parallel layers only")
        return self._row_forward(input_)

    def _fused(self, x, bias, lora_A, lora_B, seed=None):
        return lora_linear(x, self.base_layer.weight, bias, lora_A, lora_B, scaling=self.scaling,
                           dropout_p=self.lora_dropout, training=self.training, seed=seed)

    def _column_forward(self, input_, runtime_gather_output):
        base, group = self.base_layer, self.tp_group
        x, lora_A = input_, self.lora_A
        if self.tp_size > 1:
            if base.sequence_parallel:
                x = all_gather_first_dim(x, group)
            elif not getattr(base, "disable_grad_reduce", False):
                x = all_reduce_in_backward(x, group)
            # Each rank's dA uses its slice of dy: a partial sum, like dx.
            lora_A = all_reduce_in_backward(lora_A, group)
        # The dropout seed comes from the default generator, which model_parallel_cuda_manual_seed seeds alike on
        # every tensor-parallel rank: the ranks draw one mask for the whole x, the unsharded layer's.
        y = self._fused(x, None if base.skip_bias_add else base.bias, lora_A, self.lora_B)
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and self.tp_size > 1:
            y = all_gather_last_dim(y, group)
        return y, (base.bias if base.skip_bias_add else None)

    def _row_forward(self, input_):
        base, group = self.base_layer, self.tp_group
        x, lora_B, seed = input_, self.lora_B, None
        if self.tp_size > 1:
            if not base.input_is_parallel:
                x = split_last_dim(x, group)
            lora_B = all_reduce_in_backward(lora_B, group)
            if self.training and self.lora_dropout > 0.0:
                # Each rank holds other input columns: its own mask stream (see distributed/sharded.py).
                seed = draw_seed(x.device) + dist.get_rank(group)
        # No bias here: y is a partial sum until the reduction below.
        y = self._fused(x, None, self.lora_A, lora_B, seed)
        if self.tp_size > 1:
            y = reduce_scatter_first_dim(y, group) if base.sequence_parallel else all_reduce_in_forward(y, group)
        if base.skip_bias_add or base.bias is None:
            return y, (base.bias if base.skip_bias_add else None)
        return y + base.bias, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Megatron distributed-checkpoint entries: the base layer's and the adapter's (with its tensor-parallel
        axis). Dict keys are this module's `state_dict()` keys ("<prefix>base_layer.weight"), since Megatron
        loads with `model.load_state_dict` under them; the base layer's on-disk keys (ShardedTensor.key) are
        the unwrapped layer's ("<prefix>weight"), so base checkpoints load into the adapted model and back."""
        from megatron.core.dist_checkpointing.utils import apply_prefix_mapping
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        entries = self.base_layer.sharded_state_dict(prefix=f"{prefix}base_layer.", sharded_offsets=sharded_offsets,
                                                     metadata=metadata)
        # Renames ShardedTensor/ShardedObject keys in place, as TransformerLayer does for its own key map;
        # the dict keys stay.
        apply_prefix_mapping(entries, {f"{prefix}base_layer.": prefix})
        axis = {"lora_B": 0} if self.parallel_mode == "column" else {"lora_A": 1}
        options = {}
        accepted = inspect.signature(make_sharded_tensors_for_checkpoint).parameters
        if "tp_group" in accepted:
            options["tp_group"] = self.tp_group
        if "dp_cp_group" in accepted and metadata is not None and "dp_cp_group" in metadata:
            options["dp_cp_group"] = metadata["dp_cp_group"]
        adapter = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        entries.update(make_sharded_tensors_for_checkpoint(adapter, prefix, axis, sharded_offsets, **options))
        return entries

    def extra_repr(self) -> str:
        return (f"{self.parallel_mode}-parallel, r={self.r}, lora_alpha={self.lora_alpha:g}, "
                f"lora_dropout={self.lora_dropout:g}, use_rslora={self.use_rslora}, tp={self.tp_size}")


def _targets(config: LoRAConfig):
    if config.target_modules is None:
        return DEFAULT_MEGATRON_TARGETS
    return MEGATRON_LINEARS if config.target_modules == ALL_LINEAR else config.target_modules


def _wrap_chunk(chunk: nn.Module, config: LoRAConfig) -> List[str]:
    targets = _targets(config)
    wrapped = []
    for path, module in list(chunk.named_modules()):
        if not path or not matches_names(targets, path, source=config.source):
            continue
        if config.exclude_modules is not None and matches_names(config.exclude_modules, path, field="exclude_modules",
                                                                source=config.source):
            continue
        if config.layers_to_transform is not None and layer_index(path, config.layers_pattern) not in \
                config.layers_to_transform:
            continue
        if isinstance(module, MegatronLoRALinear):
            raise ValueError(f"{path!r} already has a LoRA adapter: apply_lora_to_megatron_model runs once")
        if parallel_mode(module) is None:
            raise TypeError(f"target {path!r} is a {type(module).__name__}, not a Megatron Column/RowParallelLinear "
                            f"(Transformer Engine specs are not supported: build the model with the local spec)")
        layer = MegatronLoRALinear(module, r=pattern_value(config.rank_pattern, path, config.r, source=config.source),
                                   lora_alpha=pattern_value(config.alpha_pattern, path, config.lora_alpha,
                                                            field="alpha_pattern", source=config.source),
                                   lora_dropout=config.lora_dropout, use_rslora=config.use_rslora)
        parent, _, name = path.rpartition(".")
        setattr(chunk.get_submodule(parent) if parent else chunk, name, layer)
        wrapped.append(path)
    return wrapped


def apply_lora_to_megatron_model(model: Union[nn.Module, List[nn.Module]], config: LoRAConfig):
    """Wrap the Megatron parallel linears `config` targets in `MegatronLoRALinear`, in place, and freeze
    every other parameter. `model` is a module or Megatron's list of model chunks (virtual pipeline
    stages); it is returned. Call it on every rank, after the base checkpoint is loaded and before the
    optimizer is built (Megatron's DistributedDataParallel wrapper included).

    config: a LoRAConfig. target_modules None means linear_qkv and linear_proj; "all-linear" the four
    block linears; names and regexes match paths as in `apply_lora`. bias and modules_to_save are not
    supported here (ValueError): only the adapter trains. Nor is use_dora (ValueError).
    """
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a lorafuse LoRAConfig, got {type(config).__name__}")
    if config.bias != "none" or config.modules_to_save:
        raise ValueError(f"apply_lora_to_megatron_model trains the adapter only: bias must be 'none' and "
                         f"modules_to_save None, got bias={config.bias!r}, modules_to_save={config.modules_to_save}")
    if config.use_dora:
        # PEFT refuses DoRA on Megatron too: W is split over tensor-parallel ranks, and DoRA's row norms of
        # W + s B A would need an all-reduce that these layers do not do.
        raise ValueError("apply_lora_to_megatron_model does not implement DoRA (use_dora=True): Megatron's parallel "
                         "linears split the weight, and DoRA's row norms would need an all-reduce across ranks")
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks or not all(isinstance(chunk, nn.Module) for chunk in chunks):
        raise TypeError(f"model must be an nn.Module or a non-empty list of them, got {type(model).__name__}")
    wrapped = []
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
        wrapped += _wrap_chunk(chunk, config)
    if not wrapped:
        raise ValueError(f"target_modules={config.target_modules!r} matched no Megatron parallel linear "
                         f"(expected names such as {', '.join(MEGATRON_LINEARS)})")
    return model
