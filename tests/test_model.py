"""apply_lora / LoRAModel: injection, freezing, counts, merging, unloading, the base-model-only mode."""

import contextlib
import io
import os

import pytest
import safetensors.torch
import torch
import torch.nn as nn
from tiny_models import logits, randomize_adapters, tiny_gpt2, tiny_llama, tiny_megatron, token_batch
from transformers.pytorch_utils import Conv1D

from lorafuse import (
    FusedLoRALinear,
    LoRAConfig,
    LoRAModel,
    apply_lora,
    count_parameters,
    freeze_base,
    get_lora_model,
    lora_parameters,
    lora_state_dict,
)
from lorafuse.targeting import lora_layers

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_apply_lora_swaps_targets_in_place_sharing_their_weights():
    model = tiny_llama()
    originals = {path: model.get_submodule(path) for path in
                 [f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("q_proj", "v_proj")]}
    tokens = token_batch()
    before = logits(model(tokens))
    assert apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])) is model
    layers = dict(lora_layers(model))
    assert sorted(layers) == sorted(originals)
    for path, layer in layers.items():
        assert layer.weight is originals[path].weight and layer.r == 4 and layer.lora_alpha == 16.0
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    # B starts at zero: the adapted model computes what the base model did.
    torch.testing.assert_close(logits(model(tokens)), before, rtol=0, atol=1e-6)


def test_gpt2_conv1d_becomes_a_fan_in_fan_out_layer_without_a_copy():
    model = tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    assert isinstance(conv, Conv1D)
    apply_lora(model, LoRAConfig(r=4, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, FusedLoRALinear) and layer.fan_in_fan_out
    assert layer.weight is conv.weight and layer.weight.shape == (32, 96)
    assert layer.base_weight().data_ptr() == conv.weight.data_ptr()  # a transposed view, not a copy
    assert (layer.lora_A.shape, layer.lora_B.shape) == ((4, 32), (96, 4))


def test_megatron_names_on_linear_layers_are_adapted():
    model = tiny_megatron()
    tokens = token_batch()
    before = model(tokens)
    apply_lora(model, LoRAConfig(r=2))
    assert [path for path, _ in lora_layers(model)] == [
        f"decoder.layers.{i}.self_attention.{n}" for i in (0, 1) for n in ("linear_qkv", "linear_proj")]
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=1e-6)


def test_rank_and_alpha_patterns_set_per_module_values():
    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\..*": 2}))
    layers = dict(lora_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].r == 2 and layers["model.layers.0.self_attn.k_proj"].r == 4
    assert layers["model.layers.0.self_attn.v_proj"].lora_alpha == 8.0
    assert layers["model.layers.1.self_attn.v_proj"].lora_alpha == 2.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling == 1.0  # alpha 2 / r 2


def _trainable(model):
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def test_only_adapters_train_by_default():
    model = apply_lora(tiny_llama(), LoRAConfig(r=4))
    assert _trainable(model) == sorted(f"model.layers.{i}.self_attn.{n}.lora_{m}"
                                       for i in (0, 1) for n in ATTENTION for m in "AB")
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}


def test_bias_modes_choose_which_biases_train():
    lora_only = apply_lora(tiny_gpt2(), LoRAConfig(r=2, target_modules=["c_attn"], bias="lora_only"))
    assert [n for n in _trainable(lora_only) if n.endswith("bias")] == [
        "transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    every = apply_lora(tiny_gpt2(), LoRAConfig(r=2, target_modules=["c_attn"], bias="all"))
    biases = [n for n, _ in every.named_parameters() if n.endswith(".bias")]
    assert len(biases) == 2 * 6 + 1 and set(biases) <= set(_trainable(every))  # ln_1/2, 4 layers per block; ln_f


def test_modules_to_save_train_fully():
    model = apply_lora(tiny_llama(), LoRAConfig(r=2, modules_to_save=["lm_head"]))
    assert "lm_head.weight" in _trainable(model) and "model.embed_tokens.weight" not in _trainable(model)
    assert isinstance(model.lm_head, nn.Linear)


def test_freeze_base_leaves_only_adapters_trainable():
    model = apply_lora(tiny_llama(), LoRAConfig(r=2, bias="all", modules_to_save=["lm_head"]))
    for p in model.parameters():
        p.requires_grad_(True)
    freeze_base(model)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in lora_parameters(model)}


