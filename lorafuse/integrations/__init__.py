"""Hooks into other training frameworks. Each lives in its own module and is imported on demand:

- `lorafuse.integrations.megatron`: `apply_lora_to_megatron_model` for Megatron-Core's tensor-parallel linears.
"""
