"""PEFT adapter options: those lorafuse implements load, any other that is on is refused by name (an allow-list)."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import logits, tiny_llama, token_batch

from lorafuse import LoRAModel, read_adapter_config
from lorafuse.adapter_io import ADAPTER_CONFIG, config_from_adapter_dict

SOURCE = "somewhere/adapter_config.json"
BASE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_inits_that_rewrite_the_base_weight_are_refused(tmp_path, init):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=init))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG} uses PEFT options that lorafuse does not implement.*"
                                         rf"init_lora_weights='{init}' \(PiSSA, OLoRA"):
        LoRAModel.from_pretrained(tiny_llama(), tmp_path)

    # Why: PEFT's reload rewrites the base weight again, so the same tensors loaded as plain LoRA differ.
    config_file = tmp_path / ADAPTER_CONFIG
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), init_lora_weights=True)))
    tokens = token_batch()
    with torch.no_grad():
        as_plain_lora = logits(LoRAModel.from_pretrained(tiny_llama(), tmp_path)(tokens))
        assert (as_plain_lora - logits(peft_model(input_ids=tokens))).abs().max() > 1e-2


@pytest.mark.parametrize(("field", "value"), [
    ("init_lora_weights", "corda"),
    ("init_lora_weights", "loftq"),
    ("init_lora_weights", "eva"),
    ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "mica"),
    ("init_lora_weights", 1.5),
    ("kasa_config", {"rank": 4}),
    ("velora_config", {"rank": 2}),
    ("monteclora_config", {"num_samples": 4}),
    ("loftq_config", {"loftq_bits": 4}),
    ("lora_bias", True),
    ("target_parameters", ["experts.gate_up_proj"]),
    ("a_peft_option_from_next_year", 3),
    ("a_peft_option_from_next_year", {"enabled": True}),
])
def test_options_lorafuse_does_not_implement_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=rf"{SOURCE} uses PEFT options .*: {field}="):
        config_from_adapter_dict({**BASE, field: value}, source=SOURCE)


@pytest.mark.parametrize(("field", "value"), [
    ("init_lora_weights", True),
    ("init_lora_weights", False),
    ("init_lora_weights", "gaussian"),
    ("init_lora_weights", "orthogonal"),
    ("fan_in_fan_out", True),
    ("qalora_group_size", 64),
    ("task_type", "SEQ_CLS"),
    ("a_peft_option_from_next_year", None),
    ("a_peft_option_from_next_year", False),
    ("a_peft_option_from_next_year", []),
    ("a_peft_option_from_next_year", {}),
])
def test_options_that_do_not_change_the_adapter_load(field, value):
    config = config_from_adapter_dict({**BASE, field: value}, source=SOURCE)
    assert config.r == 4 and config.target_modules == ("q_proj",)


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), (None, False)])
def test_use_dora_is_implemented(value, expected):
    # PEFT writes false when DoRA is off; null is read as off too, like every other unused option.
    assert config_from_adapter_dict({**BASE, "use_dora": value}, source=SOURCE).use_dora is expected


def test_every_option_refused_at_once_and_a_huge_value_shown_short():
    with pytest.raises(ValueError, match=r"lora_bias=True \(a .*; kasa_config=\{'x': 'aaaa.*\.\.\. \(KaSA") as error:
        config_from_adapter_dict({**BASE, "lora_bias": True, "kasa_config": {"x": "a" * 10**6}}, source=SOURCE)
    assert len(str(error.value)) < 600


def test_peft_default_config_is_accepted(tmp_path):
    # Every field the installed PEFT writes, at its defaults: a new PEFT option that is on by default fails here.
    LoraConfig(r=4, target_modules=["q_proj"]).save_pretrained(tmp_path)
    written = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert "init_lora_weights" in written and "kasa_config" in written
    assert read_adapter_config(tmp_path).target_modules == ("q_proj",)
