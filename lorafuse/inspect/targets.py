"""The GPUs lorafuse's kernels are compiled for without one, and the stand-in driver that names them.

Triton compiles for whatever `triton.runtime.driver.active.get_current_target()` says. `compiling_for(arch)`
swaps in a driver that only names the target, so `JITFunction.warmup` runs Triton's real JIT path (the same
argument specialisation as a launch, the same compiler passes, ptxas or the AMD linker) on a machine with no
GPU. Nothing is launched.
"""

import contextlib
import dataclasses

import torch

#: The targets the kernels are checked on, and what each stands for.
ARCHS = {
    "sm_80": ("cuda", 80, 32, "NVIDIA A100 (Ampere)"),
    "sm_90": ("cuda", 90, 32, "NVIDIA H100 (Hopper)"),
    "sm_100": ("cuda", 100, 32, "NVIDIA B200 (Blackwell)"),
    "gfx942": ("hip", "gfx942", 64, "AMD MI300X (CDNA3)"),
}


def gpu_target(arch: str):
    """Triton's `GPUTarget` for `arch`; an unknown arch is refused by name."""
    from triton.backends.compiler import GPUTarget

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    backend, number, warp_size, _ = ARCHS[arch]
    return GPUTarget(backend, number, warp_size)


@dataclasses.dataclass
class StandInDriver:
    """A Triton driver that names a target and launches nothing (compile-only)."""

    target: object
    device_id: int

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Each target gets its own device id: Triton caches its binder (and so the target) per device.
        return self.device_id

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def is_active(self):
        return True

    def get_benchmarker(self):
        raise RuntimeError("compile-only stand-in driver: nothing can be timed")


@contextlib.contextmanager
def compiling_for(arch: str):
    """Make Triton compile for `arch` inside the block (see the module docstring)."""
    from triton.runtime import driver

    target = gpu_target(arch)
    # No real driver may exist here (no GPU): restore the slot as it was, set or not, without reading
    # `driver.active`, which would create the default driver. Triton >= 3.3 keeps it in `_active` (None until
    # used); Triton 3.2 in `active` (a lazy proxy that creates the driver only when an attribute is read).
    slot = "_active" if hasattr(driver, "_active") else "active"
    previous = getattr(driver, slot)
    driver.set_active(StandInDriver(target, device_id=1000 + list(ARCHS).index(arch)))
    try:
        yield target
    finally:
        setattr(driver, slot, previous)
