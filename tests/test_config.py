"""LoRAConfig: defaults, normalisation, validation messages, argparse round trip."""

import argparse

import pytest

from lorafuse import LoRAConfig, add_lora_arguments


def test_defaults_match_the_documented_signature():
    config = LoRAConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16.0, 0.0)
    assert config.target_modules is None and config.exclude_modules is None and config.layers_to_transform is None
    assert config.use_rslora is False and config.bias == "none" and config.modules_to_save is None
    assert config.rank_pattern == {} and config.alpha_pattern == {}
    assert config.adapter_dtype == "auto"  # PEFT's autocast_adapter_dtype=True: fp32 adapters on fp16/bf16


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        LoRAConfig(8)


def test_normalises_lists_ints_and_all_linear():
    config = LoRAConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=3, modules_to_save=["lm_head"],
                        layers_pattern="layers")
    assert config.target_modules == ("q_proj", "v_proj")
    assert config.layers_to_transform == (3,)
    assert config.layers_pattern == ("layers",)
    assert config.modules_to_save == ("lm_head",)
    assert LoRAConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"
    assert LoRAConfig(target_modules={"v_proj", "k_proj"}).target_modules == ("k_proj", "v_proj")
    assert isinstance(LoRAConfig(lora_alpha=32).lora_alpha, float)


def test_to_dict_and_replace():
    config = LoRAConfig(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    data = config.to_dict()
    assert data["target_modules"] == ["q_proj"] and data["rank_pattern"] == {"q_proj": 2}
    assert LoRAConfig(**data) == config
    changed = config.replace(r=16)
    assert changed.r == 16 and changed.target_modules == ("q_proj",) and config.r == 4
    with pytest.raises(ValueError, match="r must be a positive int"):
        config.replace(r=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"r": 0}, "r must be a positive int, got 0"),
    ({"r": 2.0}, "r must be a positive int, got 2.0"),
    ({"r": True}, "r must be a positive int, got True"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive finite number, got 0"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a positive finite number, got nan"),
    ({"lora_alpha": "16"}, "lora_alpha must be a positive finite number, got '16'"),
    ({"lora_dropout": 1.0}, "lora_dropout must be a float in \\[0, 1\\), got 1.0"),
    ({"lora_dropout": -0.1}, "lora_dropout must be a float in \\[0, 1\\), got -0.1"),
    ({"target_modules": []}, "target_modules must not be empty"),
    ({"target_modules": ""}, "target_modules must not be an empty string"),
    ({"target_modules": ["q_proj", 3]}, "target_modules must hold non-empty strings, got 3"),
    ({"target_modules": 5}, "target_modules must be a list of module names or a regex string, got int 5"),
    ({"target_modules": "q_proj(["}, "target_modules 'q_proj\\(\\[' is not a valid regular expression"),
    ({"exclude_modules": "all-linear"}, "exclude_modules cannot be 'all-linear'"),
    ({"exclude_modules": ["x", ""]}, "exclude_modules must hold non-empty strings"),
    ({"layers_to_transform": -1}, "layers_to_transform must hold non-negative ints, got -1"),
    ({"layers_to_transform": []}, "layers_to_transform must be a non-negative int or a non-empty list"),
    ({"layers_to_transform": [0, "1"]}, "layers_to_transform must hold non-negative ints, got '1'"),
    ({"layers_pattern": "layers"}, "layers_pattern=\\['layers'\\] needs layers_to_transform"),
    ({"use_rslora": 1}, "use_rslora must be True or False, got 1"),
    ({"bias": "lora"}, "bias must be one of 'none', 'all', 'lora_only', got 'lora'"),
    ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of module names, got the string 'lm_head'"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a dict"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern\\['q_proj'\\] must be a positive int, got 0"),
    ({"rank_pattern": {"(": 4}}, "rank_pattern key '\\(' is not a valid regular expression"),
    ({"alpha_pattern": {"v_proj": -2.0}}, "alpha_pattern\\['v_proj'\\] must be a positive finite number, got -2.0"),
    ({"adapter_dtype": "fp16"}, "adapter_dtype must be 'auto', 'base' or 'float32', got 'fp16'"),
    ({"adapter_dtype": "fp16"}, "adapter_dtype must be 'auto', 'base' or 'float32', got 'fp16'"),
])
def test_bad_values_raise_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRAConfig(**kwargs)


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_lora_arguments(parser)
    return parser.parse_args(argv)


