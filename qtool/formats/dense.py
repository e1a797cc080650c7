"""A dense view of any checkpoint: packed compressed-tensors modules appear as their dequantized `.weight`."""
from __future__ import annotations

import torch

from ..arch import FLOAT_DTYPES
from ..checkpoint import Checkpoint
from ..errors import QtoolError
from . import compressed_tensors as ct

DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # --dtype choices


def dense_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A `--dtype` value (a name, a torch dtype or None) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DENSE_DTYPES:
        raise QtoolError("--dtype", f"{dtype!r} is not one of {', '.join(DENSE_DTYPES)}")
    return DENSE_DTYPES[dtype]


class DenseView:
    """`names` are logical tensor names; `get(name)` returns the dense tensor (decompressed when packed)."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        qcfg = (ckpt.config or {}).get("quantization_config")
        self.spec = None
        self.packed: dict[str, str] = {}  # logical weight name → module prefix
        if qcfg and qcfg.get("quant_method") == "compressed-tensors":
            self.spec = ct.spec_from_config(qcfg, path=ckpt.root / "config.json")[0]
            for name in ckpt.tensors:
                if name.endswith(".weight_packed"):
                    module = name[: -len(".weight_packed")]
                    self.packed[f"{module}.weight"] = module
        hidden = {f"{m}.{p}" for m in self.packed.values() for p in ct.PARAM_NAMES}
        self.names = sorted([n for n in ckpt.tensors if n not in hidden] + list(self.packed))

    def is_packed(self, name: str) -> bool:
        return name in self.packed

    def is_floating(self, name: str) -> bool:
        return name in self.packed or self.ckpt.tensors[name].dtype in FLOAT_DTYPES

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of a packed weight, by local name (weight_packed, weight_scale, ...)."""
        module = self.packed[name]
        return {p: self.ckpt.get(f"{module}.{p}") for p in ct.PARAM_NAMES if f"{module}.{p}" in self.ckpt.tensors}

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self.packed:
            return ct.decompress(self.parts(name), self.spec, dtype=dtype, name=self.packed[name])
        if name not in self.ckpt.tensors:
            raise QtoolError(self.ckpt.path, f"no tensor named {name!r}")
        t = self.ckpt.get(name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.packed:
            return tuple(int(d) for d in self.ckpt.get(f"{self.packed[name]}.weight_shape").tolist())
        return self.ckpt.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """Dense dtype: a packed weight decompresses to its scale's dtype."""
        if name in self.packed:
            return self.ckpt.tensors[f"{self.packed[name]}.weight_scale"].dtype
        return self.ckpt.tensors[name].dtype
