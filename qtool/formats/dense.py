"""A dense view of any checkpoint (packed compressed-tensors modules appear as their dequantized `.weight`), and the
`--dtype` choices of the jobs that write dense tensors."""
from __future__ import annotations

import math

import torch

from ..arch import FLOAT_DTYPES
from ..checkpoint import Checkpoint, TensorInfo
from ..errors import QtoolError
from ..quant.spec import QuantSpec
from . import compressed_tensors as ct

DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}  # --dtype choices


def dense_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A `--dtype` value (a name, a torch dtype or None) as a torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DENSE_DTYPES:
        raise QtoolError("--dtype", f"{dtype!r} is not one of {', '.join(DENSE_DTYPES)}")
    return DENSE_DTYPES[dtype]


def with_dtype(config: dict, dtype: torch.dtype | None) -> dict:
    """config.json with the dtype fields it has (torch_dtype, dtype) naming `dtype` (unchanged for None)."""
    if dtype is None:
        return dict(config)
    name = str(dtype).removeprefix("torch.")
    return {k: (name if k in ("torch_dtype", "dtype") else v) for k, v in config.items()}


class DenseView:
    """A checkpoint seen dense: a packed compressed-tensors module appears as its dequantized `<module>.weight`
    (in its scale's dtype, as transformers' `dequantize=True` gives it), every other tensor as stored. It reads like a
    Checkpoint (`tensors`, `get`, `config`, `path`, `root`), so code that walks a checkpoint walks a quantized one."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.config, self.path, self.root, self.is_folder = ckpt.config, ckpt.path, ckpt.root, ckpt.is_folder
        self.scheme = ct.detect(ckpt.config, ckpt.root / "config.json")
        modules = ct.packed_modules(ckpt.tensors) if self.scheme is not None else {}
        self.packed: dict[str, str] = {f"{m}.weight": m for m in modules}  # logical weight name → module
        self.stored: dict[str, list[str]] = {m: [f"{m}.{p}" for p in parts] for m, parts in modules.items()}
        hidden = {n for names in self.stored.values() for n in names}
        self.names = sorted([n for n in ckpt.tensors if n not in hidden] + list(self.packed))
        self._tensors: dict[str, TensorInfo] | None = None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Logical name → TensorInfo (a packed weight: its [out, in] shape, its dense dtype and bytes)."""
        if self._tensors is None:
            self._tensors = {n: self._info(n) for n in self.names}
        return self._tensors

    def _info(self, name: str) -> TensorInfo:
        if name not in self.packed:
            return self.ckpt.tensors[name]
        shape, dtype = self.shape(name), self.dtype(name)
        file = self.ckpt.tensors[f"{self.packed[name]}.{ct.PACKED}"].file
        return TensorInfo(name, shape, dtype, file, math.prod(shape) * dtype.itemsize)

    def is_packed(self, name: str) -> bool:
        return name in self.packed

    def is_floating(self, name: str) -> bool:
        return name in self.packed or self.ckpt.tensors[name].dtype in FLOAT_DTYPES

    def module(self, name: str) -> ct.PackedModule:
        """The packed module behind logical weight `name`, its parts checked against its config group's scheme."""
        module = self.packed[name]
        parts = {n.rpartition(".")[2]: self.ckpt.get(n) for n in self.stored[module]}
        return ct.PackedModule.from_parts(parts, self.spec(name), name=module)

    def spec(self, name: str) -> QuantSpec:
        """The scheme of packed weight `name` (its config group's)."""
        module = self.packed[name]
        spec = self.scheme.spec_for(module)
        if spec is None:
            raise QtoolError(module, "stores packed weights but no config group of quantization_config targets it")
        return spec

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self.packed:
            return self.module(name).dequantize(dtype)
        if name not in self.ckpt.tensors:
            raise QtoolError(self.ckpt.path, f"no tensor named {name!r}")
        t = self.ckpt.get(name)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.packed:
            return tuple(int(d) for d in self.ckpt.get(f"{self.packed[name]}.{ct.SHAPE}").tolist())
        return self.ckpt.tensors[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """Dense dtype: a packed weight decompresses to its scale's dtype."""
        if name in self.packed:
            scale = self.ckpt.tensors.get(f"{self.packed[name]}.{ct.SCALE}")
            if scale is None:
                raise QtoolError(self.packed[name], f"stores {ct.PACKED} but no {ct.SCALE}: the checkpoint is incomplete")
            return scale.dtype
        return self.ckpt.tensors[name].dtype
