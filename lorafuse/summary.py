"""Parameter counts and the table `LoRAModel.summary()` prints: what was adapted and what trains."""

import dataclasses
from typing import Tuple

import torch.nn as nn

from .dora_layer import FusedDoRALinear
from .targeting import lora_layers


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Trainable and total parameter counts; shared (tied) parameters count once."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable (requires_grad) and total element counts of `model`'s parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = list(model.parameters())  # deduplicated: a tied weight counts once
    return ParameterCount(trainable=sum(p.numel() for p in params if p.requires_grad),
                          total=sum(p.numel() for p in params))


@dataclasses.dataclass(frozen=True)
class AdaptedModule:
    """One FusedLoRALinear: its path, the layer it replaced, its shape and adapter size r * (in + out), plus out
    for the magnitude of a DoRA layer."""

    name: str
    kind: str
    in_features: int
    out_features: int
    r: int
    lora_alpha: float
    scaling: float
    parameters: int
    use_dora: bool = False


@dataclasses.dataclass(frozen=True)
class LoRASummary:
    """The adapted modules and the model's totals. str() gives the table."""

    modules: Tuple[AdaptedModule, ...]
    adapter_parameters: int
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        header = ("module", "layer", "in", "out", "r", "alpha", "scaling", "params")
        rows = [(m.name, m.kind + (" DoRA" if m.use_dora else ""), str(m.in_features), str(m.out_features), str(m.r),
                 f"{m.lora_alpha:g}", f"{m.scaling:g}", f"{m.parameters:,}") for m in self.modules]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(row):
            # Names left-aligned, numbers right-aligned.
            return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

        rule = "-" * len(line(header))
        totals = [f"adapted modules: {len(self.modules)}   adapter parameters: {self.adapter_parameters:,}",
                  f"trainable: {self.trainable:,} / total: {self.total:,} ({self.percent:.4f}%)"]
        return "\n".join([line(header), rule, *map(line, rows), rule, *totals])


def summarize(model: nn.Module) -> LoRASummary:
    """The LoRASummary of a model holding FusedLoRALinear layers."""
    modules = tuple(
        AdaptedModule(name=name, kind="Conv1D" if layer.fan_in_fan_out else "Linear",
                      in_features=layer.in_features, out_features=layer.out_features, r=layer.r,
                      lora_alpha=layer.lora_alpha, scaling=layer.scaling,
                      parameters=sum(p.numel() for p in layer.adapter_parameters()),
                      use_dora=isinstance(layer, FusedDoRALinear))
        for name, layer in lora_layers(model))
    counts = count_parameters(model)
    return LoRASummary(modules=modules, adapter_parameters=sum(m.parameters for m in modules),
                       trainable=counts.trainable, total=counts.total)
