"""Adapters on disk: PEFT's layout, round trips, atomic writes, and the files and state dicts refused."""

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import safetensors
import safetensors.torch
import torch
from tiny_models import logits, randomize_adapters, tiny_gpt2, tiny_llama, token_batch

from lorafuse import (
    FusedLoRALinear,
    LoRAConfig,
    LoRAModel,
    adapter_io,
    get_lora_model,
    load_lora_state_dict,
    lora_state_dict,
    read_adapter_config,
)
from lorafuse.adapter_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def _adapted(build=tiny_llama, config=None, seed=1):
    lora_model = get_lora_model(build(), config or LoRAConfig(r=4))
    randomize_adapters(lora_model, seed=seed)
    return lora_model


def test_state_dict_uses_peft_keys_and_holds_only_adapter_tensors():
    lora_model = _adapted()
    state = lora_state_dict(lora_model.base_model)
    assert len(state) == 16
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in state
    layer = lora_model.base_model.model.layers[1].self_attn.v_proj
    assert state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].data_ptr() == \
        layer.lora_B.data_ptr()
    assert not any(".weight" in key and "lora_" not in key for key in state)


def test_saved_files_have_peft_layout_and_config_fields(tmp_path):
    lora_model = _adapted(tiny_gpt2, LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"], bias="lora_only",
                                                 modules_to_save=["ln_f"], rank_pattern={"h.1.attn.c_attn": 2}))
    lora_model.save_adapter(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # no temporary files left
    tensors = safetensors.torch.load_file(tmp_path / ADAPTER_WEIGHTS)
    assert {key: tuple(value.shape) for key, value in tensors.items()} == {
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (4, 32),
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": (96, 4),
        "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias": (96,),
        "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight": (2, 32),
        "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight": (96, 2),
        "base_model.model.transformer.h.1.attn.c_attn.base_layer.bias": (96,),
        "base_model.model.transformer.ln_f.weight": (32,),
        "base_model.model.transformer.ln_f.bias": (32,),
    }
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["target_modules"] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert config["fan_in_fan_out"] is True and config["bias"] == "lora_only" and config["use_rslora"] is False
    assert config["modules_to_save"] == ["transformer.ln_f"] and config["rank_pattern"] == {"h.1.attn.c_attn": 2}
    assert config["lora_dropout"] == 0.0 and "base_model_name_or_path" in config


def test_base_model_name_is_recorded_when_known(tmp_path):
    lora_model = _adapted()
    lora_model.config._name_or_path = "org/tiny-llama"
    lora_model.save_adapter(tmp_path)
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "org/tiny-llama"


def test_round_trip_restores_outputs_and_extra_parameters(tmp_path):
    config = LoRAConfig(r=4, target_modules=["c_attn", "mlp.c_proj"], bias="lora_only", modules_to_save=["ln_f"])
    source = _adapted(tiny_gpt2, config)
    with torch.no_grad():
        source.base_model.transformer.ln_f.weight.mul_(1.5)
        source.base_model.transformer.h[1].attn.c_attn.bias.add_(0.25)
    source.save_adapter(tmp_path)
    tokens = token_batch()
    with torch.no_grad():
        expected = logits(source(tokens))
        fresh = get_lora_model(tiny_gpt2(), config)
        assert (logits(fresh(tokens)) - expected).abs().max() > 1e-3
        fresh.load_adapter(tmp_path)
        torch.testing.assert_close(logits(fresh(tokens)), expected, rtol=0, atol=0)
        loaded = LoRAModel.from_pretrained(tiny_gpt2(), tmp_path)
        torch.testing.assert_close(logits(loaded(tokens)), expected, rtol=0, atol=0)
    assert loaded.trainable_parameters() == []
    assert LoRAModel.from_pretrained(tiny_gpt2(), tmp_path, is_trainable=True).trainable_parameters()


def test_loading_into_a_merged_model_replaces_the_merged_adapter(tmp_path):
    _adapted(seed=1).save_adapter(tmp_path)
    tokens = token_batch()
    target = _adapted(seed=2).merge()
    target.load_adapter(tmp_path)
    assert all(layer.merged for _, layer in target.lora_layers())
    with torch.no_grad():
        torch.testing.assert_close(logits(target(tokens)), logits(_adapted(seed=1)(tokens)), rtol=1e-5, atol=1e-5)


def test_read_adapter_config_rebuilds_the_config(tmp_path):
    config = LoRAConfig(r=4, lora_alpha=32, lora_dropout=0.1, use_rslora=True, alpha_pattern={"q_proj": 8})
    _adapted(config=config).save_adapter(tmp_path)
    loaded = read_adapter_config(tmp_path)
    assert (loaded.r, loaded.lora_alpha, loaded.lora_dropout, loaded.use_rslora) == (4, 32.0, 0.1, True)
    assert loaded.alpha_pattern == {"q_proj": 8.0} and len(loaded.target_modules) == 8


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    _adapted(seed=1).save_adapter(tmp_path)
    good = (tmp_path / ADAPTER_WEIGHTS).read_bytes()

    def crash(fd):
        raise KeyboardInterrupt  # as if the job were killed mid-write

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        _adapted(seed=2).save_adapter(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / ADAPTER_WEIGHTS).read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    get_lora_model(tiny_llama(), LoRAConfig(r=4)).load_adapter(tmp_path)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    _adapted().save_adapter(tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading was used")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    monkeypatch.setattr("pickle.loads", forbidden)
    get_lora_model(tiny_llama(), LoRAConfig(r=4)).load_adapter(tmp_path)


def test_pickle_only_adapters_are_refused(tmp_path):
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin, a pickle file, which lorafuse does not load"):
        get_lora_model(tiny_llama(), LoRAConfig(r=4)).load_adapter(tmp_path)


def test_missing_directory_and_files_are_named(tmp_path):
    lora_model = get_lora_model(tiny_llama(), LoRAConfig(r=4))
    with pytest.raises(FileNotFoundError, match="adapter directory .*nowhere' does not exist"):
        lora_model.load_adapter(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        lora_model.load_adapter(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_are_rejected(tmp_path, damage):
    _adapted().save_adapter(tmp_path)
    file = tmp_path / ADAPTER_WEIGHTS
    data = file.read_bytes()
    file.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        get_lora_model(tiny_llama(), LoRAConfig(r=4)).load_adapter(tmp_path)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "adapter_config.json is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    (json.dumps({"peft_type": "PREFIX_TUNING", "r": 4}), "peft_type='PREFIX_TUNING'; lorafuse loads LoRA adapters"),
    (json.dumps({"peft_type": "LORA", "r": 4, "lora_bias": True}), "uses PEFT options .*: lora_bias=True"),
    (json.dumps({"peft_type": "LORA", "r": 4, "use_dora": "yes"}), "use_dora must be True or False, got 'yes'"),
    (json.dumps({"peft_type": "LORA"}), "has no 'r'"),
    (json.dumps({"peft_type": "LORA", "r": 0}), "adapter_config.json: r must be a positive int, got 0"),
    (json.dumps({"peft_type": "LORA", "r": 4, "bias": "some"}), "bias must be one of"),
])
def test_bad_configs_are_rejected(tmp_path, content, message):
    _adapted().save_adapter(tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(content)
    with pytest.raises(ValueError, match=message):
        get_lora_model(tiny_llama(), LoRAConfig(r=4)).load_adapter(tmp_path)


def test_an_adapter_for_other_modules_lists_missing_and_unexpected_keys(tmp_path):
    _adapted(config=LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])).save_adapter(tmp_path)
    target = get_lora_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match=r"missing keys: base_model\.model\.model\.layers\.0\.self_attn\.k_proj"
                                         r"\.lora_A\.weight.*unexpected keys: base_model\.model\.model\.layers\.0"
                                         r"\.self_attn\.v_proj"):
        target.load_adapter(tmp_path)


