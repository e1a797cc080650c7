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
