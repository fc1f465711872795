"""Which launchers serve a tensor: the Triton kernels or the PyTorch path."""

import functools
import os

import torch

from . import torch_backend


@functools.cache
def _kernels():
    """`lorafuse.kernels`, or None where Triton cannot be imported. Any other import error inside the
    kernels is a bug and is raised, not hidden behind the slower PyTorch path."""
    try:
        from . import kernels
    except ImportError as err:
        if err.name is None or not (err.name == "triton" or err.name.startswith("triton.")):
            raise
        return None
    return kernels


def select_backend(x: torch.Tensor):
    """The launchers for x's device: Triton kernels on CUDA, or on CPU when TRITON_INTERPRET=1 was set
    before lorafuse.kernels was imported; the PyTorch path otherwise. LORAFUSE_BACKEND=torch forces
    the PyTorch path (for comparison and debugging)."""
    if os.environ.get("LORAFUSE_BACKEND", "") == "torch":
        return torch_backend
    kernels = _kernels()
    if kernels is not None and (x.is_cuda or (x.device.type == "cpu" and kernels.INTERPRETED)):
        return kernels
    return torch_backend
