"""Scales and zero points of a weight by a data-free method, on the active backend: min-max (`rtn`, compressed-tensors'
own rule) or the mse clipping search (qtool.quant.search), importance-weighted when calibration statistics exist."""
from __future__ import annotations

import torch

from . import search
from .backend import active
from .core import check_shape, dequantize, qparams_from_minmax, quantize, scale_dtype_for
from .spec import QuantSpec
from ..errors import ArgumentError


def minmax_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scales and zero points as CT/llm-compressor compute them for a 2-D [out, in] weight.

    scale: spec.scale_shape(out, in); dtype = w's dtype (fp16/bf16/fp32/fp64, else fp16). zero_point: int8 of the
    same shape, or None when symmetric.
    """
    check_shape(w, spec)
    w = w.to(scale_dtype_for(w.dtype))
    mn, mx = active().group_minmax(w, spec)
    return qparams_from_minmax(mn, mx, spec)


def mse_qparams(
    w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) that minimise the importance-weighted squared error per group.

    Same shapes and dtypes as minmax_qparams; never worse than min-max on any group.
    """
    check_shape(w, spec)
    w = w.to(scale_dtype_for(w.dtype))
    backend = active()
    mn, mx = backend.group_minmax(w, spec)
    scale, zp = qparams_from_minmax(mn, mx, spec)
    if spec.strategy == "tensor":
        return search.tensor_search(w, spec, importance, scale, zp)
    weights = search.importance_weights(importance, w.shape[1], w.device)
    return backend.mse_search(w, spec, weights, mn, mx, scale, zp)


def choose_qparams(w: torch.Tensor, spec: QuantSpec, method: str | None = None,
                   importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points by a data-free method (default: the spec's): rtn → min-max, mse → the search."""
    method = method or spec.method
    if method == "rtn":
        return minmax_qparams(w, spec)
    if method == "mse":
        return mse_qparams(w, spec, importance=importance)
    raise ArgumentError("method", f"{method!r} scales need more than the weight (gptq: use gptq_quantize)")


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Min-max quantize then dequantize, in w's dtype."""
    scale, zp = minmax_qparams(w, spec)
    return dequantize(quantize(w, scale, zp, spec), scale, zp, spec, dtype=w.dtype)