def test_an_adapter_of_another_rank_lists_shape_mismatches(tmp_path):
    _adapted(config=LoRAConfig(r=4, lora_alpha=8)).save_adapter(tmp_path)
    target = get_lora_model(tiny_llama(), LoRAConfig(r=2, lora_alpha=4))
    before = [p.clone() for p in target.trainable_parameters()]
    with pytest.raises(ValueError, match=r"shapes do not match.*q_proj\.lora_A\.weight: file \(4, 32\), "
                                         r"model \(2, 32\)"):
        target.load_adapter(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, target.trainable_parameters()))  # nothing half-loaded


def test_an_adapter_with_another_scaling_is_refused(tmp_path):
    _adapted(config=LoRAConfig(r=4, lora_alpha=32)).save_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"another scaling.*q_proj: adapter scaling 8 \(lora_alpha=32"):
        get_lora_model(tiny_llama(), LoRAConfig(r=4, lora_alpha=16)).load_adapter(tmp_path)


def test_load_state_dict_strictness_and_key_spellings():
    source = _adapted(seed=3).base_model
    state = lora_state_dict(source)
    target = get_lora_model(tiny_llama(), LoRAConfig(r=4)).base_model
    # Keys without PEFT's prefix name the same tensors.
    bare = {key.removeprefix("base_model.model."): value for key, value in state.items()}
    result = load_lora_state_dict(target, bare)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(target).values(), state.values()))
    partial = dict(list(state.items())[:3])
    partial["base_model.model.model.norm.weight"] = torch.ones(32)
    with pytest.raises(ValueError, match=r"\(16 adapter tensors\): missing keys: .*\(1 more\); unexpected keys: "
                                         r"base_model\.model\.model\.norm\.weight"):
        load_lora_state_dict(target, partial)
    result = load_lora_state_dict(target, partial, strict=False)
    assert len(result.missing_keys) == 13 and result.unexpected_keys == ["base_model.model.model.norm.weight"]
    duplicated = dict(state, **{next(iter(bare)): next(iter(state.values()))})
    with pytest.raises(ValueError, match="two keys for"):
        load_lora_state_dict(target, duplicated)
    with pytest.raises(TypeError, match="must be a tensor, got list"):
        load_lora_state_dict(target, {next(iter(state)): [1.0]})


