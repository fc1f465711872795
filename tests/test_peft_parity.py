"""lorafuse against PEFT on transformers models built from small configs: adapter files load both ways
with the same outputs, and identical adapters give the same logits and adapter gradients."""

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from tiny_models import logits, randomize_adapters, tiny_gpt2, tiny_llama, tiny_llama_classifier, token_batch

from lorafuse import LoRAConfig, LoRAModel, get_lora_model, kernels, lora_state_dict

FUSED_TO_PEFT = [
    (tiny_llama, LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 2},
                            alpha_pattern={r"layers\.1\..*": 4})),
    (tiny_llama, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1],
                            use_rslora=True, modules_to_save=["lm_head"])),
    (tiny_gpt2, LoRAConfig(r=4, target_modules=["c_attn", "attn.c_proj"], bias="lora_only", modules_to_save=["ln_f"])),
    (tiny_gpt2, LoRAConfig(r=2, lora_alpha=4, target_modules=r".*\.h\.1\.mlp\.c_(fc|proj)", bias="all")),
]

PEFT_TO_FUSED = [
    (tiny_llama, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            layers_to_transform=[1], use_rslora=True)),
    (tiny_llama, LoraConfig(r=4, target_modules="all-linear", rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 2},
                            exclude_modules=["up_proj"], modules_to_save=["lm_head"])),
    (tiny_gpt2, LoraConfig(r=4, target_modules=["c_attn"], bias="lora_only", modules_to_save=["ln_f"])),
    (tiny_gpt2, LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.h\.1\.mlp\.c_(fc|proj)")),
]


@torch.no_grad()
def _perturb_extras(model):
    """Move the trained parameters besides the adapters (biases, modules_to_save) as training would."""
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" not in name:
            param.add_(0.1 * torch.randn_like(param))


@torch.no_grad()
def _randomize_peft(peft_model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.copy_(0.1 * torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize(("build", "config"), FUSED_TO_PEFT)
def test_adapter_saved_by_lorafuse_loads_in_peft(tmp_path, build, config):
    lora_model = get_lora_model(build(), config)
    randomize_adapters(lora_model)
    _perturb_extras(lora_model.base_model)
    lora_model.save_adapter(tmp_path)
    tokens = token_batch()
    peft_model = PeftModel.from_pretrained(build(), tmp_path).eval()
    with torch.no_grad():
        expected = logits(lora_model(tokens))
        base = logits(build()(tokens))
        assert (expected - base).abs().max() > 1e-3  # the adapter does something
        torch.testing.assert_close(logits(peft_model(input_ids=tokens)), expected, rtol=1e-5, atol=1e-5)
        # Unlike PEFT's (which keeps trained biases and modules_to_save), lorafuse's base-only mode is the
        # untouched base model.
        with lora_model.disable_adapter():
            torch.testing.assert_close(logits(lora_model(tokens)), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("build", "config"), PEFT_TO_FUSED)
def test_adapter_saved_by_peft_loads_in_lorafuse(tmp_path, build, config):
    peft_model = get_peft_model(build(), config).eval()
    _randomize_peft(peft_model)
    _perturb_extras(peft_model)
    peft_model.save_pretrained(tmp_path)
    tokens = token_batch()
    lora_model = LoRAModel.from_pretrained(build(), tmp_path).eval()
    peft_layers = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
                   if hasattr(module, "lora_A") and hasattr(module, "base_layer")}
    assert {path for path, _ in lora_model.lora_layers()} == peft_layers
    with torch.no_grad():
        expected = logits(peft_model(input_ids=tokens))
        assert (expected - logits(build()(tokens))).abs().max() > 1e-3
        torch.testing.assert_close(logits(lora_model(tokens)), expected, rtol=1e-5, atol=1e-5)
        # And back again: lorafuse's re-save of a PEFT adapter is still a PEFT adapter.
        lora_model.save_adapter(tmp_path / "again")
        again = PeftModel.from_pretrained(build(), tmp_path / "again").eval()
        torch.testing.assert_close(logits(again(input_ids=tokens)), expected, rtol=1e-5, atol=1e-5)


def test_peft_sequence_classification_adapter_loads_in_lorafuse(tmp_path):
    # PEFT's SEQ_CLS models add both "classifier" and "score" to modules_to_save and skip the one the
    # model lacks; the file keeps both names.
    peft_model = get_peft_model(tiny_llama_classifier(), LoraConfig(task_type="SEQ_CLS", r=4,
                                                                    target_modules=["q_proj", "v_proj"])).eval()
    _randomize_peft(peft_model)
    _perturb_extras(peft_model)  # the score head trains fully
    peft_model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"modules_to_save entries \['classifier'\] of the adapter file match no "
                                         r"module of LlamaForSequenceClassification"):
        lora_model = LoRAModel.from_pretrained(tiny_llama_classifier(), tmp_path)
    tokens = token_batch()
    with torch.no_grad():
        expected = logits(peft_model(input_ids=tokens))
        assert (expected - logits(tiny_llama_classifier()(tokens))).abs().max() > 1e-3
        torch.testing.assert_close(logits(lora_model(tokens)), expected, rtol=1e-5, atol=1e-5)


