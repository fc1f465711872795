"""A tiny Llama-style model for the distributed, compile and checkpointing tests, and its LoRA adaptation.

Written out here (RMSNorm, causal attention with q/k/v/o projections, SwiGLU MLP) so the tests need
no transformers model and can shard it with a tensor-parallel plan. Attention takes its head count from
the projection's output, so a column-parallel q/k/v (each rank its own heads) runs unchanged.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorafuse import LoRAConfig, apply_lora
from lorafuse.targeting import lora_layers

HIDDEN, HEADS, INTERMEDIATE, VOCAB = 32, 4, 48, 64
HEAD_DIM = HIDDEN // HEADS
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x):
        batch, seq, _ = x.shape

        def heads(t):
            # -1 heads: a tensor-parallel rank holds HEADS / tp of them.
            return t.view(batch, seq, -1, HEAD_DIM).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLPBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_norm = RMSNorm(HIDDEN)
        self.self_attn = Attention()
        self.post_norm = RMSNorm(HIDDEN)
        self.mlp = MLPBlock()

    def forward(self, x):
        x = x + self.self_attn(self.input_norm(x))
        return x + self.mlp(self.post_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.norm = RMSNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def loss_fn(model, tokens):
    """Next-token cross entropy, averaged over the tokens, in fp32 at least (fp64 models keep fp64)."""
    logits = model(tokens[:, :-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def lora_config(*, targets=ATTENTION + MLP, r=4, lora_alpha=8.0, lora_dropout=0.0):
    return LoRAConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(targets))


def adapt(model, *, seed=7, **options):
    """`apply_lora` with `lora_config(**options)`, then random A and B (B starts at zero) from `seed`, so the
    adapter changes outputs and A gets gradients."""
    apply_lora(model, lora_config(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) / layer.in_features ** 0.5)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) / layer.r ** 0.5)
    return model


def build(*, layers=2, base_seed=0, dtype=torch.float32, **lora):
    """A TinyLlama with base weights from `base_seed`, adapted with `lora` options (see `adapt`), in `dtype`
    (the fp32 values, converted exactly to fp64)."""
    torch.manual_seed(base_seed)
    return adapt(TinyLlama(layers), **lora).to(dtype)


def tokens(batch, seq, *, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def block_tp_plan(colwise, rowwise):
    """A Llama block's tensor-parallel plan: q/k/v/gate/up column-parallel, o/down row-parallel."""
    plan = {f"self_attn.{name}": colwise() for name in ("q_proj", "k_proj", "v_proj")}
    plan.update({f"mlp.{name}": colwise() for name in ("gate_proj", "up_proj")})
    plan.update({"self_attn.o_proj": rowwise(), "mlp.down_proj": rowwise()})
    return plan


def lora_grads(model):
    """name -> gradient of every lora_A / lora_B (DTensor gradients gathered whole)."""
    grads = {}
    for name, param in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            grad = param.grad
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad.clone()
    return grads


def train(model, batches, *, lr=0.5, reduce=None):
    """SGD steps on the trainable parameters, one per batch; returns the losses (each passed through
    `reduce` first, e.g. an average over data-parallel ranks)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for batch in batches:
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((reduce(loss.detach()) if reduce else loss.detach()).item())
    return losses


def adapter_of(model):
    """name -> lora_A / lora_B values of a plain (unsharded) model."""
    return {name: param.detach().clone() for name, param in model.named_parameters()
            if name.endswith(("lora_A", "lora_B"))}
