"""LoRA on a whole model: `apply_lora` swaps targeted layers for FusedLoRALinear (FusedDoRALinear with
use_dora); `LoRAModel` wraps the result with merging, adapter files, a summary and a base-model-only mode."""

import contextlib
import os
import warnings
from typing import Iterator, List, Tuple

import torch
import torch.nn as nn

from . import adapter_io
from .adapter_fit import check_adapter_fits
from .config import LoRAConfig
from .dora_layer import FusedDoRALinear
from .layer import FusedLoRALinear
from .messages import listing
from .summary import LoRASummary, count_parameters, summarize
from .targeting import (
    extra_trainable_parameters,
    find_modules_to_save,
    find_targets,
    is_conv1d,
    lora_layers,
    pattern_value,
)


def _check_model(model) -> None:
    if isinstance(model, LoRAModel):
        raise TypeError("model is already a LoRAModel; pass its base_model, or keep using it as it is")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path), child, module)


def _warn_tied(model: nn.Module, targets: List[str]) -> None:
    owners = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for path in targets:
        names = owners.get(id(model.get_submodule(path).weight), [])
        if len(names) > 1:
            warnings.warn(f"{path}.weight is tied to {', '.join(n for n in names if n != path + '.weight')}: "
                          "merging the adapter changes all of them", stacklevel=3)


def _warn_hooks(model: nn.Module, targets: List[str]) -> None:
    hooked = []
    for path in targets:
        module = model.get_submodule(path)
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
        # accelerate's dispatch hooks replace forward on the instance: lost with the module as well.
        if any(hooks) or "forward" in vars(module):
            hooked.append(repr(path))
    if hooked:
        warnings.warn(f"{listing(hooked)} have hooks (forward, forward pre or backward) or a replaced forward, "
                      "which will not run: the FusedLoRALinear that replaces each is a new module. Register them "
                      "on the new layers after apply_lora", stacklevel=3)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Replace, in place, every layer `config` targets with a FusedLoRALinear (a FusedDoRALinear when
    `config.use_dora`) sharing its weight and bias, freeze everything else except what `config` trains (bias,
    modules_to_save), and return `model`.

    Raises ValueError for a config that matches nothing and TypeError for a target that is not exactly an
    nn.Linear or transformers Conv1D (a subclass would lose its own forward) or whose weight is not float16,
    bfloat16, float32 or float64. Warns when a target has hooks, which the new layer does not run. A model
    may hold one adapter: applying twice raises.
    """
    _check_model(model)
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRAConfig, got {type(config).__name__}")
    present = lora_layers(model)
    if present:
        raise ValueError(f"model already has {len(present)} FusedLoRALinear layers (e.g. {present[0][0]!r}); "
                         "lorafuse holds one adapter per model")
    targets = find_targets(model, config)
    find_modules_to_save(model, config, warn=True)  # fail on a bad name before anything changes
    _warn_tied(model, targets)
    _warn_hooks(model, targets)
    layer_class = FusedDoRALinear if config.use_dora else FusedLoRALinear
    for path in targets:
        module = model.get_submodule(path)
        options = {
            "r": pattern_value(config.rank_pattern, path, config.r, source=config.source),
            "lora_alpha": pattern_value(config.alpha_pattern, path, config.lora_alpha, field="alpha_pattern",
                                        source=config.source),
            "lora_dropout": config.lora_dropout,
            "use_rslora": config.use_rslora,
            "adapter_dtype": config.adapter_dtype,
        }
        wrap = layer_class.from_conv1d if is_conv1d(module) else layer_class.from_linear
        layer = wrap(module, **options)
        layer.train(module.training)
        _set_submodule(model, path, layer)
    freeze_base(model)
    for param in extra_trainable_parameters(model, config).values():
        param.requires_grad_(True)
    return model


def freeze_base(model: nn.Module) -> nn.Module:
    """Make only the adapter parameters of `model`'s FusedLoRALinear layers trainable (lora_A, lora_B and, in
    a FusedDoRALinear, lora_magnitude_vector)."""
    _check_model(model)
    adapter = {id(p) for p in lora_parameters(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in adapter)
    return model


def lora_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The adapter parameters of every FusedLoRALinear in `model` (lora_A, lora_B; DoRA layers add
    lora_magnitude_vector), for an optimizer."""
    return [p for _, layer in lora_layers(model) for p in layer.adapter_parameters()]


