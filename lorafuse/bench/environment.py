"""Where a benchmark ran: device, library versions, git commit and date, so any result can be traced."""

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from .. import __version__, torch_backend
from ..dispatch import select_backend


def lorafuse_backend(device) -> str:
    """Which path FusedLoRALinear takes on `device`: "triton", "triton-interpreter" or "pytorch"."""
    backend = select_backend(torch.empty(0, device=device))
    if backend is torch_backend:
        return "pytorch"
    return "triton-interpreter" if getattr(backend, "INTERPRETED", False) else "triton"


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"CPU {processor} ({torch.get_num_threads()} threads)"


def _version(package) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


#: The directory holding the lorafuse package: the root of a lorafuse checkout.
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _git(*args) -> Optional[str]:
    """`git args` run in lorafuse's source directory; None outside a checkout or without git."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _in_own_checkout() -> bool:
    """Whether lorafuse runs from its own git checkout. An installed copy can sit inside some other repository
    (a virtual environment in a project's tree), whose commit says nothing about lorafuse's code."""
    toplevel = _git("rev-parse", "--show-toplevel")
    return toplevel is not None and Path(toplevel).resolve() == _SOURCE_ROOT


def describe(device) -> dict:
    """The environment record written beside every measurement. git_commit and git_dirty are None unless
    lorafuse runs from its own checkout."""
    own = _in_own_checkout()
    status = _git("status", "--porcelain", "--untracked-files=no") if own else None
    return {
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "lorafuse_backend": lorafuse_backend(device),
        "lorafuse": __version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD") if own else None,
        # Local changes make the commit an approximation of the code that ran.
        "git_dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": {name: os.environ[name] for name in ("LORAFUSE_BACKEND", "TRITON_INTERPRET") if name in os.environ},
    }