def test_saving_a_model_without_adapters_is_refused(tmp_path):
    from lorafuse.adapter_io import save_adapter

    with pytest.raises(ValueError, match="has no FusedLoRALinear layers"):
        save_adapter(tiny_llama(), tmp_path, config=LoRAConfig())


def test_peft_config_fields_map_onto_lorafuse_config():
    from lorafuse.adapter_io import config_from_adapter_dict

    peft_style = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "layers_to_transform": 0,
                  "layers_pattern": "", "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False,
                  "modules_to_save": None, "exclude_modules": None, "bias": "none", "task_type": "CAUSAL_LM"}
    assert config_from_adapter_dict(peft_style) == LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                              layers_to_transform=[0])
    no_restriction = dict(peft_style, layers_to_transform=[], layers_pattern="layers")
    assert config_from_adapter_dict(no_restriction).layers_to_transform is None
    assert config_from_adapter_dict({"peft_type": "LORA", "r": 2}) == LoRAConfig(r=2, lora_alpha=8)


def test_loading_into_adapters_on_the_meta_device_is_refused(tmp_path):
    _adapted().save_adapter(tmp_path)
    with torch.device("meta"):
        model = tiny_llama()
    lora_model = get_lora_model(model, LoRAConfig(r=4))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A, .* are on the meta device"):
        lora_model.load_adapter(tmp_path)


def test_from_pretrained_for_inference_is_in_eval_mode_and_frozen(tmp_path):
    _adapted().save_adapter(tmp_path)
    loaded = LoRAModel.from_pretrained(tiny_llama().train(), tmp_path)
    assert not any(module.training for module in loaded.modules())
    assert loaded.trainable_parameters() == []
    trainable = LoRAModel.from_pretrained(tiny_llama().train(), tmp_path, is_trainable=True)
    assert trainable.training and trainable.trainable_parameters()


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_mode_of_a_new_file(tmp_path, umask):
    previous = os.umask(umask)
    try:
        _adapted().save_adapter(tmp_path)
    finally:
        os.umask(previous)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def _config_hashes(directory):
    """(the config sha256 the weights file records, that of the config file beside it)."""
    with safetensors.safe_open(directory / ADAPTER_WEIGHTS, "pt") as f:
        recorded = f.metadata()["lorafuse_config_sha256"]
    return recorded, hashlib.sha256((directory / ADAPTER_CONFIG).read_bytes()).hexdigest()


def test_weights_record_the_hash_of_their_config(tmp_path):
    _adapted().save_adapter(tmp_path)
    recorded, actual = _config_hashes(tmp_path)
    assert recorded == actual