def _plain_layer(layer: FusedLoRALinear) -> nn.Module:
    """The layer type the FusedLoRALinear replaced, holding its (merged) weight and bias tensors."""
    # Built on the meta device, then given the layer's own tensors: no copy of the weight.
    with torch.device("meta"):
        if layer.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D  # only models that had a Conv1D get here

            plain = Conv1D(layer.out_features, layer.in_features)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = layer.weight
    plain.bias = layer.bias
    plain.train(layer.training)
    return plain


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its weight and put back the plain layer (nn.Linear, or Conv1D with its
    (in, out) weight), in place; returns `model`, which no longer holds any FusedLoRALinear."""
    _check_model(model)
    for path, layer in lora_layers(model):
        layer.merge()
        _set_submodule(model, path, _plain_layer(layer))
    return model


class LoRAModel(nn.Module):
    """A model with LoRA applied (`apply_lora`); calling it calls the model.

    Attributes it does not have are looked up on `base_model`, so `lora_model.config` or
    `lora_model.generate(...)` reach the wrapped transformers model.
    """

    def __init__(self, model: nn.Module, config: LoRAConfig):
        super().__init__()
        apply_lora(model, config)
        self.base_model = model
        self.lora_config = config
        # The values of trained non-LoRA parameters (biases, modules_to_save) before any training, so
        # that disable_adapter() can run the true base model. Not a buffer: not part of state_dict().
        self._base_values = [(p, p.detach().clone()) for p in extra_trainable_parameters(model, config).values()]

    @classmethod
    def from_pretrained(cls, model: nn.Module, path, *, is_trainable: bool = False) -> "LoRAModel":
        """Apply the adapter saved in directory `path` (by lorafuse or PEFT) to `model`, with its own config.
        Unless `is_trainable`, the model is put in eval mode (dropout off) and the adapter's parameters are
        frozen, as PEFT does for inference.

        The file's tensors are checked against the shapes its config gives (r, rank_pattern, each layer's
        features) before any layer is built, so a config that disagrees with them fails at once, naming
        the file, the key and both shapes."""
        _check_model(model)
        file_config, state_dict = adapter_io.read_adapter(path)
        check_adapter_fits(model, file_config, state_dict,
                           source=os.path.join(os.fspath(path), adapter_io.ADAPTER_WEIGHTS))
        lora_model = cls(model, file_config)
        adapter_io.load_adapter_state(lora_model.base_model, file_config, state_dict, config=file_config)
        if not is_trainable:
            lora_model.eval()
            for param in lora_model.trainable_parameters():
                param.requires_grad_(False)
        return lora_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":  # not set yet: do not recurse
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def lora_layers(self):
        """(path, FusedLoRALinear) pairs, paths relative to base_model."""
        return lora_layers(self.base_model)

    def trainable_parameters(self) -> List[nn.Parameter]:
        """The parameters that require grad: the adapters, plus trained biases and modules_to_save."""
        return [p for p in self.parameters() if p.requires_grad]

    def summary(self) -> LoRASummary:
        """The adapted modules (r, alpha, parameters) and trainable / total counts; str() gives a table."""
        return summarize(self.base_model)

    def print_summary(self, *, file=None) -> None:
        print(self.summary(), file=file)

    def get_nb_trainable_parameters(self) -> Tuple[int, int]:
        """(trainable, total) parameter counts, as PEFT's method of this name gives them."""
        counts = count_parameters(self)
        return counts.trainable, counts.total

    def print_trainable_parameters(self, *, file=None) -> None:
        """PEFT's one-line summary: "trainable params: X || all params: Y || trainable%: Z"."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
              f"{100 * trainable / total:.4f}", file=file)

    def merge(self) -> "LoRAModel":
        """Fold every adapter into its base weight (faster inference; unmerge() before training again)."""
        for _, layer in self.lora_layers():
            layer.merge()
        return self

    def unmerge(self) -> "LoRAModel":
        for _, layer in self.lora_layers():
            layer.unmerge()
        return self

    def merge_and_unload(self) -> nn.Module:
        """The base model with every adapter merged into plain nn.Linear / Conv1D layers."""
        return merge_and_unload(self.base_model)

    def save_adapter(self, path) -> None:
        """Write adapter_config.json and adapter_model.safetensors (PEFT's layout) into directory `path`."""
        adapter_io.save_adapter(self.base_model, path, config=self.lora_config)

    def save_pretrained(self, save_directory, *, safe_serialization: bool = True) -> None:
        """PEFT's meaning: save the adapter alone (save_adapter), not the base model, whose save_pretrained
        this would otherwise reach through attribute lookup. Only safetensors are written."""
        if safe_serialization is not True:
            raise ValueError(f"safe_serialization={safe_serialization!r}: lorafuse writes adapters as safetensors "
                             "only (pickle files can run code when loaded)")
        self.save_adapter(save_directory)

    def load_adapter(self, path) -> None:
        """Load an adapter written by save_adapter or PEFT's save_pretrained into this model's layers."""
        adapter_io.load_adapter(self.base_model, path, config=self.lora_config)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator["LoRAModel"]:
        """Run the base model alone inside the block: adapters off (merged ones taken out of the weight)
        and trained biases / modules_to_save back at their original values; all restored on exit."""
        layers = [layer for _, layer in self.lora_layers()]
        states = [(layer.merged, layer.adapter_enabled) for layer in layers]
        trained = [(param, param.detach().clone()) for param, _ in self._base_values]
        with torch.no_grad():
            for layer in layers:
                layer.unmerge()
                layer.adapter_enabled = False
            for param, value in self._base_values:
                param.copy_(value)
        try:
            yield self
        finally:
            with torch.no_grad():
                for param, value in trained:
                    param.copy_(value)
                for layer, (merged, enabled) in zip(layers, states):
                    layer.adapter_enabled = enabled
                    if merged:
                        layer.merge()


def get_lora_model(model: nn.Module, config: LoRAConfig) -> LoRAModel:
    """Apply `config` to `model` in place (see apply_lora) and wrap it in a LoRAModel."""
    return LoRAModel(model, config)
