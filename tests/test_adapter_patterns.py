"""Regular expressions from adapter files (target_modules, rank_pattern keys, ...) are matched with a time
bound: a pattern that `re` would backtrack on for minutes fails or matches at once, naming the file.

The loads run in a subprocess with a time limit, so that a regression hangs nothing but that process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from tiny_llama import TinyLlama

from lorafuse import LoRAConfig, apply_lora, lora_state_dict
from lorafuse.adapter_io import ADAPTER_CONFIG, adapter_config_dict, write_adapter_files
from lorafuse.patterns import MATCH_SECONDS, full_match, suffix_match

#: The pattern from the issue: Python's `re` did not finish matching it against a module path in 60 s.
NESTED_STARS = "(.*.*.*.*.*.*.*.*.*.*.*.*)*Z"
#: Exponential for `regex` as well: every split of the path into 1- to 4-character runs, and then no match.
ALL_SPLITS = r"(?:[\w.]|[\w.]{2}|[\w.]{3}|[\w.]{4})*(?!)"

TESTS = os.path.dirname(os.path.abspath(__file__))


def _write_adapter(directory, **config_fields):
    """A TinyLlama q_proj/v_proj adapter (r=4) whose adapter_config.json has `config_fields` replaced."""
    model = apply_lora(TinyLlama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    write_adapter_files(directory, lora_state_dict(model), {**adapter_config_dict(model, LoRAConfig(r=4)),
                                                           **config_fields})
    return str(directory / ADAPTER_CONFIG)


def _load_in_subprocess(directory):
    """What LoRAModel.from_pretrained(TinyLlama(), directory) does, from a fresh process with a time limit:
    "loaded r=..." or the ValueError's message."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {TESTS!r})
        from tiny_llama import TinyLlama
        from lorafuse import LoRAModel
        try:
            model = LoRAModel.from_pretrained(TinyLlama(), {str(directory)!r})
        except ValueError as err:
            print("ValueError:", err)
        else:
            print("loaded r=" + ",".join(str(layer.r) for _, layer in model.lora_layers()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LORAFUSE_BACKEND": "torch"})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slow
def test_patterns_from_files_match_at_once_or_are_refused_naming_the_file(tmp_path):
    nested_target = _write_adapter(tmp_path / "a", target_modules=NESTED_STARS)
    _write_adapter(tmp_path / "b", rank_pattern={NESTED_STARS: 2})
    exponential_key = _write_adapter(tmp_path / "c", rank_pattern={ALL_SPLITS: 2})
    script_runs = [_load_in_subprocess(tmp_path / name) for name in ("a", "b", "c")]

    # No module path ends in Z: the pattern matches nothing, and says so at once.
    assert script_runs[0].startswith(f"ValueError: target_modules={NESTED_STARS!r} (from {nested_target}) matched "
                                     "no adaptable module")
    # A rank_pattern key that matches nothing leaves every layer at r.
    assert script_runs[1] == "loaded r=" + ",".join(["4"] * 4)
    assert script_runs[2].startswith(f"ValueError: rank_pattern key {ALL_SPLITS!r} from {exponential_key} took more "
                                     f"than {MATCH_SECONDS} s to match the module path 'layers.0.self_attn.q_proj'")


def test_bounded_matching_follows_peft_rules():
    assert full_match(r".*\.h\.1\.mlp\.c_(fc|proj)", "transformer.h.1.mlp.c_fc", field="target_modules")
    assert not full_match(r"h\.1\.mlp\.c_fc", "transformer.h.1.mlp.c_fc", field="target_modules")
    assert suffix_match("q_proj", "model.layers.0.self_attn.q_proj", field="rank_pattern key")
    assert not suffix_match("proj", "model.layers.0.self_attn.q_proj", field="rank_pattern key")
    with pytest.raises(ValueError, match=r"rank_pattern key 'a\(' from x.json is not a valid regular expression"):
        suffix_match("a(", "a", field="rank_pattern key", source="x.json")


def test_a_config_file_with_a_broken_pattern_names_the_file(tmp_path):
    from lorafuse import read_adapter_config

    config_file = _write_adapter(tmp_path, exclude_modules="(unclosed")
    with pytest.raises(ValueError, match=rf"{ADAPTER_CONFIG}: exclude_modules '\(unclosed' is not a valid regular"):
        read_adapter_config(tmp_path)
    assert json.loads(open(config_file).read())["exclude_modules"] == "(unclosed"