def test_a_save_interrupted_between_the_two_files_is_detected(tmp_path, monkeypatch):
    _adapted(config=LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])).save_adapter(tmp_path)
    real_write = adapter_io.atomic_write

    def write(file, content):
        if file.endswith(ADAPTER_CONFIG):
            raise KeyboardInterrupt  # killed after the new weights were renamed into place
        real_write(file, content)

    monkeypatch.setattr(adapter_io, "atomic_write", write)
    with pytest.raises(KeyboardInterrupt):
        _adapted(config=LoRAConfig(r=4, target_modules=["q_proj", "k_proj"])).save_adapter(tmp_path)
    monkeypatch.undo()
    target = get_lora_model(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match="adapter_model.safetensors and .*adapter_config.json do not belong together"):
        target.load_adapter(tmp_path)
    with pytest.raises(ValueError, match="do not belong together"):
        LoRAModel.from_pretrained(tiny_llama(), tmp_path)


def test_the_distributed_saver_and_loader_share_the_config_hash(tmp_path):
    from lorafuse.distributed import state_dict as distributed

    # Outside a process group the distributed functions work on one process, through the same files.
    config = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    distributed.save_adapter(_adapted(config=config), tmp_path, config=config)
    recorded, actual = _config_hashes(tmp_path)
    assert recorded == actual
    other = tmp_path / "other"
    _adapted(config=LoRAConfig(r=4, target_modules=["q_proj", "k_proj"])).save_adapter(other)
    (tmp_path / ADAPTER_CONFIG).write_bytes((other / ADAPTER_CONFIG).read_bytes())
    other_config = LoRAConfig(r=4, target_modules=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="do not belong together"):
        distributed.load_adapter(get_lora_model(tiny_llama(), other_config), tmp_path, config=other_config)


def test_lists_in_messages_are_capped_alike():
    from lorafuse.messages import SHOWN, listing

    assert listing([]) == "none"
    assert listing(["a", "b"]) == "a, b"
    assert listing(range(SHOWN + 5), separator="; ") == "; ".join(map(str, range(SHOWN))) + "; ... (5 more)"


def test_a_file_naming_many_missing_modules_gets_a_capped_message():
    from lorafuse.adapter_io import config_from_adapter_dict

    # A hostile (or broken) file can hold any number of names; the message names twelve and counts the rest.
    config = config_from_adapter_dict({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"],
                                       "modules_to_save": [f"head_{i}" for i in range(1000)]})
    with pytest.raises(ValueError, match=r"modules_to_save entries \['head_0', .*'head_11', \.\.\. \(988 more\)\] "
                                         r"matches a module") as error:
        get_lora_model(tiny_llama(), config)
    assert len(str(error.value)) < 600


def _write_with_config(directory, lora_model, **changes):
    """lora_model's tensors beside an adapter_config.json with `changes` (the pair's hash recorded as usual)."""
    from lorafuse.adapter_io import adapter_config_dict, write_adapter_files

    config_dict = adapter_config_dict(lora_model.base_model, lora_model.lora_config)
    write_adapter_files(directory, lora_state_dict(lora_model.base_model), {**config_dict, **changes})


def _no_layer_may_be_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a FusedLoRALinear was built before the file's shapes were checked")

    monkeypatch.setattr(FusedLoRALinear, "_init_lora", refuse)


def test_a_config_whose_r_disagrees_with_its_tensors_fails_before_any_layer_is_built(tmp_path, monkeypatch):
    _write_with_config(tmp_path, _adapted(), r=10**8)  # the tensors have r=4
    _no_layer_may_be_built(monkeypatch)
    with pytest.raises(ValueError, match=rf"{ADAPTER_WEIGHTS} does not fit LlamaForCausalLM .*before building any "
                                         r"layer\): .*base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A"
                                         r"\.weight: expected \(100000000, 32\), file has \(4, 32\); "):
        LoRAModel.from_pretrained(tiny_llama(), tmp_path)


