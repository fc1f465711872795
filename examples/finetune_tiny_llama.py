"""Fine-tune a tiny Llama-style transformers model with lorafuse, end to end on CPU in seconds.

The model is built from a small LlamaConfig with random weights (nothing is downloaded) and learns a
synthetic task: token sequences that count up by one (mod the vocabulary), so every next token is
determined by the current one. Only the adapters train. The script prints the adapter summary, shows a
progress bar, checks that the merged model gives the adapted model's logits, and saves the adapter in
PEFT's layout (adapter_config.json + adapter_model.safetensors).

    python examples/finetune_tiny_llama.py                  # LoRA r=8, adapter saved under the temp dir
    python examples/finetune_tiny_llama.py --lora-r 4 --lora-save-path /tmp/tiny-llama-lora
    python examples/finetune_tiny_llama.py --lora-load-path /tmp/tiny-llama-lora --steps 0

With --full-finetune the whole model trains instead, for comparison. On CPU lorafuse runs its PyTorch path
(TRITON_INTERPRET=1 runs the Triton kernels through the interpreter instead, far slower); with
--device cuda it runs the fused kernels.
"""

import argparse
import math
import os
import tempfile

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lorafuse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default: 100)")
    parser.add_argument("--lr", type=float, default=2e-2, help="AdamW learning rate (default: 0.02)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64, help="model width (default: 64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default: 2)")
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    lorafuse.add_lora_arguments(parser)
    # This example is about LoRA: on unless --full-finetune, and the adapter is always saved somewhere.
    parser.add_argument("--full-finetune", dest="use_lora", action="store_false",
                        help="train every parameter instead of LoRA adapters, for comparison")
    parser.set_defaults(use_lora=True,
                        lora_save_path=os.path.join(tempfile.gettempdir(), "lorafuse-tiny-llama-adapter"))
    return parser


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range 0.2, not 0.02: the frozen head reads an RMS-normalised hidden state, so with
    # tiny random weights its logits could not leave about +-0.6 and no adapter could fit the task.
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=args.vocab,
                         max_position_embeddings=args.seq_len, tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(args.device)


def counting_batch(args, generator) -> torch.Tensor:
    """(batch, seq_len) sequences start, start+1, ... mod vocab from random starts."""
    starts = torch.randint(0, args.vocab, (args.batch_size, 1), generator=generator)
    return ((starts + torch.arange(args.seq_len)) % args.vocab).to(args.device)


def next_token_loss(model, tokens) -> torch.Tensor:
    out = model(input_ids=tokens).logits
    return F.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def train(model, parameters, args) -> list:
    """`args.steps` AdamW steps on fresh counting batches; returns the loss of every step."""
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    losses = []
    bar = tqdm(range(args.steps), desc="fine-tuning", disable=args.quiet)
    for _ in bar:
        loss = next_token_loss(model, counting_batch(args, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    model = build_model(args)
    held_out = counting_batch(args, torch.Generator().manual_seed(args.seed + 2))
    if args.use_lora:
        if args.lora_load_path:
            model = lorafuse.LoRAModel.from_pretrained(model, args.lora_load_path, is_trainable=True)
        else:
            model = lorafuse.get_lora_model(model, lorafuse.LoRAConfig.from_args(args))
        model.print_summary()
        parameters = model.trainable_parameters()
    else:
        counts = lorafuse.count_parameters(model)
        print(f"full fine-tuning: {counts.trainable:,} trainable parameters")
        parameters = list(model.parameters())
    with torch.no_grad():
        start = next_token_loss(model.eval(), held_out).item()
    losses = train(model, parameters, args)
    with torch.no_grad():
        end = next_token_loss(model, held_out).item()
    print(f"held-out loss: {start:.3f} -> {end:.3f} (chance: {math.log(args.vocab):.3f})")
    result = {"start_loss": start, "end_loss": end, "losses": losses, "model": model}
    if args.use_lora:
        if args.lora_save_path:
            model.save_adapter(args.lora_save_path)
            print(f"adapter saved to {args.lora_save_path}")
        with torch.no_grad():
            adapted = model(input_ids=held_out).logits
            merged = model.merge_and_unload()(input_ids=held_out).logits
        gap = (merged - adapted).abs().max().item()
        print(f"merged model: max |logit difference| {gap:.2e}")
        result.update(model=merged, merge_gap=gap)
    return result


if __name__ == "__main__":
    main()
