"""Tiny models for model-level tests: transformers Llama and GPT-2 built from configs (random weights, no
downloads), a Megatron-named module tree, and a fixed synthetic token task.

Sizes stay at hidden 32, two blocks, vocab 64: the kernels run through Triton's interpreter on CPU.
"""

import torch
import torch.nn as nn

VOCAB = 64
HIDDEN = 32


def tiny_llama(*, seed: int = 0, layers: int = 2, hidden: int = HIDDEN, vocab: int = VOCAB,
               initializer_range: float = 0.02):
    """A LlamaForCausalLM with `layers` blocks of width `hidden` (4 heads, 2 KV heads), random weights.

    With the default initializer_range the frozen head's logits stay within about +-0.6 (the final
    RMSNorm fixes the hidden state's size), so a model meant to learn needs about 0.2.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager",
                         initializer_range=initializer_range)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_llama_classifier(*, seed: int = 0, layers: int = 2, hidden: int = HIDDEN, vocab: int = VOCAB,
                          labels: int = 3):
    """A LlamaForSequenceClassification (head `score`, `labels` classes) as tiny_llama builds its body; pad id
    0 (the last token that is not 0 is classified)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=64, num_labels=labels, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


def tiny_phi3(*, seed: int = 0, layers: int = 2, hidden: int = HIDDEN, vocab: int = VOCAB):
    """A Phi3ForCausalLM (fused qkv_proj and gate_up_proj) with `layers` blocks of width `hidden`."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(seed)
    return Phi3ForCausalLM(config).eval()


def tiny_gpt2(*, seed: int = 0, layers: int = 2, hidden: int = HIDDEN, vocab: int = VOCAB):
    """A GPT2LMHeadModel (Conv1D layers) with `layers` blocks of width `hidden`, dropout off."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, vocab_size=vocab, n_positions=64,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


class MegatronBlock(nn.Module):
    """A transformer block with Megatron-core's layer names, built from nn.Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.self_attention = nn.Module()
        self.self_attention.linear_qkv = nn.Linear(hidden, 3 * hidden)
        self.self_attention.linear_proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Module()
        self.mlp.linear_fc1 = nn.Linear(hidden, 2 * hidden)
        self.mlp.linear_fc2 = nn.Linear(2 * hidden, hidden)

    def forward(self, x):
        q, k, v = self.self_attention.linear_qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.self_attention.linear_proj(weights @ v)
        return x + self.mlp.linear_fc2(torch.relu(self.mlp.linear_fc1(x)))


class TinyMegatron(nn.Module):
    """embedding → decoder.layers.N (MegatronBlock) → output_layer, as in Megatron's GPTModel."""

    def __init__(self, *, hidden: int = HIDDEN, vocab: int = VOCAB, layers: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, hidden)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(MegatronBlock(hidden) for _ in range(layers))
        self.output_layer = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens):
        x = self.embedding(tokens)
        for block in self.decoder.layers:
            x = block(x)
        return self.output_layer(x)


def tiny_megatron(*, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    return TinyMegatron(layers=layers).eval()


def token_batch(*, batch: int = 2, seq: int = 8, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """(batch, seq) random token ids from a fixed generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def counting_task(*, batch: int = 4, seq: int = 8, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """(batch, seq) sequences that count up by one mod vocab from random starts: each next token is fully
    determined by the current one, so a causal LM can drive its loss near zero."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (starts + torch.arange(seq)) % vocab


@torch.no_grad()
def randomize_adapters(model: nn.Module, *, seed: int = 1, std: float = 0.1) -> None:
    """Give every FusedLoRALinear a non-zero lora_B (a new adapter is the identity: B starts at zero)."""
    from lorafuse.targeting import lora_layers

    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        noise = torch.randn(layer.lora_B.shape, generator=generator) * std  # on CPU: same values on any device
        layer.lora_B.copy_(noise)


def logits(output) -> torch.Tensor:
    """The logits of a transformers output or a plain tensor."""
    return output.logits if hasattr(output, "logits") else output
