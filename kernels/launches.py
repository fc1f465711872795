"""What a launcher launches, as data: `Launch` names a kernel, its arguments and its autotune space.

The launchers build their launches with `forward_launches` / `backward_launches` and run them with `run`.
The compile-only inspection (`lorafuse.inspect`) builds the very same list from CPU tensors of the real
shapes and compiles every config the autotuner would try for a chosen GPU, so what it reports is what a
user's GPU compiles, not a copy that could drift.
"""

import dataclasses
from typing import Callable

import triton

from .common import device_guard, is_interpreted


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch.

    name: a short label ("forward_xa", "forward", "backward_dy", "backward_dx").
    kernel: the @triton.jit function. args: its positional arguments (tensors and scalars).
    meta: the constexpr meta-parameters the problem fixes (HAS_BIAS, BLOCK_R, ...); the tile sizes come
    from a config. grid: config kwargs -> launch grid. configs: the GPU autotune space, before pruning;
    prune: `early_config_prune(configs, named_args, **meta)`, which drops configs the current target cannot
    fit. key / reset_to_zero: as for `triton.autotune`. interpreter_config: the tile sizes used under
    Triton's interpreter, which cannot autotune.
    """

    name: str
    kernel: object
    args: tuple
    meta: dict
    grid: Callable[[dict], tuple]
    configs: tuple
    prune: Callable
    key: tuple
    interpreter_config: dict
    reset_to_zero: tuple = ()

    def named_args(self) -> dict:
        """The positional arguments by the kernel's parameter names."""
        return dict(zip(self.kernel.arg_names, self.args))

    def candidate_configs(self) -> list:
        """The configs the autotuner would time on the active target: `configs` after `prune`."""
        return self.prune(list(self.configs), self.named_args(), **self.meta)


_AUTOTUNED = {}


def _autotuned(launch: Launch):
    """The autotuned kernel for `launch.name`, built on first GPU use (autotuning needs a GPU driver)."""
    tuned = _AUTOTUNED.get(launch.name)
    if tuned is None:
        tuned = triton.autotune(configs=list(launch.configs), key=list(launch.key),
                                reset_to_zero=list(launch.reset_to_zero) or None,
                                prune_configs_by={"early_config_prune": launch.prune})(launch.kernel)
        _AUTOTUNED[launch.name] = tuned
    return tuned


def run(launch: Launch, device_tensor) -> None:
    """Launch on `device_tensor`'s device: a fixed config under the interpreter, autotuned on a GPU."""
    if is_interpreted(launch.kernel):
        config = launch.interpreter_config
        launch.kernel[launch.grid(config)](*launch.args, **launch.meta, **config)
    else:
        with device_guard(device_tensor):
            _autotuned(launch)[launch.grid](*launch.args, **launch.meta)
