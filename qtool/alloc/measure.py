"""Predicted errors: how much a weight loses under a scheme, the quantity the allocation sums and minimises.

`Σ_j imp_j·‖ΔW_{:,j}‖²` with imp_j = mean(x_j²), the mean square of input channel j over the calibration tokens
(the diagonal of XᵀX/n: the output error ‖ΔW·x‖² a layer's inputs would see if its rounding errors were
uncorrelated), or plain ‖ΔW‖² without statistics. Without a calibration walk each candidate is measured with
min-max rounding (rtn): one cheap kernel pass per candidate, after which only the chosen scheme is quantized by the
run's method. GPTQ's errors are correlated across columns on purpose (it trades weight error for output error), so
for a GPTQ result the full output error tr(ΔW·H·ΔWᵀ)/n is used, which GPTQ minimises, of which the formula above is
the diagonal.

That figure is each module's predicted error (the report's `predicted_error`), in the units of its own output, so
a few modules with a large output energy dominate a sum of them. What the allocation minimises is the chosen
sensitivity (`--sensitivity`, `objective`), built on each module's output energy under the same assumption,
`Σ_j mean(x_j²)·‖W_{:,j}‖²` (`‖W‖²` without statistics: the formula with W for ΔW):
- `group` (the default): the relative output error of each fused group (qtool.arch.fused_groups, the unit the
  allocation chooses for), its members' predicted errors summed over their energies summed: the error of the
  group's concatenated output relative to that output, whatever the group's scale or its number of members;
- `relative`: each module's own relative error, summed (a fused group counts once per member);
- `proxy`: the predicted errors as they are.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .. import arch
from ..quant.spec import QuantSpec
from ..quant.weight import quantize_weight

_ROWS = 256  # rows per float32 chunk
SENSITIVITIES = ("group", "relative", "proxy")
DEFAULT_SENSITIVITY = "group"


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


def output_energy(w: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    """The normaliser of the sensitivities: Σ_j importance_j·‖W_{:,j}‖² (‖W‖² without importance), float32 chunks,
    float64 total."""
    imp = None if importance is None else importance.to(device=w.device, dtype=torch.float32).reshape(-1)
    total = 0.0
    for r0 in range(0, w.shape[0], _ROWS):  # one float32 copy at a time, freed before the next (reused by the allocator)
        if imp is None:
            total += float(w[r0:r0 + _ROWS].to(torch.float32, copy=True).square_().sum())
        else:
            total += float(torch.mv(w[r0:r0 + _ROWS].to(torch.float32, copy=True).square_(), imp).sum())
    return total


def objective(errors: Mapping[str, Mapping], energies: Mapping[str, float], sensitivity: str) -> dict[str, dict]:
    """objective[module][spec]: what the allocation minimises for each measured error, by `sensitivity`: `proxy`
    the predicted error itself; `relative` it divided by the module's output energy; `group` by the summed energy
    of the module's fused group (so the group's members sum to the group's relative error). A normaliser of 0
    (all-zero weights, which lose nothing under any spec) leaves the errors as they are."""
    if sensitivity not in SENSITIVITIES:
        raise ValueError(f"sensitivity {sensitivity!r} is not one of {', '.join(SENSITIVITIES)}")
    if sensitivity == "proxy":
        return {m: dict(errs) for m, errs in errors.items()}
    if sensitivity == "relative":
        norm = {m: energies.get(m, 0.0) for m in errors}
    else:
        norm = {m: sum(energies.get(x, 0.0) for x in g.members) for g in arch.fused_groups(errors) for m in g.members}
    return {m: {s: v / norm[m] if norm[m] > 0 else v for s, v in errs.items()} for m, errs in errors.items()}


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, importance: torch.Tensor) -> float:
    """Σ_j importance_j · Σ_i (w_ij − ŵ_ij)², float32 chunks, float64 total."""
    imp = importance.to(device=w.device, dtype=torch.float32).reshape(-1)
    total = 0.0
    for r0 in range(0, w.shape[0], _ROWS):  # each chunk freed before the next (output_energy)
        total += float(torch.mv((w[r0:r0 + _ROWS].float() - w_hat[r0:r0 + _ROWS].float()).square_(), imp).sum())
    return total


def hessian_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, tokens: int) -> float:
    """tr(ΔW·H·ΔWᵀ)/tokens: the mean squared output error over the calibration tokens, H = XᵀX."""
    h = hessian.to(device=w.device, dtype=torch.float32)
    total = 0.0
    for r0 in range(0, w.shape[0], _ROWS):
        d = w[r0:r0 + _ROWS].float() - w_hat[r0:r0 + _ROWS].float()
        total += float(((d @ h) * d).sum(dtype=torch.float64))
    return max(total, 0.0) / max(tokens, 1)
