"""Which modules a LoRAConfig selects: lists, regexes, all-linear, defaults, block indices, exclusions."""

import pytest
import torch
import torch.nn as nn
from tiny_models import tiny_gpt2, tiny_llama, tiny_llama_classifier, tiny_megatron, tiny_phi3

from lorafuse import FusedLoRALinear, LoRAConfig
from lorafuse.targeting import find_modules_to_save, find_targets, layer_index, pattern_value

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama_paths(names, layers=(0, 1)):
    groups = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
    return [f"model.layers.{i}.{groups.get(n, 'mlp')}.{n}" for i in layers for n in LLAMA_LINEAR if n in names]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def test_list_entries_match_the_end_of_the_path(llama):
    assert find_targets(llama, LoRAConfig(target_modules=["q_proj", "v_proj"])) == _llama_paths({"q_proj", "v_proj"})
    # A multi-segment entry matches only under that parent; a partial segment matches nothing.
    assert find_targets(llama, LoRAConfig(target_modules=["mlp.up_proj"])) == _llama_paths({"up_proj"})
    assert find_targets(llama, LoRAConfig(target_modules=["model.layers.1.mlp.up_proj"])) == \
        ["model.layers.1.mlp.up_proj"]
    with pytest.raises(ValueError, match="matched no adaptable module"):
        find_targets(llama, LoRAConfig(target_modules=["proj"]))


def test_scoped_name_picks_attention_c_proj_only(gpt2):
    assert find_targets(gpt2, LoRAConfig(target_modules=["attn.c_proj"])) == \
        ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    assert find_targets(gpt2, LoRAConfig(target_modules=["c_proj"])) == [
        "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]


def test_regex_must_match_the_whole_path(llama):
    config = LoRAConfig(target_modules=r".*\.layers\.1\..*_proj")
    assert find_targets(llama, config) == _llama_paths(set(LLAMA_LINEAR), layers=(1,))
    assert find_targets(llama, LoRAConfig(target_modules=r".*(q|v)_proj")) == _llama_paths({"q_proj", "v_proj"})
    with pytest.raises(ValueError, match="matched no adaptable module"):
        find_targets(llama, LoRAConfig(target_modules=r"q_proj"))  # not the whole path


def test_all_linear_skips_the_output_head(llama, gpt2):
    assert find_targets(llama, LoRAConfig(target_modules="all-linear")) == _llama_paths(set(LLAMA_LINEAR))
    gpt2_targets = find_targets(gpt2, LoRAConfig(target_modules="all-linear"))
    assert "lm_head" not in gpt2_targets and len(gpt2_targets) == 8
    # A model without get_output_embeddings: the head is recognised by its conventional name.
    megatron_targets = find_targets(tiny_megatron(), LoRAConfig(target_modules="all-linear"))
    assert "output_layer" not in megatron_targets and len(megatron_targets) == 8


def test_defaults_are_the_attention_projections_of_the_architecture(llama, gpt2):
    assert find_targets(llama, LoRAConfig()) == _llama_paths({"q_proj", "k_proj", "v_proj", "o_proj"})
    # GPT-2: c_attn and the attention's c_proj, not the MLP's c_proj.
    assert find_targets(gpt2, LoRAConfig()) == [
        f"transformer.h.{i}.attn.{n}" for i in (0, 1) for n in ("c_attn", "c_proj")]
    assert find_targets(tiny_phi3(), LoRAConfig()) == [
        f"model.layers.{i}.self_attn.{n}" for i in (0, 1) for n in ("o_proj", "qkv_proj")]
    assert find_targets(tiny_megatron(), LoRAConfig()) == [
        f"decoder.layers.{i}.self_attention.{n}" for i in (0, 1) for n in ("linear_qkv", "linear_proj")]


def test_a_family_is_the_default_only_when_all_its_names_are_present():
    # q_proj and v_proj alone are not Llama's attention: adapting half of it by default would be a guess.
    model = nn.Module()
    model.q_proj, model.v_proj = nn.Linear(4, 4), nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"no default for Module.*linear layer names \[q_proj, v_proj\]"):
        find_targets(model, LoRAConfig())


def test_the_documented_defaults_are_the_defaults():
    import argparse

    from lorafuse import add_lora_arguments
    from lorafuse.targeting import DEFAULT_TARGETS

    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    doc = " ".join(LoRAConfig.__doc__.split())
    for family, names in DEFAULT_TARGETS:
        listed = ", ".join(names)
        assert f"{family}: {listed}" in doc and f"{family}: {listed}" in help_text, family


