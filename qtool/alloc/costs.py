"""What a scheme costs: the bytes a weight takes when stored under it, from compressed-tensors' layout (nothing is
quantized to know it). `--target-bits` counts codes, scales and zero points (a module's `weight_shape` is
bookkeeping); `--max-size` counts every byte of the output."""
from __future__ import annotations

import math

import torch

from ..formats import compressed_tensors as ct
from ..quant.core import scale_dtype_for
from ..quant.spec import QuantSpec

def parts(shape, dtype: torch.dtype, spec: QuantSpec | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(local name, shape, dtype) of the tensors a weight of `shape` and `dtype` is stored as under `spec` (None:
    the dense weight itself)."""
    if spec is None:
        return [("weight", tuple(shape), dtype)]
    return [(local, tuple(s), d) for local, (s, d) in ct.layout(shape, spec, scale_dtype_for(dtype)).items()]


def weight_bytes(shape, dtype: torch.dtype, spec: QuantSpec | None) -> int:
    """Bytes of codes, scales and zero points (what --target-bits averages), or of the dense weight."""
    return sum(math.prod(s) * d.itemsize for name, s, d in parts(shape, dtype, spec) if name != ct.SHAPE)


def stored_bytes(shape, dtype: torch.dtype, spec: QuantSpec | None) -> int:
    """Bytes of every tensor stored for the weight (weight_shape included)."""
    return sum(math.prod(s) * d.itemsize for _, s, d in parts(shape, dtype, spec))


def fits(shape, spec: QuantSpec | None) -> bool:
    """Whether a weight's input width splits into the spec's groups."""
    return spec is None or spec.group_size <= 0 or int(shape[1]) % spec.group_size == 0
