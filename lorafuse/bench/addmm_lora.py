"""The strongest simple alternative: LoRA as two `addmm` GEMMs with a hand-written backward, in plain torch.

This is the design Unsloth's LoRA layers use (no dropout; the base output is computed and the adapter's
up-projection accumulated into it with `addmm`; backward recomputes xa instead of saving it), written here
from the math so the benchmark has a no-dropout baseline that needs no extra package.
"""

import torch
import torch.nn as nn


class _AddmmLoRAFunction(torch.autograd.Function):
    """y = x @ W^T + b + s * (x @ A^T) @ B^T on 2-D x; saves x only (W, A, B are parameters).

    Backward, given dy: dxa = s * dy @ B; dB = s * dy^T @ (x @ A^T); dA = dxa^T @ x; dx = dy @ W + dxa @ A.
    Recomputing x @ A^T costs 2*M*K*r FLOPs, about r/N of the base GEMM, and saves an (M, r) tensor.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
        y.addmm_(x @ lora_A.t(), lora_B.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        dxa = (dy @ lora_B).mul_(ctx.scaling)
        dA = dxa.t() @ x if ctx.needs_input_grad[3] else None
        dB = (dy.t() @ (x @ lora_A.t())).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        dx = torch.addmm(dy @ weight, dxa, lora_A) if ctx.needs_input_grad[0] else None
        return dx, None, None, dA, dB, None


class AddmmLoRALinear(nn.Module):
    """A frozen linear layer plus a LoRA adapter without dropout; x: (..., in_features) -> (..., out_features).

    weight: (out_features, in_features) and bias: (out_features,) or None, frozen; lora_A: (r, in_features)
    and lora_B: (out_features, r), trainable. The tensors are used as given (not copied).
    """

    def __init__(self, weight, bias, lora_A, lora_B, *, scaling):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)
        self.scaling = float(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _AddmmLoRAFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.lora_A, self.lora_B,
                                     self.scaling)
        return y.reshape(*x.shape[:-1], self.weight.shape[0])
