"""The layers compared, each built on its own copy of one set of weights.

Every provider is an nn.Module mapping x (M, K) to y (M, N) in training mode. `base` is the frozen linear
alone: the floor a LoRA layer cannot beat. The others add the same adapter, scaling and dropout, and when the
weights carry a DoRA magnitude, the same magnitude (DoRA layers; `unsloth` has none and is unavailable).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..dora_layer import FusedDoRALinear
from ..layer import FusedLoRALinear
from ..reference import dora_linear as reference_dora_linear
from ..reference import dora_weight_norm as reference_dora_weight_norm
from ..reference import lora_linear as reference_lora_linear
from .addmm_lora import AddmmLoRALinear

#: In the order the table lists them.
PROVIDERS = ("base", "lorafuse", "reference", "peft", "unsloth")


class ProviderUnavailable(Exception):
    """The provider cannot run here (a missing package, an option it does not support); the reason says which."""


@dataclass
class Weights:
    """One layer's tensors: weight (N, K), bias (N,), lora_A (r, K), lora_B (N, r), and for DoRA layers the
    magnitude (N,) (None: LoRA layers)."""

    weight: torch.Tensor
    bias: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: Optional[torch.Tensor] = None

    @property
    def dora(self) -> bool:
        return self.magnitude is not None


@dataclass
class Provider:
    """A built provider. lora_A/lora_B are its adapter parameters (None for `base`), magnitude its DoRA
    magnitude (None unless it is a DoRA layer); merge folds the adapter into the weight where the provider
    supports it."""

    name: str
    module: nn.Module
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    merge: Optional[Callable[[], None]] = None
    magnitude: Optional[torch.Tensor] = None

    @property
    def has_adapter(self) -> bool:
        return self.lora_A is not None


def make_weights(*, in_features, out_features, rank, dtype, device, seed=0, dora=False, scaling=None) -> Weights:
    """nn.Linear's initialisation for weight, bias and lora_A, and a *non-zero* lora_B of the same scale.

    lora_B is zero in a fresh LoRA layer, which would make every adapter path look right; here it is
    uniform in +-1/sqrt(r), so the adapter term is as large as the base output and a wrong one shows.
    With `dora` the weights also get a magnitude: the row norms of W + scaling * B @ A times a factor in
    [0.5, 1.5] per row. A fresh DoRA layer's magnitude is those norms alone (g = 1, the layer equals its LoRA
    form), which would hide a provider that drops g or computes the norm at the wrong scaling.
    """
    if dora and scaling is None:
        raise ValueError("make_weights(dora=True) needs the adapter's scaling for the magnitude, got scaling=None")
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape, bound):
        # Drawn in fp32 on the CPU so every device and dtype starts from the same numbers.
        return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).to(device=device, dtype=dtype)

    bound_in = 1 / math.sqrt(in_features)
    weights = Weights(weight=uniform((out_features, in_features), bound_in), bias=uniform((out_features,), bound_in),
                      lora_A=uniform((rank, in_features), bound_in),
                      lora_B=uniform((out_features, rank), 1 / math.sqrt(rank)))
    if dora:
        # Drawn after the LoRA tensors, so a DoRA run holds the very weights of the LoRA run with its seed.
        factor = torch.rand((out_features,), generator=generator) + 0.5
        norm = reference_dora_weight_norm(weights.weight, weights.lora_A, weights.lora_B, scaling=scaling)
        weights.magnitude = (norm.cpu() * factor).to(device=device, dtype=dtype)
    return weights


def build_provider(name, weights: Weights, *, alpha, dropout) -> Provider:
    """Provider `name` on copies of `weights`, in training mode; raises ProviderUnavailable with the reason."""
    builders = {"base": _base, "lorafuse": _lorafuse, "reference": _reference, "peft": _peft, "unsloth": _unsloth}
    if name not in builders:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {name!r}")
    copies = Weights(**{field.name: None if getattr(weights, field.name) is None
                        else getattr(weights, field.name).detach().clone() for field in dataclasses.fields(Weights)})
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
    layer_class = FusedDoRALinear if w.dora else FusedLoRALinear
    layer = layer_class(in_features, out_features, r=rank, lora_alpha=alpha, lora_dropout=dropout,
                        device=w.weight.device, dtype=w.weight.dtype)
    with torch.no_grad():
        for param, value in ((layer.weight, w.weight), (layer.bias, w.bias), (layer.lora_A, w.lora_A),
                             (layer.lora_B, w.lora_B)):
            param.copy_(value)
        if w.dora:
            layer.lora_magnitude_vector.copy_(w.magnitude)
    return Provider("lorafuse", layer, layer.lora_A, layer.lora_B, merge=layer.merge,
                    magnitude=layer.lora_magnitude_vector if w.dora else None)


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

    def keep_mask(self, x):
        """A fresh keep-mask like x in training with dropout, else None (no dropout)."""
        return torch.rand_like(x) >= self.dropout if self.training and self.dropout > 0 else None

    def forward(self, x):
        return reference_lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, scaling=self.scaling,
                                     keep_mask=self.keep_mask(x), dropout_p=self.dropout)


class _ReferenceDoRA(_ReferenceLoRA):
    """The unfused DoRA oracle as a layer, with the same fresh keep-mask per training call."""

    def __init__(self, w, *, scaling, dropout):
        super().__init__(w, scaling=scaling, dropout=dropout)
        self.lora_magnitude_vector = nn.Parameter(w.magnitude)

    def forward(self, x):
        return reference_dora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_magnitude_vector,
                                     scaling=self.scaling, keep_mask=self.keep_mask(x), dropout_p=self.dropout)


def _reference(w, *, rank, alpha, dropout):
    if w.dora:
        layer = _ReferenceDoRA(w, scaling=alpha / rank, dropout=dropout)
        return Provider("reference", layer, layer.lora_A, layer.lora_B, magnitude=layer.lora_magnitude_vector)
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
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"], bias="none",
                             use_dora=w.dora)
    # PEFT's default upcasts fp16/bf16 adapters to fp32; off, so its adapter runs in the benchmark dtype like
    # every other provider's and all of them hold identical weights.
    model = peft.get_peft_model(_Holder(_base(w).module), config, autocast_adapter_dtype=False)
    layer = model.base_model.model.proj
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight if w.dora else None
    with torch.no_grad():
        lora_A.copy_(w.lora_A)
        lora_B.copy_(w.lora_B)
        if w.dora:
            magnitude.copy_(w.magnitude)
    return Provider("peft", layer, lora_A, lora_B, merge=layer.merge, magnitude=magnitude)


def _unsloth(w, *, rank, alpha, dropout):
    if w.dora:
        raise ProviderUnavailable("the two-GEMM addmm layer has no DoRA magnitude; it runs LoRA only")
    if dropout != 0:
        raise ProviderUnavailable(f"the two-GEMM addmm layer has no dropout; it runs with --dropout 0, got {dropout}")
    layer = AddmmLoRALinear(w.weight, w.bias, w.lora_A, w.lora_B, scaling=alpha / rank)
    return Provider("unsloth", layer, layer.lora_A, layer.lora_B)
