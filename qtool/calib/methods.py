"""One weight, one method: rtn (min-max), mse (importance-weighted clipping search) or gptq (Hessian).

The math lives in qtool.quant (pure tensor functions); this module only picks the function and its inputs.
"""
from __future__ import annotations

import torch

from ..quant.core import dequantize, quantize
from ..quant.gptq import gptq_quantize
from ..quant.search import choose_qparams
from ..quant.spec import QuantSpec

GPTQ_BLOCK = 128


def quantize_weight(w: torch.Tensor, spec: QuantSpec, method: str, *, hessian: torch.Tensor | None = None,
                    importance: torch.Tensor | None = None, damp: float = 0.01, name: str = ""):
    """(q int8, scale, zero point or None, info dict) for a 2-D [out, in] weight on its own device."""
    if method == "gptq":
        if hessian is None:
            raise ValueError("gptq needs the input Hessian")
        q, scale, zp = gptq_quantize(w, hessian, spec, damp=damp, block_size=GPTQ_BLOCK, name=name)
        return q, scale, zp, {"method": "gptq", "damp": damp, "act_order": True}
    scale, zp = choose_qparams(w, spec, method, importance=importance if method == "mse" else None)
    info = {"method": method, "weighted": importance is not None} if method == "mse" else {"method": method}
    return quantize(w, scale, zp, spec), scale, zp, info


def reconstruct(q, scale, zp, spec: QuantSpec) -> torch.Tensor:
    return dequantize(q, scale, zp, spec, dtype=torch.float32)
