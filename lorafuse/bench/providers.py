"""The layers compared, each built on its own copy of one set of weights.

Every provider is an nn.Module mapping x (M, K) to y (M, N) in training mode. `base` is the frozen linear
alone: the floor a LoRA layer cannot beat. The others add the same adapter, scaling and dropout.
"""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..layer import FusedLoRALinear
from ..reference import lora_linear as reference_lora_linear
from .addmm_lora import AddmmLoRALinear

#: In the order the table lists them.
PROVIDERS = ("base", "lorafuse", "reference", "peft", "unsloth")


class ProviderUnavailable(Exception):
    """The provider cannot run here (a missing package, an option it does not support); the reason says which."""


@dataclass
class Weights:
    """One layer's tensors: weight (N, K), bias (N,), lora_A (r, K), lora_B (N, r)."""

    weight: torch.Tensor
    bias: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor


@dataclass
class Provider:
    """A built provider. lora_A/lora_B are its adapter parameters (None for `base`); merge folds the
    adapter into the weight where the provider supports it."""

    name: str
    module: nn.Module
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    merge: Optional[Callable[[], None]] = None

    @property
    def has_adapter(self) -> bool:
        return self.lora_A is not None


def make_weights(*, in_features, out_features, rank, dtype, device, seed=0) -> Weights:
    """nn.Linear's initialisation for weight, bias and lora_A, and a *non-zero* lora_B of the same scale.

    lora_B is zero in a fresh LoRA layer, which would make every adapter path look right; here it is
    uniform in +-1/sqrt(r), so the adapter term is as large as the base output and a wrong one shows.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, bound):
        # Drawn in fp32 on the CPU so every device and dtype starts from the same numbers.
        return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).to(device=device, dtype=dtype)

    bound_in = 1 / math.sqrt(in_features)
    return Weights(weight=uniform((out_features, in_features), bound_in), bias=uniform((out_features,), bound_in),
                   lora_A=uniform((rank, in_features), bound_in),
                   lora_B=uniform((out_features, rank), 1 / math.sqrt(rank)))


def build_provider(name, weights: Weights, *, alpha, dropout) -> Provider:
    """Provider `name` on copies of `weights`, in training mode; raises ProviderUnavailable with the reason."""
    builders = {"base": _base, "lorafuse": _lorafuse, "reference": _reference, "peft": _peft, "unsloth": _unsloth}
    if name not in builders:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {name!r}")
    copies = Weights(*(t.detach().clone() for t in (weights.weight, weights.bias, weights.lora_A, weights.lora_B)))
    rank = copies.lora_A.shape[0]
    provider = builders[name](copies, rank=rank, alpha=alpha, dropout=dropout)
    provider.module.train()
    return provider


def _base(w, **_):
    out_features, in_features = w.weight.shape
    linear = nn.Linear(in_features, out_features, device=w.weight.device, dtype=w.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.weight)
        linear.bias.copy_(w.bias)
    linear.requires_grad_(False)
    return Provider("base", linear)


def _lorafuse(w, *, rank, alpha, dropout):
    out_features, in_features = w.weight.shape
    layer = FusedLoRALinear(in_features, out_features, r=rank, lora_alpha=alpha, lora_dropout=dropout,
                            device=w.weight.device, dtype=w.weight.dtype)
    with torch.no_grad():
        for param, value in ((layer.weight, w.weight), (layer.bias, w.bias), (layer.lora_A, w.lora_A),
                             (layer.lora_B, w.lora_B)):
            param.copy_(value)
    return Provider("lorafuse", layer, layer.lora_A, layer.lora_B, merge=layer.merge)


class _ReferenceLoRA(nn.Module):
    """The unfused oracle as a layer. Like nn.Dropout it draws a fresh keep-mask on every training call."""

    def __init__(self, w, *, scaling, dropout):
        super().__init__()
        self.weight = nn.Parameter(w.weight, requires_grad=False)
        self.bias = nn.Parameter(w.bias, requires_grad=False)
        self.lora_A = nn.Parameter(w.lora_A)
        self.lora_B = nn.Parameter(w.lora_B)
        self.scaling = scaling
        self.dropout = dropout

    def forward(self, x):
        keep = None
        if self.training and self.dropout > 0:
            keep = torch.rand_like(x) >= self.dropout
        return reference_lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, scaling=self.scaling,
                                     keep_mask=keep, dropout_p=self.dropout)


def _reference(w, *, rank, alpha, dropout):
    layer = _ReferenceLoRA(w, scaling=alpha / rank, dropout=dropout)
    return Provider("reference", layer, layer.lora_A, layer.lora_B)


class _Holder(nn.Module):
    """PEFT adapts modules by name inside a model; this is the smallest model holding one linear."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear


def _peft(w, *, rank, alpha, dropout):
    try:
        import peft
    except ImportError:
        raise ProviderUnavailable("peft is not installed (pip install peft)") from None
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], bias="none")
    # PEFT's default upcasts fp16/bf16 adapters to fp32; off, so its adapter runs in the benchmark dtype like
    # every other provider's and all of them hold identical weights.
    model = peft.get_peft_model(_Holder(_base(w).module), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        lora_A.copy_(w.lora_A)
        lora_B.copy_(w.lora_B)
    return Provider("peft", layer, lora_A, lora_B, merge=layer.merge)


def _unsloth(w, *, rank, alpha, dropout):
    if dropout != 0:
        raise ProviderUnavailable(f"the two-GEMM addmm layer has no dropout; it runs with --dropout 0, got {dropout}")
    layer = AddmmLoRALinear(w.weight, w.bias, w.lora_A, w.lora_B, scaling=alpha / rank)
    return Provider("unsloth", layer, layer.lora_A, layer.lora_B)