def test_argparse_defaults_build_the_default_config():
    args = _parse([])
    assert args.use_lora is False and args.lora_save_path is None and args.lora_load_path is None
    assert LoRAConfig.from_args(args) == LoRAConfig()


def test_argparse_options_reach_the_config():
    args = _parse(["--use-lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
                   "--lora-target-modules", "q_proj", "v_proj,o_proj", "--lora-use-rslora",
                   "--lora-save-path", "out", "--lora-load-path", "in"])
    assert args.use_lora and args.lora_save_path == "out" and args.lora_load_path == "in"
    config = LoRAConfig.from_args(args)
    assert config == LoRAConfig(r=4, lora_alpha=8.0, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "o_proj"],
                                use_rslora=True)
    assert LoRAConfig.from_args(_parse(["--lora-target-modules", "all-linear"])).target_modules == "all-linear"
    assert LoRAConfig.from_args(_parse(["--lora-adapter-dtype", "base"])).adapter_dtype == "base"


@pytest.mark.parametrize(("argv", "message"), [
    (["--lora-r", "0"], "argument --lora-r: must be a positive integer, got '0'"),
    (["--lora-r", "-2"], "argument --lora-r: must be a positive integer, got '-2'"),
    (["--lora-dropout", "1.5"], "argument --lora-dropout: must be in [0, 1), got '1.5'"),
    (["--lora-alpha", "nan"], "argument --lora-alpha/--lora_alpha: must be finite, got 'nan'"),
    (["--lora_alpha", "0"], "argument --lora-alpha/--lora_alpha: must be a positive number, got '0'"),
    (["--lora_rank", "-1"], "argument --lora_rank: must be a non-negative integer, got '-1'"),
    (["--lora-adapter-dtype", "fp16"], "argument --lora-adapter-dtype: invalid choice: 'fp16'"),
    (["--lora-target-modules", "all-linear", "q_proj"],
     "argument --lora-target-modules/--lora_target_modules: 'all-linear' stands for every linear layer and cannot be "
     "combined with other names, got 'all-linear q_proj'"),
    (["--lora_target_modules", "q_proj,all-linear"], "cannot be combined with other names"),
])
def test_argparse_bad_values_are_parser_errors_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_from_args_refuses_all_linear_beside_other_names():
    args = _parse([])
    args.lora_target_modules = ["all-linear", "q_proj"]  # a namespace built without the parser's check
    with pytest.raises(ValueError, match="lora_target_modules: 'all-linear' stands for every linear layer"):
        LoRAConfig.from_args(args)


def test_slime_command_line_is_accepted():
    args = _parse("--use-lora --lora-r 8 --lora-alpha 16.0 --lora-dropout 0.1 --lora-only-trainable".split())
    assert args.use_lora and args.lora_only_trainable
    assert LoRAConfig.from_args(args) == LoRAConfig(r=8, lora_alpha=16.0, lora_dropout=0.1)


def test_infinitrain_command_line_is_accepted():
    args = _parse(["--lora_rank", "8", "--lora_alpha", "16", "--lora_target_modules", "c_attn,attn.c_proj",
                   "--lora_load_path", "in", "--lora_save_path", "out"])
    assert args.use_lora and args.lora_load_path == "in" and args.lora_save_path == "out"
    assert LoRAConfig.from_args(args) == LoRAConfig(r=8, lora_alpha=16.0, target_modules=["c_attn", "attn.c_proj"])
    assert _parse(["--lora_rank=4"]).lora_r == 4
    # InfiniTrain's default rank 0 means "no LoRA".
    off = _parse(["--lora_rank", "0", "--lora_alpha", "16"])
    assert off.use_lora is False and off.lora_r == 8
    assert _parse(["--use-lora", "--lora_rank", "0"]).use_lora is False


def test_from_args_without_the_lora_arguments_says_how_to_add_them():
    with pytest.raises(TypeError, match="args lacks lora_r.*add_lora_arguments"):
        LoRAConfig.from_args(argparse.Namespace(lora_alpha=16.0, lora_dropout=0.0, lora_target_modules=None,
                                                lora_use_rslora=False))


def test_add_lora_arguments_takes_groups_and_rejects_other_objects():
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("mine")
    assert add_lora_arguments(group) is group
    assert parser.parse_args(["--lora-r", "2"]).lora_r == 2
    with pytest.raises(TypeError, match="parser must be an argparse.ArgumentParser"):
        add_lora_arguments(object())
