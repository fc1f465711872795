"""Which fields of a PEFT adapter_config.json lorafuse implements, and with which values.

An allow-list: PEFT adds LoRA options every release, and many of them change the base weight or the forward
(PiSSA and OLoRA rewrite W, KaSA and VeLoRA change the adapter's math). DoRA (use_dora) is implemented: its
layers are FusedDoRALinear. Loaded as plain
LoRA, such an adapter gives other outputs without a word. So a field that is not listed here is accepted
only while it is off (None, False, or an empty list, dict or string: how PEFT writes an unused option),
and next year's option is refused by name instead of silently ignored.
"""

from typing import List

from .messages import listing

#: Fields that `config_from_adapter_dict` turns into LoRAConfig fields, which check their values.
IMPLEMENTED = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
               "layers_pattern", "use_rslora", "bias", "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora")

#: Fields that do not change what a loaded adapter computes, whatever their value, and why.
NO_EFFECT = {
    "peft_type": "checked on its own: LORA",
    "task_type": "picks PEFT's wrapper class; a classifier head it trains is listed in modules_to_save",
    "base_model_name_or_path": "a record (lorafuse warns when it names another model)",
    "revision": "a record of the base model's revision",
    "auto_mapping": "a record of the base model's class",
    "peft_version": "a record",
    "inference_mode": "whether PEFT froze the adapter when saving",
    "runtime_config": "run-time options of PEFT (GPU offloading), not saved by PEFT itself",
    "fan_in_fan_out": "PEFT sets it from each layer's type, as lorafuse does: True for Conv1D, False for nn.Linear",
    "qalora_group_size": "read only when use_qalora is on",
    "megatron_core": "read only when megatron_config is set",
}

#: init_lora_weights values that only choose the adapter's first values, which the saved tensors replace.
PLAIN_INITS = (True, False, "gaussian", "orthogonal")

#: What a known option does when it is on, for the message that refuses it.
REFUSED = {
    "init_lora_weights": "PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base weight (PEFT redoes it on loading), "
                         "MiCA freezes B, EVA derives A from data",
    "lora_bias": "a trained bias on lora_B",
    "use_qalora": "QALoRA pools the input in groups",
    "use_bdlora": "block-diagonal adapters",
    "layer_replication": "repeats base layers",
    "trainable_token_indices": "trains rows of the embedding",
    "alora_invocation_tokens": "activated LoRA runs the adapter after invocation tokens only",
    "target_parameters": "adapts parameters (MoE experts) instead of linear layers",
    "ensure_weight_tying": "ties the adapters of tied modules",
    "megatron_config": "PEFT's own Megatron layers (lorafuse.integrations.megatron adapts Megatron models)",
    "arrow_config": "routes between several adapters",
    "kasa_config": "KaSA changes the adapter's forward",
    "velora_config": "VeLoRA changes the adapter's forward",
    "monteclora_config": "MonteCLoRA samples the adapter",
    "loftq_config": "settings of LoftQ, which quantizes and rewrites the base weight",
    "eva_config": "settings of EVA initialisation",
    "corda_config": "settings of CorDA, which rewrites the base weight",
    "lora_ga_config": "settings of LoRA-GA, which rewrites the base weight",
}


def is_off(value) -> bool:
    """How PEFT writes an option that is not used: None, False, or an empty list, dict or string."""
    return value is None or value is False or (isinstance(value, (list, dict, str)) and not value)


def _brief(value) -> str:
    # A value from a file can be any size: show its start.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_plain_init(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, str) and value in PLAIN_INITS)


def unsupported_fields(data: dict) -> List[str]:
    """`field=value (why)` for every field of an adapter config dict that lorafuse does not implement."""
    found = []
    for name, value in data.items():
        if name in IMPLEMENTED or name in NO_EFFECT:
            continue
        if name == "init_lora_weights":
            if not _is_plain_init(value):
                found.append(f"init_lora_weights={_brief(value)} ({REFUSED[name]}; lorafuse loads adapters whose "
                             f"init_lora_weights is one of {', '.join(map(repr, PLAIN_INITS))})")
        elif not is_off(value):
            why = REFUSED.get(name, "an option lorafuse does not know, perhaps from a newer PEFT")
            found.append(f"{name[:60]}={_brief(value)} ({why})")
    return found


def check_peft_fields(data: dict, *, source: str) -> None:
    """ValueError naming `source` and every field of `data` (an adapter_config.json) lorafuse does not implement."""
    found = unsupported_fields(data)
    if found:
        raise ValueError(f"{source} uses PEFT options that lorafuse does not implement, so loading it as plain LoRA "
                         f"would give other outputs: {listing(found, separator='; ')}")
