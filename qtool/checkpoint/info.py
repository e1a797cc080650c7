"""What a reader knows about one stored tensor before reading it (its own module: every file reader builds them)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)
