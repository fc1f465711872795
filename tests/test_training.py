"""End to end: a tiny transformers Llama learns a fixed task through lorafuse adapters alone, and the
example script fine-tunes, saves and reloads an adapter."""

import importlib.util
import pathlib

import torch
from tiny_models import counting_task, tiny_llama

from lorafuse import LoRAConfig, get_lora_model, lora_parameters

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "finetune_tiny_llama.py"


def test_training_lowers_the_loss_and_changes_only_the_adapters():
    model = tiny_llama(initializer_range=0.2)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    lora_model = get_lora_model(model, LoRAConfig(r=8, target_modules=["o_proj", "down_proj"]))
    tokens = counting_task(batch=4, seq=8)
    optimizer = torch.optim.AdamW(lora_model.trainable_parameters(), lr=3e-2)
    lora_model.train()
    losses = []
    for _ in range(30):
        loss = lora_model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"
    # The adapted layers keep the base parameters under their own names, so every base parameter is found
    # by name, is frozen and holds its original value.
    adapters = {id(p) for p in lora_parameters(model)}
    frozen = {name: p for name, p in model.named_parameters() if id(p) not in adapters}
    assert frozen.keys() == base.keys()
    for name, p in frozen.items():
        assert not p.requires_grad and torch.equal(p, base[name]), f"{name} changed"
    assert all(not torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) for _, layer in lora_model.lora_layers())
    lora_model.eval()
    with torch.no_grad():
        adapted = lora_model(input_ids=tokens).logits
        merged = lora_model.merge_and_unload()(input_ids=tokens).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_tiny_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_script_fine_tunes_saves_and_reloads(tmp_path, capsys):
    example = _load_example()
    small = ["--hidden", "32", "--batch-size", "4", "--seq-len", "8", "--use-lora", "--lora-r", "4"]
    trained = example.main([*small, "--steps", "4", "--lr", "3e-2", "--lora-save-path", str(tmp_path)])
    out, err = capsys.readouterr()
    assert "model.layers.1.self_attn.o_proj" in out and "trainable:" in out and "adapter saved to" in out
    assert "fine-tuning" in err  # the tqdm progress bar
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert trained["end_loss"] < trained["start_loss"] and trained["merge_gap"] < 1e-4
    reloaded = example.main([*small, "--steps", "0", "--quiet", "--lora-load-path", str(tmp_path)])
    assert abs(reloaded["start_loss"] - trained["end_loss"]) < 1e-5
