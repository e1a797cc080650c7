"""Predicted errors: how much a weight loses under a scheme, the quantity the allocation sums and minimises.

`Σ_j imp_j·‖ΔW_{:,j}‖²` with imp_j = mean(x_j²), the mean square of input channel j over the calibration tokens
(the diagonal of XᵀX/n: the output error ‖ΔW·x‖² a layer's inputs would see if its rounding errors were
uncorrelated), or plain ‖ΔW‖² without statistics. Without a calibration walk each candidate is measured with
min-max rounding (rtn): one cheap kernel pass per candidate, after which only the chosen scheme is quantized by the
run's method. GPTQ's errors are correlated across columns on purpose (it trades weight error for output error), so
for a GPTQ result the full output error tr(ΔW·H·ΔWᵀ)/n is used, which GPTQ minimises, of which the formula above is
the diagonal.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..quant.spec import QuantSpec
from ..quant.weight import quantize_weight

_ROWS = 256  # rows per float32 chunk


def rtn_errors(w: torch.Tensor, specs: Sequence[QuantSpec | None], importance: torch.Tensor | None = None) -> list[float]:
    """The predicted error of `w` under each spec, rounded to nearest with min-max scales (0 for None: dense)."""
    out = []
    for spec in specs:
        if spec is None:
            out.append(0.0)
            continue
        qw = quantize_weight(w, spec.with_method("rtn"))
        if importance is None:
            out.append(float(qw.error["mse"]) * w.numel())
        else:
            out.append(weighted_error(w, qw.dequantize(), importance))
    return out


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, importance: torch.Tensor) -> float:
    """Σ_j importance_j · Σ_i (w_ij − ŵ_ij)², float32 chunks, float64 total."""
    imp = importance.to(device=w.device, dtype=torch.float32).reshape(-1)
    total = 0.0
    for r0 in range(0, w.shape[0], _ROWS):
        d = w[r0:r0 + _ROWS].float() - w_hat[r0:r0 + _ROWS].float()
        total += float((d.square_().sum(0) * imp).sum(dtype=torch.float64))
    return total


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, tokens: int) -> float:
    """tr(ΔW·H·ΔWᵀ)/tokens: the mean squared output error over the calibration tokens, H = XᵀX."""
    h = hessian.to(device=w.device, dtype=torch.float32)
    total = 0.0
    for r0 in range(0, w.shape[0], _ROWS):
        d = w[r0:r0 + _ROWS].float() - w_hat[r0:r0 + _ROWS].float()
        total += float(((d @ h) * d).sum(dtype=torch.float64))
    return max(total, 0.0) / max(tokens, 1)
