"""`FusedLoRALinear`: a drop-in `nn.Linear` with a LoRA adapter computed by the fused kernels."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_dropout, check_positive_number, check_rank, resolve_adapter_dtype
from .function import lora_linear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class FusedLoRALinear(nn.Module):
    """y = x @ W^T + b + scaling * (dropout(x) @ A^T) @ B^T, with W and b frozen.

    x: (..., in_features) -> (..., out_features). Parameters: `weight` (out_features, in_features) and
    `bias` (out_features,) as in nn.Linear, frozen by default; `lora_A` (r, in_features), Kaiming-uniform;
    `lora_B` (out_features, r), zeros, so a new layer equals its base. adapter_dtype: lora_A and lora_B's
    dtype; "auto" (the default, PEFT's) is float32 on a float16/bfloat16 base and the base's dtype otherwise,
    "base" always the base's; the kernels read x and W in their own dtype either way.

    fan_in_fan_out=True stores `weight` as (in_features, out_features), the layout of GPT-2's Conv1D;
    the kernels read it transposed through its strides, without a copy.

    `lora_function` is the functional form the forward calls, `lorafuse.lora_linear`; the tensor-parallel
    styles of lorafuse.distributed give their layers `sharded_lora_linear` (same signature) instead.
    """

    lora_function = staticmethod(lora_linear)

    def __init__(self, in_features, out_features, bias=True, *, r=8, lora_alpha=16.0, lora_dropout=0.0,
                 use_rslora=False, fan_in_fan_out=False, adapter_dtype="auto", device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        weight = nn.Parameter(torch.empty(shape, **factory), requires_grad=False)
        bias_param = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self._init_base(in_features, out_features, weight, bias_param, fan_in_fan_out)
        # The base first: DoRA's magnitude starts at the row norms of the initialised weight.
        self.reset_base_parameters()
        self._init_lora(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                        adapter_dtype=adapter_dtype)

    def _init_base(self, in_features, out_features, weight, bias, fan_in_fan_out):
        self.in_features = in_features
        self.out_features = out_features
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = weight
        self.register_parameter("bias", bias)

    def _init_lora(self, *, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype="auto"):
        check_rank(r)
        check_positive_number("lora_alpha", lora_alpha)
        check_dropout(lora_dropout)
        self.r = r
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.merged = False
        #: False runs the base layer alone (LoRAModel.disable_adapter).
        self.adapter_enabled = True
        factory = {"device": self.weight.device, "dtype": resolve_adapter_dtype(adapter_dtype, self.weight.dtype)}
        self.lora_A = nn.Parameter(torch.empty((r, self.in_features), **factory))
        self.lora_B = nn.Parameter(torch.empty((self.out_features, r), **factory))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r=8, lora_alpha=16.0, lora_dropout=0.0, use_rslora=False,
                    adapter_dtype="auto"):
        """Wrap `linear`, sharing (not copying) its weight and bias, which are frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls._wrap(linear.weight, linear.bias, linear.in_features, linear.out_features, fan_in_fan_out=False,
                         r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         adapter_dtype=adapter_dtype)

    @classmethod
    def from_conv1d(cls, conv1d: nn.Module, *, r=8, lora_alpha=16.0, lora_dropout=0.0, use_rslora=False,
                    adapter_dtype="auto"):
        """Wrap a GPT-2 style `Conv1D` (weight (in, out), bias (out,)), sharing its parameters."""
        weight = getattr(conv1d, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not hasattr(conv1d, "nf"):
            raise TypeError(f"conv1d must be a transformers Conv1D (weight (in, out), attribute nf), "
                            f"got {type(conv1d).__name__}")
        in_features, out_features = weight.shape
        return cls._wrap(weight, conv1d.bias, in_features, out_features, fan_in_fan_out=True,
                         r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora,
                         adapter_dtype=adapter_dtype)

    @classmethod
    def _wrap(cls, weight, bias, in_features, out_features, *, fan_in_fan_out, **lora):
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        layer._init_base(in_features, out_features, weight, bias, fan_in_fan_out)
        layer._init_lora(**lora)
        return layer

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    def reset_base_parameters(self) -> None:
        """nn.Linear's initialisation of weight and bias."""
        weight = self.base_weight()
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """A as nn.Linear initialises its weight (Kaiming-uniform), B zeros: the adapter starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def base_weight(self) -> torch.Tensor:
        """The base weight as (out_features, in_features): a transposed view for fan_in_fan_out."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, (out_features, in_features), computed in fp32 and cast to the weight's dtype."""
        return self._delta_weight_in(torch.float32).to(self.weight.dtype)

    def _delta_weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype)) * self.scaling

    @torch.no_grad()
    def merge(self) -> "FusedLoRALinear":
        """Fold scaling * B @ A into the weight. A merged layer runs as a plain linear."""
        if not self.merged:
            self.base_weight().add_(self.delta_weight())
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> "FusedLoRALinear":
        """Take scaling * B @ A out of the weight again (exact up to the weight dtype's rounding)."""
        if self.merged:
            self.base_weight().sub_(self.delta_weight())
            self.merged = False
        return self

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new (out_features, in_features) tensor: the weight of a plain linear that computes this layer."""
        weight = self.base_weight().clone()
        if not self.merged:
            weight += self.delta_weight()
        return weight

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new nn.Linear holding the merged weight (out_features, in_features) and a copy of the bias."""
        weight = self.merged_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def adapter_parameters(self) -> list:
        """The trained parameters of the adapter."""
        return [self.lora_A, self.lora_B]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged and not self.adapter_enabled:
            raise RuntimeError(f"{type(self).__name__} is merged, so its weight already holds the adapter and it "
                               "cannot run the base alone: call unmerge() before disabling the adapter")
        if self.merged:
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter_parameters()):
                raise RuntimeError(f"{type(self).__name__} is merged, so its adapter gets no gradient: call "
                                   "unmerge() before training, or eval() / torch.no_grad() for inference")
            return F.linear(x, self.base_weight(), self.bias)
        if not self.adapter_enabled:
            return F.linear(x, self.base_weight(), self.bias)
        return self._adapted_forward(x)

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_function(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, scaling=self.scaling,
                                  dropout_p=self.lora_dropout, training=self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout:g}, "
                f"use_rslora={self.use_rslora}, adapter_dtype={self.lora_A.dtype}, merged={self.merged}")