def test_unknown_architecture_without_targets_lists_its_linear_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"no default for Sequential.*linear layer names \[0, 2\]"):
        find_targets(model, LoRAConfig())


def test_targets_that_match_nothing_list_the_names_that_exist(llama):
    with pytest.raises(ValueError, match=r"target_modules=\['qproj'\] matched no adaptable module.*"
                                         r"\[down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj\]"):
        find_targets(llama, LoRAConfig(target_modules=["qproj"]))


def test_a_partly_matching_list_warns_about_the_unmatched_names(llama):
    with pytest.warns(UserWarning, match=r"\['vproj'\] match no module"):
        assert find_targets(llama, LoRAConfig(target_modules=["q_proj", "vproj"])) == _llama_paths({"q_proj"})


def test_layers_to_transform_keeps_only_those_blocks(llama, gpt2):
    config = LoRAConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    assert find_targets(llama, config) == _llama_paths({"q_proj", "v_proj"}, layers=(1,))
    assert find_targets(gpt2, LoRAConfig(target_modules=["c_attn"], layers_to_transform=0)) == \
        ["transformer.h.0.attn.c_attn"]
    # all-linear outside any block (the head) drops out too; layers_pattern names the block list.
    config = LoRAConfig(target_modules="all-linear", layers_to_transform=[0], layers_pattern="layers")
    assert find_targets(llama, config) == _llama_paths(set(LLAMA_LINEAR), layers=(0,))
    with pytest.raises(ValueError, match="matched no adaptable module"):
        find_targets(llama, LoRAConfig(target_modules=["q_proj"], layers_to_transform=[5]))


def test_layer_index_reads_the_first_block_number():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("layers.2.attn") == 2
    assert layer_index("model.layers.1.experts.7.w1") == 1
    assert layer_index("lm_head") is None
    assert layer_index("blocks.4.stage.2.proj", ["stage"]) == 2


def test_exclude_modules_by_list_and_regex(llama):
    config = LoRAConfig(target_modules="all-linear", exclude_modules=["mlp.down_proj", "k_proj"])
    assert find_targets(llama, config) == _llama_paths(set(LLAMA_LINEAR) - {"down_proj", "k_proj"})
    config = LoRAConfig(target_modules=["q_proj", "v_proj"], exclude_modules=r"model\.layers\.0\..*")
    assert find_targets(llama, config) == _llama_paths({"q_proj", "v_proj"}, layers=(1,))


def test_modules_to_save_are_never_adapted(gpt2):
    config = LoRAConfig(target_modules="all-linear", modules_to_save=["h.1.mlp"])
    targets = find_targets(gpt2, config)
    assert not any(t.startswith("transformer.h.1.mlp") for t in targets) and len(targets) == 6
    assert find_modules_to_save(gpt2, config) == ["transformer.h.1.mlp"]
    with pytest.raises(ValueError, match="modules_to_save entry 'head' matches no module.*lm_head, transformer"):
        find_modules_to_save(gpt2, LoRAConfig(modules_to_save=["head"]))


def test_modules_to_save_from_an_adapter_file_drop_names_that_match_nothing(gpt2):
    from lorafuse.adapter_io import config_from_adapter_dict

    file_config = config_from_adapter_dict({"peft_type": "LORA", "r": 2, "target_modules": ["c_attn"],
                                            "modules_to_save": ["classifier", "ln_f", "score"]})
    assert file_config.from_adapter_file and not LoRAConfig().from_adapter_file
    assert file_config.replace(r=4).from_adapter_file  # still the file's names
    assert find_modules_to_save(gpt2, file_config) == ["transformer.ln_f"]
    with pytest.warns(UserWarning, match=r"\['classifier', 'score'\] of the adapter file match no module of "
                                         r"GPT2LMHeadModel and are ignored"):
        find_modules_to_save(gpt2, file_config, warn=True)
    # Built by hand, the same names are a mistake.
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' matches no module"):
        find_modules_to_save(gpt2, LoRAConfig(r=2, modules_to_save=["classifier", "ln_f", "score"]))
    # From a file, a list of which nothing matches is still an error.
    with pytest.raises(ValueError, match=r"none of the adapter file's modules_to_save entries \['classifier', "
                                         r"'score'\] matches a module of GPT2LMHeadModel"):
        find_modules_to_save(gpt2, file_config.replace(modules_to_save=["classifier", "score"]))


@pytest.mark.parametrize("target", [["self_attn"], ["embed_tokens"], r".*\.layers\.0\.self_attn.*"])
def test_targets_that_are_not_linear_layers_are_rejected(llama, target):
    with pytest.raises(TypeError, match=r"matched 'model\.\S+', a (LlamaAttention|Embedding), which cannot take an "
                                        r"adapter: lorafuse adapts nn\.Linear and transformers' Conv1D layers only"):
        find_targets(llama, LoRAConfig(target_modules=target))


