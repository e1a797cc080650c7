"""PyTorch pickled checkpoints (.bin/.pt), loaded only as plain tensors.

`torch.load(weights_only=True)` refuses any pickle that would build objects other than tensors and plain
containers, so a malicious file cannot run code; `mmap=True` keeps tensor data on disk until it is touched.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import QtoolError
from .info import TensorInfo


class PickledFile:
    def __init__(self, path: Path):
        self.path = path
        self._state = self._load()

    def _load(self) -> dict[str, torch.Tensor]:
        mmap = zipfile.is_zipfile(self.path)  # only the zip format can be memory-mapped
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
            raise QtoolError(self.path, f"refusing to load: not a plain tensor checkpoint ({first[:200]})") from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QtoolError(self.path, f"not a readable PyTorch checkpoint ({msg[:200]})") from None
        if isinstance(obj, dict) and set(obj) == {"state_dict"} and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise QtoolError(self.path, f"not a state dict: the file holds a {type(obj).__name__}")
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise QtoolError(self.path, f"not a plain state dict: entry {k!r} is a {type(v).__name__}, not a tensor")
        return dict(sorted(obj.items()))

    def infos(self) -> Iterator[TensorInfo]:
        for name, t in self._state.items():
            yield TensorInfo(name, tuple(t.shape), t.dtype, self.path, t.numel() * t.element_size())

    def get(self, name: str) -> torch.Tensor:
        # Tied weights share storage in a pickle; clone so callers own an independent, contiguous tensor.
        return self._state[name].contiguous().clone()
