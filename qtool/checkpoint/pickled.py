"""PyTorch pickled checkpoints (.bin/.pt), loaded only as plain tensors.

`torch.load(weights_only=True)` refuses any pickle that would build objects other than tensors and plain
containers, so a malicious file cannot run code; `mmap=True` keeps tensor data on disk until it is touched.
Whatever else a file under a checkpoint's name holds (text, a truncated archive, another pickle) is one error
naming it; the message never suggests loading it less safely.
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import QtoolError
from .info import TensorInfo

_PICKLE_PROTO = 0x80  # first byte of a protocol-2+ pickle (torch's legacy, non-zip format)


class PickledFile:
    def __init__(self, path: Path):
        self.path = path
        self._state = self._load()

    def _load(self) -> dict[str, torch.Tensor]:
        try:
            with open(self.path, "rb") as f:
                head = f.read(4)
        except OSError as e:
            raise QtoolError(self.path, f"cannot read: {e.strerror or e}") from None
        is_zip = zipfile.is_zipfile(self.path)  # only the zip format can be memory-mapped
        if not is_zip and not head.startswith(bytes([_PICKLE_PROTO])):
            raise QtoolError(self.path, "not a PyTorch checkpoint: neither torch's zip archive nor a pickle")
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr: the error says enough
                warnings.simplefilter("ignore")
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as e:
            raise QtoolError(self.path, f"refusing to load: not a plain tensor checkpoint ({_refusal(e)})") from None
        except Exception as e:  # torch.load's errors for a damaged file vary (RuntimeError, KeyError, EOFError...)
            raise QtoolError(self.path, f"not a readable PyTorch checkpoint ({_summary(e)})") from None
        if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise QtoolError(self.path, f"not a state dict: the file holds a {type(obj).__name__}")
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise QtoolError(self.path, f"not a plain state dict: entry {str(k)[:60]!r} is a {type(v).__name__}, not a tensor")
        return dict(sorted(obj.items()))

    def infos(self) -> Iterator[TensorInfo]:
        for name, t in self._state.items():
            yield TensorInfo(name, tuple(t.shape), t.dtype, self.path, t.numel() * t.element_size())

    def get(self, name: str) -> torch.Tensor:
        # Tied weights share storage in a pickle; clone so callers own an independent, contiguous tensor.
        return self._state[name].contiguous().clone()


def _refusal(e: Exception) -> str:
    """What the pickle asked for (torch names the unsupported global), without torch's advice to load it unsafely."""
    for line in str(e).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip()[:200]
    return "it builds objects other than tensors"


def _summary(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = lines[0][:200] if lines and "weights_only" not in lines[0] else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
