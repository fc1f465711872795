"""DoRA against PEFT's `use_dora=True` on transformers models: adapter files load both ways with the same
outputs, merged models agree, and identical adapters give the same logits and gradients (A, B and magnitude).

Everything is fp32 with dropout 0 (or eval): there PEFT's DoRA and lorafuse's are the same function. With
lora_dropout > 0 in training they differ by design (docs/model_api.md).

Tolerances: the two compute the same sums in another order (PEFT adds (g - 1) * x W^T to the base output,
lorafuse scales x W^T + s xa B^T by g once), so the logits (|.| < 1, two blocks of sums over 32 to 128 terms)
differ by a few fp32 ulps, about 1e-7; 1e-5 leaves room and still fails for any real difference (an adapter moves
the logits by 1e-1 here).
"""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from tiny_models import logits, tiny_gpt2, tiny_llama, token_batch

from lorafuse import FusedDoRALinear, LoRAConfig, LoRAModel, get_lora_model, lora_state_dict
from lorafuse.adapter_io import ADAPTER_WEIGHTS

CASES = [
    (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    (tiny_gpt2, ["c_attn", "attn.c_proj", "c_fc"]),
]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}




@torch.no_grad()
def _randomize(model, *, seed=1):
    """Random lora_B and magnitudes (1 +- 0.2 times their start) on a PEFT or lorafuse model: with B = 0 and
    m = ||W||, DoRA is the identity and any comparison would pass."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if "lora_B" in name:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        elif "lora_magnitude_vector" in name:
            param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))


def _run(model, tokens, *, peft):
    with torch.no_grad():
        return logits(model(input_ids=tokens) if peft else model(tokens))


@pytest.mark.parametrize(("build", "targets"), CASES)
def test_adapter_saved_by_peft_loads_in_lorafuse(tmp_path, build, targets):
    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)).eval()
    _randomize(peft_model)
    peft_model.save_pretrained(tmp_path)
    tokens = token_batch()
    expected = _run(peft_model, tokens, peft=True)
    assert (expected - _run(build(), tokens, peft=False)).abs().max() > 1e-2
    lora_model = LoRAModel.from_pretrained(build(), tmp_path)
    assert lora_model.lora_config.use_dora
    assert all(type(layer) is FusedDoRALinear for _, layer in lora_model.lora_layers())
    torch.testing.assert_close(_run(lora_model, tokens, peft=False), expected, **TOLERANCE)
    # And back: lorafuse's re-save of PEFT's DoRA adapter has PEFT's keys (PEFT would also load a magnitude key
    # with ".weight", so only this comparison pins the layout) and PEFT loads it.
    lora_model.save_adapter(tmp_path / "again")
    assert set(load_file(tmp_path / "again" / ADAPTER_WEIGHTS)) == set(load_file(tmp_path / ADAPTER_WEIGHTS))
    again = PeftModel.from_pretrained(build(), tmp_path / "again").eval()
    torch.testing.assert_close(_run(again, tokens, peft=True), expected, **TOLERANCE)


@pytest.mark.parametrize(("build", "targets"), CASES)
def test_adapter_saved_by_lorafuse_loads_in_peft(tmp_path, build, targets):
    lora_model = get_lora_model(build(), LoRAConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True)).eval()
    _randomize(lora_model)
    lora_model.save_adapter(tmp_path)
    tokens = token_batch()
    expected = _run(lora_model, tokens, peft=False)
    assert (expected - _run(build(), tokens, peft=False)).abs().max() > 1e-2
    peft_model = PeftModel.from_pretrained(build(), tmp_path).eval()
    assert peft_model.peft_config["default"].use_dora
    peft_magnitudes = {name for name, _ in peft_model.named_parameters() if "lora_magnitude_vector" in name}
    assert len(peft_magnitudes) == len(lora_model.lora_layers())
    torch.testing.assert_close(_run(peft_model, tokens, peft=True), expected, **TOLERANCE)
    # Both merge to the same plain model.
    peft_merged = peft_model.merge_and_unload()
    lora_merged = lora_model.merge_and_unload()
    torch.testing.assert_close(_run(lora_merged, tokens, peft=False), _run(peft_merged, tokens, peft=False),
                               **TOLERANCE)
    torch.testing.assert_close(_run(lora_merged, tokens, peft=False), expected, **TOLERANCE)


@pytest.mark.parametrize(("build", "targets"), CASES)
def test_same_logits_and_gradients_as_peft_in_training(build, targets):
    lora_model = get_lora_model(build(), LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                    use_dora=True))
    _randomize(lora_model)
    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                                    use_dora=True))
    load_result = set_peft_model_state_dict(peft_model, lora_state_dict(lora_model.base_model))
    assert not [key for key in load_result.missing_keys if "lora_" in key] and not load_result.unexpected_keys
    lora_model.train()
    peft_model.train()
    tokens = token_batch(batch=2, seq=8)
    fused_logits = logits(lora_model(tokens))
    peft_logits = logits(peft_model(input_ids=tokens))
    torch.testing.assert_close(fused_logits, peft_logits, **TOLERANCE)
    for out in (fused_logits, peft_logits):
        F.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    peft_params = dict(peft_model.named_parameters())
    for path, layer in lora_model.lora_layers():
        peft_names = {"lora_A": f"{path}.lora_A.default.weight", "lora_B": f"{path}.lora_B.default.weight",
                      "lora_magnitude_vector": f"{path}.lora_magnitude_vector.default.weight"}
        for name, peft_name in peft_names.items():
            ours = getattr(layer, name).grad
            theirs = peft_params[f"base_model.model.{peft_name}"].grad
            assert ours is not None and ours.abs().max() > 0, f"{path}.{name} got no gradient"
            # The same sums in another order (dm divides sum(dy * (y - b)) by m where PEFT divides sum(dy * u) by
            # the norm): fp32 rounding, measured at most 6e-7 of the largest entry; 1e-5 of it leaves 16x room.
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item(),
                                       msg=f"{path}.{name}")