def test_summary_counts_match_a_hand_count():
    lora_model = get_lora_model(tiny_llama(), LoRAConfig(r=4, rank_pattern={"model.layers.1.self_attn.q_proj": 2}))
    summary = lora_model.summary()
    # Per block: q (32 -> 32), k and v (32 -> 16, two KV heads of 8), o (32 -> 32); r * (in + out) each.
    per_block = [4 * (32 + 32), 4 * (32 + 16), 4 * (32 + 16), 4 * (32 + 32)]
    block1 = [2 * (32 + 32)] + per_block[1:]
    assert [m.parameters for m in summary.modules] == per_block + block1
    assert [m.r for m in summary.modules] == [4] * 4 + [2, 4, 4, 4]
    adapter = sum(per_block) + sum(block1)
    # Base: embeddings 64x32; per block q 32x32, k 16x32, v 16x32, o 32x32, gate/up 64x32, down 32x64, two
    # RMSNorms of 32; final norm 32; untied head 64x32.
    block = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 64 * 32 + 2 * 32
    base = 64 * 32 + 2 * block + 32 + 64 * 32
    assert (summary.adapter_parameters, summary.trainable, summary.total) == (adapter, adapter, base + adapter)
    assert summary.percent == pytest.approx(100 * adapter / (base + adapter))
    assert count_parameters(lora_model).trainable == adapter and count_parameters(lora_model).total == base + adapter
    text = str(summary)
    assert "model.layers.1.self_attn.q_proj" in text and f"trainable: {adapter:,} / total: {base + adapter:,}" in text
    printed = io.StringIO()
    lora_model.print_summary(file=printed)
    assert printed.getvalue() == text + "\n"


def test_count_parameters_counts_tied_weights_once():
    model = tiny_gpt2()  # lm_head is tied to the token embedding
    assert model.lm_head.weight is model.transformer.wte.weight
    counts = count_parameters(model)
    assert counts.total == sum(p.numel() for p in set(model.parameters()))
    assert counts.trainable == counts.total and counts.percent == 100.0
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        count_parameters(3)


def test_targeting_a_tied_head_warns_that_merging_changes_both():
    with pytest.warns(UserWarning, match=r"lm_head.weight is tied to transformer.wte.weight"):
        apply_lora(tiny_gpt2(), LoRAConfig(r=2, target_modules=["lm_head"]))


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_and_merge_and_unload_keep_the_outputs(build):
    model = build()
    lora_model = get_lora_model(model, LoRAConfig(r=4, target_modules="all-linear"))
    randomize_adapters(lora_model)
    tokens = token_batch()
    with torch.no_grad():
        adapted = logits(lora_model(tokens))
        torch.testing.assert_close(logits(lora_model.merge()(tokens)), adapted, rtol=1e-5, atol=1e-5)
        assert all(layer.merged for _, layer in lora_model.lora_layers())
        torch.testing.assert_close(logits(lora_model.unmerge()(tokens)), adapted, rtol=1e-5, atol=1e-5)
        weights = {path: layer.weight for path, layer in lora_model.lora_layers()}
        unloaded = lora_model.merge_and_unload()
    assert unloaded is model and not lora_layers(model)
    for path, weight in weights.items():
        plain = model.get_submodule(path)
        assert plain.weight is weight  # merged in place, not copied
        if build is tiny_gpt2:
            assert type(plain) is Conv1D and plain.weight.shape == (plain.nx, plain.nf)
        else:
            assert type(plain) is nn.Linear and plain.weight.device.type == "cpu"
    with torch.no_grad():
        torch.testing.assert_close(logits(model(tokens)), adapted, rtol=1e-5, atol=1e-5)