def test_multihead_attention_out_proj_is_rejected():
    model = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="reads its out_proj weight directly"):
        find_targets(model, LoRAConfig(target_modules=["out_proj"]))


def test_layers_that_already_have_an_adapter_are_rejected():
    model = nn.Sequential(FusedLoRALinear(4, 4, r=2))
    with pytest.raises(TypeError, match="already is a FusedLoRALinear"):
        find_targets(model, LoRAConfig(target_modules=["0"]))


def test_rank_and_alpha_patterns_match_the_end_of_the_path_first_key_wins():
    patterns = {r"layers\.0\.self_attn\.q_proj": 2, "q_proj": 4, "proj": 9}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value(patterns, "model.layers.1.self_attn.q_proj", 8) == 4
    assert pattern_value(patterns, "model.layers.1.mlp.up_proj", 8) == 8  # "proj" is not a whole segment suffix
    assert pattern_value({"mlp\\..*": 3}, "model.layers.1.mlp.up_proj", 8) == 3


class _ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own, which a FusedLoRALinear would silently drop."""

    def forward(self, x):
        return 2 * super().forward(x)


def _mixed_linears():
    from transformers.pytorch_utils import Conv1D

    class _MyConv1D(Conv1D):
        pass

    model = nn.Module()
    model.plain = nn.Linear(4, 4)
    model.scaled = _ScaledLinear(4, 4)
    model.conv = Conv1D(4, 4)
    model.my_conv = _MyConv1D(4, 4)
    model.fp8 = nn.Linear(4, 4).to(torch.float8_e4m3fn)
    model.last = nn.Linear(4, 2)
    return model


@pytest.mark.parametrize(("target", "message"), [
    ("scaled", r"matched 'scaled', a _ScaledLinear, which cannot take an adapter: it subclasses nn\.Linear"),
    ("my_conv", r"matched 'my_conv', a _MyConv1D, which cannot take an adapter: it subclasses Conv1D"),
    ("fp8", r"matched 'fp8', a Linear, which cannot take an adapter: its weight has dtype torch\.float8_e4m3fn"),
])
def test_linear_subclasses_and_other_weight_dtypes_are_refused_when_named(target, message):
    with pytest.raises(TypeError, match=message):
        find_targets(_mixed_linears(), LoRAConfig(target_modules=[target]))


def test_all_linear_skips_linear_subclasses_and_other_dtypes_with_a_warning():
    model = _mixed_linears()
    with pytest.warns(UserWarning, match=r"all-linear skipped 3 .*: 'scaled' \(_ScaledLinear\), 'my_conv' "
                                         r"\(_MyConv1D\), 'fp8' \(Linear, torch\.float8_e4m3fn\)"):
        targets = find_targets(model, LoRAConfig(target_modules="all-linear"))
    assert "plain" in targets and "conv" in targets
    assert not {"scaled", "my_conv", "fp8"} & set(targets)


class _Block(nn.Module):
    """Inner layers named like heads: "output" and "classifier" here are ordinary projections."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.output = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 4)


def test_all_linear_without_get_output_embeddings_excludes_only_the_real_head():
    # No top-level child has a head's name: the last linear layer is the head, inner names do not matter.
    model = nn.Module()
    model.blocks = nn.ModuleList([_Block(), _Block()])
    model.decoder = nn.Linear(4, 8)
    assert find_targets(model, LoRAConfig(target_modules="all-linear")) == [
        f"blocks.{i}.{name}" for i in (0, 1) for name in ("attn.output", "classifier")]
    # A top-level linear named like a head is the head, wherever it was registered.
    model = nn.Module()
    model.head = nn.Linear(4, 8)
    model.blocks = nn.ModuleList([_Block()])
    model.aux = nn.Linear(4, 2)
    assert find_targets(model, LoRAConfig(target_modules="all-linear")) == [
        "blocks.0.attn.output", "blocks.0.classifier", "aux"]


def test_all_linear_on_transformers_models_without_an_lm_head(llama):
    # A base model (get_output_embeddings() is None) has no head: every linear layer is adapted.
    assert find_targets(llama.model, LoRAConfig(target_modules="all-linear")) == [
        path.removeprefix("model.") for path in _llama_paths(set(LLAMA_LINEAR))]
    # A classifier's head is its top-level score.
    assert find_targets(tiny_llama_classifier(), LoRAConfig(target_modules="all-linear")) == \
        _llama_paths(set(LLAMA_LINEAR))