def test_rank_pattern_and_missing_tensors_are_checked_before_any_layer_is_built(tmp_path, monkeypatch):
    _write_with_config(tmp_path / "pattern", _adapted(), rank_pattern={"v_proj": 2})
    source = _adapted(config=LoRAConfig(r=4, target_modules=["q_proj"]))
    _write_with_config(tmp_path / "missing", source, target_modules=["q_proj", "k_proj"])
    _no_layer_may_be_built(monkeypatch)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.v_proj\.lora_A\.weight: expected \(2, 32\), file "
                                         r"has \(4, 32\); .*v_proj\.lora_B\.weight: expected \(16, 2\), file has "
                                         r"\(16, 4\)"):
        LoRAModel.from_pretrained(tiny_llama(), tmp_path / "pattern")
    with pytest.raises(ValueError, match=r"missing keys: base_model\.model\.model\.layers\.0\.self_attn\.k_proj"
                                         r"\.lora_A\.weight, "):
        LoRAModel.from_pretrained(tiny_llama(), tmp_path / "missing")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_tensors_that_are_not_floating_point_are_refused_by_name(tmp_path, dtype):
    lora_model = _adapted()
    state = lora_state_dict(lora_model.base_model)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key] = torch.ones(state[key].shape, dtype=dtype)
    from lorafuse.adapter_io import adapter_config_dict, write_adapter_files

    write_adapter_files(tmp_path, state, adapter_config_dict(lora_model.base_model, lora_model.lora_config))
    message = rf"{ADAPTER_WEIGHTS}\['{key}'\] has dtype {dtype}; adapter tensors must be floating point"
    with pytest.raises(TypeError, match=message):
        LoRAModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(TypeError, match=message):
        _adapted().load_adapter(tmp_path)
    with pytest.raises(TypeError, match=rf"state_dict\['{key}'\] has dtype {dtype}"):
        load_lora_state_dict(lora_model.base_model, state)


def test_an_adapter_recorded_for_another_base_model_warns(tmp_path):
    import warnings

    source = _adapted()
    source.config._name_or_path = "org/model-a"
    source.save_adapter(tmp_path)
    other = tiny_llama()
    other.config._name_or_path = "org/model-b"
    with pytest.warns(UserWarning, match=rf"{ADAPTER_CONFIG} records base model 'org/model-a', but the model it is "
                                         r"loaded into is 'org/model-b'"):
        LoRAModel.from_pretrained(other, tmp_path)
    target = _adapted()
    target.config._name_or_path = "org/model-b"
    with pytest.warns(UserWarning, match="records base model 'org/model-a'"):
        target.load_adapter(tmp_path)
    # The same model under a local path, or a model that names none, loads without a word.
    for name in ("/cache/models/org/model-a/", ""):
        same = tiny_llama()
        same.config._name_or_path = name
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            LoRAModel.from_pretrained(same, tmp_path)


def test_the_root_of_a_multi_adapter_directory_names_its_adapters(tmp_path):
    _adapted().save_adapter(tmp_path / "sql")
    _adapted().save_adapter(tmp_path / "chat")
    (tmp_path / "logs").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no adapter_config.json; it holds adapters in the subfolders "
                                                r"chat, sql: pass one of those directories \(e\.g\. '.*chat'\)"):
        LoRAModel.from_pretrained(tiny_llama(), tmp_path)


def _save_killed_at_the_rename(directory):
    """Run a save of a TinyLlama adapter into `directory` in a process that SIGKILLs itself at the rename of the
    weights file, as the OOM killer or a scheduler would: no handler runs, its temporary file stays."""
    tests = os.path.dirname(os.path.abspath(__file__))
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {tests!r})
        from tiny_llama import build, lora_config
        from lorafuse import adapter_io
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        adapter_io.save_adapter(build(), {str(directory)!r}, config=lora_config())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_a_later_save_removes_the_temporary_files_of_a_killed_save(tmp_path):
    from tiny_llama import build, lora_config

    from lorafuse.atomic_files import TEMP_PREFIX

    _save_killed_at_the_rename(tmp_path)
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(TEMP_PREFIX + ADAPTER_WEIGHTS), left
    adapter_io.save_adapter(build(), tmp_path, config=lora_config())
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


@pytest.mark.skipif(os.name != "posix", reason="flock")
def test_a_save_leaves_the_temporary_file_of_a_save_still_running(tmp_path):
    import fcntl

    from lorafuse.atomic_files import TEMP_PREFIX

    running = tmp_path / f"{TEMP_PREFIX}{ADAPTER_WEIGHTS}.0123456789abcdef"
    with open(running, "wb") as writer:
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)  # held as a live writer holds it
        _adapted().save_adapter(tmp_path)
        assert running.exists()
    _adapted().save_adapter(tmp_path)  # its writer is gone now
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
