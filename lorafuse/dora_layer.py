"""`FusedDoRALinear`: weight-decomposed LoRA (DoRA, Liu et al., 2024) on the fused kernels."""

import torch
import torch.nn as nn

from .function import dora_linear
from .layer import FusedLoRALinear


class FusedDoRALinear(FusedLoRALinear):
    """y = g * (x @ W^T + scaling * (dropout(x) @ A^T) @ B^T) + b, g = lora_magnitude_vector / ||W + s B A||.

    A FusedLoRALinear (same arguments, same lora_A / lora_B) with one more trained parameter,
    `lora_magnitude_vector` (out_features,), in the adapters' dtype, that starts at the row norms of W (B is
    zero at first, so a new layer equals its base). The norms ||W + s B A|| are recomputed every forward in
    fp32 without forming B @ A, and are a constant to the backward, as in PEFT's `use_dora=True`. Dropout
    touches the low-rank path only; in training with dropout > 0 PEFT also rescales W @ dropout(x), so there
    the two differ (`lorafuse.reference.dora_linear`); without dropout and in eval they agree.
    """

    def _init_lora(self, **lora):
        super()._init_lora(**lora)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, dtype=self.lora_A.dtype,
                                                              device=self.weight.device))
        self.reset_magnitude()

    def reset_base_parameters(self) -> None:
        super().reset_base_parameters()
        if hasattr(self, "lora_magnitude_vector"):
            self.reset_magnitude()

    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        if hasattr(self, "lora_magnitude_vector"):
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """Set the magnitude to ||W + s B A|| per row, so that g = 1 and the layer equals its LoRA form."""
        self.lora_magnitude_vector.copy_(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output row, (out_features,), in fp32 (fp64 for an fp64 weight), from the unmerged
        weight (a merged layer gives back the norms it merged with)."""
        if self.merged:
            return self._merged_weight_norm
        return torch.ops.lorafuse.dora_weight_norm(self.base_weight(), self.lora_A.detach(), self.lora_B.detach(),
                                                   scaling=float(self.scaling))

    def _column_scale(self, norm: torch.Tensor) -> torch.Tensor:
        return self.lora_magnitude_vector.detach().to(norm.dtype) / norm

    @torch.no_grad()
    def merge(self) -> "FusedDoRALinear":
        """W <- g * (W + s B A), row by row in fp32. The norms are kept, for unmerge()."""
        if not self.merged:
            norm = self.weight_norm()
            weight = self.base_weight()
            merged = weight.to(norm.dtype) + self._delta_weight_in(norm.dtype)
            weight.copy_(merged * self._column_scale(norm)[:, None])
            self._merged_weight_norm = norm
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> "FusedDoRALinear":
        """W <- W / g - s B A with the norms of the merge (exact up to the weight dtype's rounding)."""
        if self.merged:
            norm = self._merged_weight_norm
            weight = self.base_weight()
            unscaled = weight.to(norm.dtype) / self._column_scale(norm)[:, None]
            weight.copy_(unscaled - self._delta_weight_in(norm.dtype))
            del self._merged_weight_norm
            self.merged = False
        return self

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        if self.merged:
            return self.base_weight().clone()
        norm = self.weight_norm()
        weight = self.base_weight().to(norm.dtype) + self._delta_weight_in(norm.dtype)
        return (weight * self._column_scale(norm)[:, None]).to(self.weight.dtype)

    def adapter_parameters(self) -> list:
        return [self.lora_A, self.lora_B, self.lora_magnitude_vector]

    def _adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return dora_linear(x, self.base_weight(), self.bias, self.lora_A, self.lora_B, self.lora_magnitude_vector,
                           scaling=self.scaling, dropout_p=self.lora_dropout, training=self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", use_dora=True"