def _count_kernel_calls(monkeypatch):
    """Count calls of the Triton launchers (interpreted on CPU): proof that the fused path ran."""
    calls = {"lora_forward": 0, "lora_backward": 0}
    for name in calls:
        original = getattr(kernels, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    return calls


@pytest.mark.parametrize(("build", "targets"), [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_same_logits_and_adapter_gradients_as_peft(monkeypatch, device, build, targets):
    # On `device`: the Triton kernels run interpreted on CPU, natively on a GPU.
    lora_model = get_lora_model(build().to(device),
                                LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    randomize_adapters(lora_model)
    peft_model = get_peft_model(build().to(device),
                                LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    load_result = set_peft_model_state_dict(peft_model, lora_state_dict(lora_model.base_model))
    assert not [key for key in load_result.missing_keys if "lora_" in key] and not load_result.unexpected_keys
    lora_model.train()
    peft_model.train()
    calls = _count_kernel_calls(monkeypatch)
    tokens = token_batch(batch=2, seq=8).to(device)
    fused_logits = logits(lora_model(tokens))
    peft_logits = logits(peft_model(input_ids=tokens))
    torch.testing.assert_close(fused_logits, peft_logits, rtol=1e-5, atol=1e-5)
    for out in (fused_logits, peft_logits):
        F.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    layers = lora_model.lora_layers()
    assert calls["lora_forward"] == len(layers) and calls["lora_backward"] == len(layers)
    peft_params = dict(peft_model.named_parameters())
    for path, layer in layers:
        for side in ("A", "B"):
            peft_grad = peft_params[f"base_model.model.{path}.lora_{side}.default.weight"].grad
            ours = getattr(layer, f"lora_{side}").grad
            assert ours is not None and ours.abs().max() > 0, f"{path}.lora_{side} got no gradient"
            torch.testing.assert_close(ours, peft_grad, rtol=1e-4, atol=1e-6, msg=f"{path}.lora_{side}")


def test_fp32_adapters_on_fp16_model_match_peft(tmp_path, device):
    # PEFT's default on half-precision models (autocast_adapter_dtype=True) keeps adapters in fp32; lorafuse's
    # "auto" does the same. Both are held to the oracle rule against an fp64 copy of the same model.
    from safetensors.torch import load_file

    from lorafuse.bench.compare import oracle_error

    def build(dtype):
        return tiny_llama().to(device, dtype)

    peft_config = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    lora_model = get_lora_model(build(torch.float16), LoRAConfig(**peft_config))
    assert {layer.lora_A.dtype for _, layer in lora_model.lora_layers()} == {torch.float32}
    randomize_adapters(lora_model)
    state = lora_state_dict(lora_model.base_model)
    runs = {"fused": lora_model}
    for name, dtype in (("peft", torch.float16), ("fp64", torch.float64)):
        runs[name] = get_peft_model(build(dtype), LoraConfig(**peft_config))
        set_peft_model_state_dict(runs[name], state)
    assert {p.dtype for n, p in runs["peft"].named_parameters() if "lora_" in n} == {torch.float32}
    tokens = token_batch(batch=2, seq=8).to(device)
    outputs, grads = {}, {}
    for name, model in runs.items():
        model.train()
        out = logits(model(tokens) if name == "fused" else model(input_ids=tokens))
        F.cross_entropy(out[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        outputs[name] = out.detach()
        # One key per adapter tensor, "layers.0.self_attn.q_proj.lora_A": the wrappers' prefixes and PEFT's
        # ".default.weight" differ.
        grads[name] = {n[n.index("layers."):].replace(".default.weight", ""): p.grad
                       for n, p in model.named_parameters() if "lora_" in n}
    problem = oracle_error(outputs["fused"], outputs["peft"], outputs["fp64"], dtype=torch.float16)
    assert problem is None, f"logits: {problem}"
    for key, peft_grad in grads["peft"].items():
        ours = grads["fused"][key]
        assert ours.dtype == torch.float32 and ours.abs().max() > 0
        problem = oracle_error(ours, peft_grad, grads["fp64"][key], dtype=torch.float32)
        assert problem is None, f"{key}: {problem}"
    # Saved as PEFT saves it: fp32 tensors, which load back into fp32 adapters.
    lora_model.save_adapter(tmp_path)
    assert {t.dtype for t in load_file(tmp_path / "adapter_model.safetensors").values()} == {torch.float32}
    again = LoRAModel.from_pretrained(build(torch.float16), tmp_path)
    assert {layer.lora_A.dtype for _, layer in again.lora_layers()} == {torch.float32}