def test_disable_adapter_runs_the_base_model_and_restores_everything():
    model = tiny_gpt2()
    tokens = token_batch()
    with torch.no_grad():
        base = logits(model(tokens))
    lora_model = get_lora_model(model, LoRAConfig(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only"))
    randomize_adapters(lora_model)
    bias = model.transformer.h[0].attn.c_attn.bias
    with torch.no_grad():
        bias.add_(0.5)  # as if training had moved it
        trained_bias = bias.clone()
        adapted = logits(lora_model(tokens))
        assert (adapted - base).abs().max() > 1e-3
        for merge in (False, True):
            if merge:
                lora_model.merge()
            with lora_model.disable_adapter():
                torch.testing.assert_close(logits(lora_model(tokens)), base, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(logits(lora_model(tokens)), adapted, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(bias, trained_bias, rtol=0, atol=0)
            assert all(layer.merged == merge and layer.adapter_enabled for _, layer in lora_model.lora_layers())


def test_disable_adapter_restores_on_error():
    lora_model = get_lora_model(tiny_llama(), LoRAConfig(r=2))
    with pytest.raises(RuntimeError, match="boom"), lora_model.disable_adapter():
        raise RuntimeError("boom")
    assert all(layer.adapter_enabled for _, layer in lora_model.lora_layers())


def test_lora_model_forwards_calls_and_attributes_to_the_base_model():
    model = tiny_llama()
    lora_model = get_lora_model(model, LoRAConfig(r=2))
    assert isinstance(lora_model, LoRAModel) and lora_model.base_model is model
    assert lora_model.config is model.config and lora_model.lora_config == LoRAConfig(r=2)
    assert lora_model.generate.__self__ is model
    tokens = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(logits(lora_model(input_ids=tokens)), logits(model(input_ids=tokens)))
    assert {id(p) for p in lora_model.trainable_parameters()} == {id(p) for p in lora_parameters(model)}
    with pytest.raises(AttributeError):
        lora_model.no_such_attribute  # noqa: B018


def test_lora_model_trains_in_train_mode_and_evaluates_in_eval_mode():
    lora_model = get_lora_model(tiny_llama(), LoRAConfig(r=2))
    lora_model.train()
    assert all(layer.training for _, layer in lora_model.lora_layers())
    lora_model.eval()
    assert not any(layer.training for _, layer in lora_model.lora_layers())


def test_applying_twice_or_to_wrong_objects_raises():
    model = apply_lora(tiny_llama(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has 8 FusedLoRALinear layers"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["up_proj"]))
    with pytest.raises(TypeError, match="already a LoRAModel"):
        apply_lora(get_lora_model(tiny_llama(), LoRAConfig(r=2)), LoRAConfig(r=2))
    with pytest.raises(TypeError, match="config must be a LoRAConfig, got dict"):
        apply_lora(tiny_llama(), {"r": 2})
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        apply_lora("llama", LoRAConfig())


def test_a_bad_modules_to_save_name_changes_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        apply_lora(model, LoRAConfig(r=2, modules_to_save=["head"]))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_hooks_on_a_replaced_layer_warn_that_they_will_not_run():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].register_forward_hook(lambda module, args, output: None)
    model[1].register_forward_pre_hook(lambda module, args: None)
    with pytest.warns(UserWarning, match=r"'0', '1' have hooks .* will not run"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["0", "1", "2"]))
    assert len(lora_layers(model)) == 3


def test_save_pretrained_saves_the_adapter_only_as_peft_does(tmp_path):
    lora_model = get_lora_model(tiny_llama(), LoRAConfig(r=4))
    randomize_adapters(lora_model)
    lora_model.save_pretrained(tmp_path / "pretrained")
    lora_model.save_adapter(tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path / "pretrained")) == ["adapter_config.json", "adapter_model.safetensors"]
    config_text = (tmp_path / "adapter" / "adapter_config.json").read_text()
    assert (tmp_path / "pretrained" / "adapter_config.json").read_text() == config_text
    saved = safetensors.torch.load_file(tmp_path / "pretrained" / "adapter_model.safetensors")
    torch.testing.assert_close(saved, lora_state_dict(lora_model.base_model), rtol=0, atol=0)
    with pytest.raises(ValueError, match="safe_serialization=False: lorafuse writes adapters as safetensors only"):
        lora_model.save_pretrained(tmp_path / "pickled", safe_serialization=False)


def test_print_trainable_parameters_prints_peft_line():
    from peft import LoraConfig, get_peft_model

    lora_model = get_lora_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ours, theirs = io.StringIO(), io.StringIO()
    lora_model.print_trainable_parameters(file=ours)
    with contextlib.redirect_stdout(theirs):
        peft_model.print_trainable_parameters()
    assert ours.getvalue() == theirs.getvalue()
    # Per block: q_proj 4 * (32 + 32), v_proj 4 * (32 + 16) (two KV heads of 8).
    assert ours.getvalue().startswith(f"trainable params: {2 * (256 + 192)} || all params: ")
    assert lora_model.get_nb_trainable_parameters() == peft_model.get_nb_trainable_parameters()


def _ulp(t: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of `t` (in its dtype), as float32."""
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[t.dtype]
    exponent = torch.frexp(t.abs().float())[1]
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent - mantissa_bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_disable_adapter_on_a_merged_low_precision_model_restores_weights_up_to_one_ulp(dtype):
    # What docs/model_api.md states: exact when unmerged; merged, one unit in the last place of the larger of
    # |W| and |W + delta|, which is not exact (the docs once said "exactly the base model's").
    lora_model = get_lora_model(tiny_llama().to(dtype), LoRAConfig(r=4, target_modules="all-linear"))
    randomize_adapters(lora_model)
    layers = [layer for _, layer in lora_model.lora_layers()]
    base = [layer.base_weight().detach().clone() for layer in layers]
    with lora_model.disable_adapter():
        assert all(torch.equal(layer.base_weight(), w) for layer, w in zip(layers, base))
    lora_model.merge()
    merged = [layer.base_weight().detach().clone() for layer in layers]
    with lora_model.disable_adapter():
        restored = [layer.base_weight().detach().clone() for layer in layers]
    for w, w_merged, w_restored in zip(base, merged, restored):
        bound = _ulp(torch.maximum(w.abs(), w_merged.abs()))
        assert ((w_restored.float() - w.float()).abs() <= bound).all()
    assert not all(torch.equal(w, w_restored) for w, w_restored in zip(base, restored))
