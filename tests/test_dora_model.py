"""DoRA on a whole model (LoRAConfig(use_dora=True)): config, JSON and command line, injection, parameter counts,
adapter files, refusals, merging and the base-model-only mode."""

import argparse
import json

import pytest
import safetensors.torch
import tiny_llama
import torch
from tiny_models import logits, tiny_gpt2, token_batch

from lorafuse import (
    FusedDoRALinear,
    FusedLoRALinear,
    LoRAConfig,
    LoRAModel,
    add_lora_arguments,
    apply_lora,
    freeze_base,
    get_lora_model,
    load_lora_state_dict,
    lora_parameters,
    lora_state_dict,
)
from lorafuse.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from lorafuse.targeting import lora_layers

GPT2_TARGETS = ["c_attn", "attn.c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]




def _tiny_llama():
    torch.manual_seed(0)
    return tiny_llama.TinyLlama().eval()


@torch.no_grad()
def _randomize(model, *, seed=1):
    """Non-zero B and magnitudes away from the row norms (g != 1), as after training."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(model):
        layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=generator))
        spread = 1 + 0.2 * torch.randn(layer.lora_magnitude_vector.shape, generator=generator)
        layer.lora_magnitude_vector.mul_(spread)


def _dora_model(build=tiny_gpt2, targets=GPT2_TARGETS, **options):
    model = get_lora_model(build(), LoRAConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, **options))
    _randomize(model)
    return model.eval()


def _run(model, tokens):
    with torch.no_grad():
        return logits(model(tokens))


# ---- config, JSON, command line ---------------------------------------------------------------------------------

def test_use_dora_in_the_config():
    config = LoRAConfig(use_dora=True)
    assert config.use_dora and not LoRAConfig().use_dora
    assert config.to_dict()["use_dora"] is True and LoRAConfig(**config.to_dict()) == config
    assert config.replace(r=2).use_dora and config != LoRAConfig()
    with pytest.raises(ValueError, match="use_dora must be True or False, got 'yes'"):
        LoRAConfig(use_dora="yes")


def test_command_line_flag_reaches_the_config():
    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    assert LoRAConfig.from_args(parser.parse_args(["--lora-use-dora", "--lora-r", "4"])) == LoRAConfig(r=4,
                                                                                                         use_dora=True)
    assert LoRAConfig.from_args(parser.parse_args([])).use_dora is False


@pytest.mark.parametrize("use_dora", [True, False])
def test_adapter_config_json_writes_use_dora_as_peft_does(tmp_path, use_dora):
    model = get_lora_model(tiny_gpt2(), LoRAConfig(r=4, target_modules=["c_attn"], use_dora=use_dora))
    model.save_adapter(tmp_path)
    written = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert written["use_dora"] is use_dora and written["peft_type"] == "LORA"
    assert LoRAModel.from_pretrained(tiny_gpt2(), tmp_path).lora_config.use_dora is use_dora


# ---- injection and parameter counts -----------------------------------------------------------------------------

@pytest.mark.parametrize(("build", "targets", "paths"), [
    (_tiny_llama, LLAMA_TARGETS, [f"layers.{i}.{n}" for i in (0, 1)
                                  for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]),
    (tiny_gpt2, GPT2_TARGETS, [f"transformer.h.{i}.{n}" for i in (0, 1)
                               for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]),
])
def test_targets_become_dora_layers_that_start_as_the_base(build, targets, paths):
    model = build()
    tokens = token_batch()
    before = _run(model, tokens)
    weights = {path: model.get_submodule(path).weight for path in paths}
    apply_lora(model, LoRAConfig(r=4, target_modules=targets, use_dora=True))
    layers = dict(lora_layers(model))
    assert sorted(layers) == sorted(paths)
    for path, layer in layers.items():
        assert type(layer) is FusedDoRALinear and layer.weight is weights[path]
        assert layer.fan_in_fan_out == (build is tiny_gpt2)
    # g = ||W|| / ||W|| = 1 up to rounding: the adapted model computes what the base did.
    torch.testing.assert_close(_run(model, tokens), before, rtol=1e-5, atol=1e-6)


def test_parameter_counts_include_the_magnitude():
    model = get_lora_model(_tiny_llama(), LoRAConfig(r=4, target_modules=LLAMA_TARGETS, use_dora=True))
    # q (32 -> 32), v (32 -> 32), down (48 -> 32) per block: r * (in + out) + out each.
    per_block = [4 * (32 + 32) + 32, 4 * (32 + 32) + 32, 4 * (48 + 32) + 32]
    summary = model.summary()
    assert [m.parameters for m in summary.modules] == per_block * 2
    assert all(m.use_dora for m in summary.modules) and "Linear DoRA" in str(summary)
    adapter = 2 * sum(per_block)
    assert summary.adapter_parameters == summary.trainable == adapter
    assert model.get_nb_trainable_parameters()[0] == adapter
    magnitudes = [layer.lora_magnitude_vector for _, layer in model.lora_layers()]
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in lora_parameters(model.base_model)}
    assert {id(p) for p in magnitudes} <= {id(p) for p in lora_parameters(model.base_model)}
    for p in model.base_model.parameters():
        p.requires_grad_(True)
    freeze_base(model.base_model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter
    assert all(p.requires_grad for p in magnitudes)


def test_a_training_step_moves_the_magnitude():
    model = _dora_model(_tiny_llama, LLAMA_TARGETS).train()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    before = {id(p): p.detach().clone() for p in model.trainable_parameters()}
    tiny_llama.loss_fn(model, token_batch()).backward()
    optimizer.step()
    for _, layer in model.lora_layers():
        for param in layer.adapter_parameters():
            assert not torch.equal(param, before[id(param)])


# ---- adapter files ----------------------------------------------------------------------------------------------

def test_save_load_round_trip_in_peft_key_layout(tmp_path):
    model = _dora_model()
    model.save_adapter(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / ADAPTER_WEIGHTS)
    expected_keys = {f"base_model.model.{path}.{leaf}" for path, _ in model.lora_layers()
                     for leaf in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    assert set(saved) == expected_keys
    for path, layer in model.lora_layers():
        assert torch.equal(saved[f"base_model.model.{path}.lora_magnitude_vector"], layer.lora_magnitude_vector)
    tokens = token_batch()
    again = LoRAModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert all(type(layer) is FusedDoRALinear for _, layer in again.lora_layers())
    assert torch.equal(_run(again, tokens), _run(model, tokens))
    into_existing = get_lora_model(tiny_gpt2(), LoRAConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS,
                                                           use_dora=True))
    into_existing.load_adapter(tmp_path)
    assert torch.equal(_run(into_existing.eval(), tokens), _run(model, tokens))


def test_dora_adapter_into_plain_lora_layers_is_refused(tmp_path):
    _dora_model().save_adapter(tmp_path)
    plain = get_lora_model(tiny_gpt2(), LoRAConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS))
    with pytest.raises(ValueError, match=r"adapter_config.json is a DoRA adapter \(use_dora=true\), but the model's "
                                         r"layers .*transformer\.h\.0\.attn\.c_attn.* are plain LoRA"):
        plain.load_adapter(tmp_path)
    # The state-dict path refuses too, even when not strict: the magnitudes would be dropped.
    with pytest.raises(ValueError, match=r"disagree on DoRA: transformer\.h\.0\.attn\.c_attn is a plain LoRA layer, "
                                         r"but the adapter has a DoRA lora_magnitude_vector"):
        load_lora_state_dict(plain.base_model, safetensors.torch.load_file(tmp_path / ADAPTER_WEIGHTS), strict=False)


def test_plain_lora_adapter_into_dora_layers_is_refused(tmp_path):
    plain = get_lora_model(tiny_gpt2(), LoRAConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS))
    plain.save_adapter(tmp_path)
    dora = get_lora_model(tiny_gpt2(), LoRAConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, use_dora=True))
    with pytest.raises(ValueError, match=r"is a plain LoRA adapter \(use_dora false or absent\), but the model's "
                                         r"layers .* are DoRA layers"):
        dora.load_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn is a DoRA layer, but the adapter has no "
                                         r"lora_magnitude_vector for it"):
        load_lora_state_dict(dora.base_model, lora_state_dict(plain.base_model), strict=False)


def test_a_magnitude_of_the_wrong_shape_names_file_key_and_shapes(tmp_path):
    _dora_model().save_adapter(tmp_path)
    file = tmp_path / ADAPTER_WEIGHTS
    tensors = safetensors.torch.load_file(file)
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_magnitude_vector"
    assert tensors[key].shape == (128,)
    tensors[key] = torch.ones(96)
    # Written without lorafuse's config hash, as PEFT writes it, so that the shape check is what refuses it.
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{ADAPTER_WEIGHTS} does not fit GPT2LMHeadModel .*{key}: expected "
                                         r"\(128,\), file has \(96,\)"):
        LoRAModel.from_pretrained(tiny_gpt2(), tmp_path)
    model = get_lora_model(tiny_gpt2(), LoRAConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, use_dora=True))
    with pytest.raises(ValueError, match=rf"{ADAPTER_WEIGHTS}: adapter shapes do not match the model .*{key}: "
                                         r"file \(96,\), model \(128,\)"):
        model.load_adapter(tmp_path)
    del tensors[key]
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing keys: {key}"):
        LoRAModel.from_pretrained(tiny_gpt2(), tmp_path)


def test_a_model_mixing_dora_and_plain_layers_cannot_be_saved(tmp_path):
    model = tiny_gpt2()
    apply_lora(model, LoRAConfig(r=4, target_modules=["c_attn"], use_dora=True))
    model.transformer.h[0].mlp.c_fc = FusedLoRALinear.from_conv1d(model.transformer.h[0].mlp.c_fc, r=4)
    with pytest.raises(ValueError, match=r"mixes DoRA layers .* with plain LoRA layers \(transformer\.h\.0\.mlp\.c_fc"):
        save_adapter(model, tmp_path, config=LoRAConfig(r=4, use_dora=True))
    assert not (tmp_path / ADAPTER_WEIGHTS).exists()


# ---- merging and the base-model-only mode -----------------------------------------------------------------------

@pytest.mark.parametrize(("build", "targets"), [(_tiny_llama, LLAMA_TARGETS), (tiny_gpt2, GPT2_TARGETS)])
def test_merge_unmerge_and_merge_and_unload_keep_the_outputs(build, targets):
    model = _dora_model(build, targets)
    tokens = token_batch()
    expected = _run(model, tokens)
    base = _run(build(), tokens)
    assert (expected - base).abs().max() > 1e-2  # the adapter does something
    # fp32: merged weights round each entry once or twice (1e-7 relative); the logits (|.| < 1) move by ~1e-7.
    model.merge()
    torch.testing.assert_close(_run(model, tokens), expected, rtol=1e-5, atol=1e-5)
    model.unmerge()
    torch.testing.assert_close(_run(model, tokens), expected, rtol=1e-5, atol=1e-5)
    plain = model.merge_and_unload()
    assert not lora_layers(plain)
    assert not any("lora_" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(_run(plain, tokens), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_runs_the_base_model(merged):
    model = _dora_model()
    tokens = token_batch()
    expected, base = _run(model, tokens), _run(tiny_gpt2(), tokens)
    if merged:
        model.merge()
    with model.disable_adapter():
        # Unmerging divides by g and subtracts s B A: fp32 rounding of the weight, ~1e-7 of the logits.
        torch.testing.assert_close(_run(model, tokens), base, rtol=1e-5, atol=1e-5 if merged else 0)
    assert all(layer.merged == merged for _, layer in model.lora_layers())
    torch.testing.assert_close(_run(model, tokens), expected, rtol=1e-5, atol=1e-5)


# ---- what does not take DoRA layers -----------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["ColwiseLoRAParallel", "RowwiseLoRAParallel"])
def test_tensor_parallel_styles_refuse_dora_layers(style):
    from lorafuse.distributed import styles

    layer = FusedDoRALinear(32, 16, r=4)
    # _apply is ParallelStyle's entry point (parallelize_module calls it); the layer is refused before the mesh is
    # looked at, so no process group is needed here.
    with pytest.raises(TypeError, match=rf"{style} cannot shard FusedDoRALinear\(in_features=32, out_features=16\): "
                                        r"tensor parallelism is not implemented for DoRA layers \(DoRA's row norms"):
        getattr(styles, style)()._apply(layer, None)


def test_megatron_integration_refuses_dora():
    from lorafuse.integrations.megatron import apply_lora_to_megatron_model

    with pytest.raises(ValueError, match=r"does not implement DoRA \(use_dora=True\)"):
        apply_lora_to_megatron_model(_tiny_llama(), LoRAConfig(use_dora=True))
