"""Quantize one weight: the single entry every caller uses (the quantize job, the calibrated layer walk, merge's
requantization, QuantLinear.from_linear). The method is the spec's: rtn (min-max), mse (the clipping search, weighted
by `importance` when given) or gptq (error compensation with the input Hessian `hessian`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import search
from .backend import active
from .core import check_shape, dequantize, error_stats
from .gptq import gptq_quantize
from .pack import pack_int32, unpack_int32
from .qparams import choose_qparams
from .spec import QuantSpec
from ..errors import ArgumentError

GPTQ_BLOCK = 128  # columns per lazy GPTQ update block


@dataclass(frozen=True)
class QuantizedWeight:
    """A 2-D [out, in] weight, quantized: x̂ = (q − zero_point)·scale.

    packed: int32 [out, ceil(in·bits/32)], each code stored as q + 2^(bits-1), LSB first along the input dim
    (compressed-tensors' weight_packed); scale: spec.scale_shape(out, in) in the weight's dtype (fp16 for others);
    zero_point: int8 of the scale's shape, None when symmetric; error: rel_error, sqnr_db, max_abs, mse, cosine of the
    reconstruction against the weight given; info: how it was made ({"method", ...}, for reports).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    shape: tuple[int, int]
    error: dict
    info: dict
    residual: dict | None = None  # gptq: what qtool.quant.gptq.residual needs for the output error without a product

    def codes(self) -> torch.Tensor:
        """The int8 codes q [out, in]."""
        return unpack_int32(self.packed, self.spec.bits, self.shape, dim=1)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ computed in the scale's dtype (as compressed-tensors does), then cast to `dtype`."""
        return dequantize(self.codes(), self.scale, self.zero_point, self.spec, dtype=dtype)

    def cpu(self) -> "QuantizedWeight":
        zp = None if self.zero_point is None else self.zero_point.cpu()
        return QuantizedWeight(self.packed.cpu(), self.scale.cpu(), zp, self.spec, self.shape, self.error, self.info,
                               self.residual)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, *, importance: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None, damp: float = 0.01, name: str = "",
                    measure: tuple = (), factor=None) -> QuantizedWeight:
    """Quantize `w` (2-D, on its own device) by `spec.method`.

    rtn/mse: where the native kernel applies, one pass over the rows does it all (each row's min-max, search and
    codes while the row is in cache); otherwise the scales are chosen first, then codes, packing and error sums,
    with the same bytes. gptq needs `hessian` (XᵀX of the layer's inputs) or its `factor` (gptq.factorize: one can
    serve every weight reading the same inputs); `damp`, `name` (for errors) are its, and tr(A H Aᵀ) of each matrix
    in `measure` comes back in `.residual["quadratic"]` (qtool.quant.gptq).
    """
    check_shape(w, spec)
    shape = (int(w.shape[0]), int(w.shape[1]))
    if spec.awq:
        raise ArgumentError("method", f"{spec.method} scales whole blocks in the calibrated layer walk; quantize "
                                      f"one weight with {spec.weight_method!r} on its scaled values")
    if spec.method == "gptq":
        return _gptq(w, spec, hessian, damp, name, shape, measure, factor)
    mse = spec.method == "mse"
    info = {"method": "mse", "weighted": importance is not None} if mse else {"method": spec.method}
    weights = search.importance_weights(importance, shape[1], w.device) if mse else None
    fused = active().quantize_rows(w, spec, weights)
    if fused is None:
        scale, zp = choose_qparams(w, spec, importance=importance)
        packed, err = active().quantize_pack(w, scale, zp, spec)
    else:
        scale, zp, packed, err = fused
    return QuantizedWeight(packed, scale, zp, spec, shape, err, info)


def _gptq(w, spec, hessian, damp, name, shape, measure=(), factor=None) -> QuantizedWeight:
    if hessian is None and factor is None:
        raise ArgumentError("hessian", "gptq needs the input Hessian")
    record: dict = {}
    q, scale, zp = gptq_quantize(w, hessian, spec, damp=damp, block_size=GPTQ_BLOCK, name=name, record=record,
                                 measure=measure, factor=factor)
    err = error_stats(w, dequantize(q, scale, zp, spec, dtype=w.dtype))
    return QuantizedWeight(pack_int32(q, spec.bits, dim=1), scale, zp, spec, shape, err,
                           {"method": "gptq", "damp": damp, "act_order": True}, record)
