"""Pick the torch device calibration runs on: `auto`, `cpu`, `cuda` or `cuda:i`.

Asking for cuda where there is none is an error, never a silent fallback to cpu.
"""
from __future__ import annotations

import re

import torch

from ..errors import QtoolError

_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = _CUDA.match(name)
    if m is None:
        raise QtoolError("--device", f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise QtoolError("--device", f"{name} was asked for but torch sees no cuda device (torch {torch.__version__})")
    index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise QtoolError("--device", f"{name} was asked for but only {count} cuda device(s) exist")
    return torch.device("cuda", index)


def _libc_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_host_memory() -> None:
    """Hand freed heap pages back to the OS after a block: glibc keeps them otherwise, and a walk that frees a
    layer's Hessians and weights each block would see its resident memory creep up layer after layer."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
