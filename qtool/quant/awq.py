"""Activation-aware scaling (AWQ), the pure tensor part: per-input-channel scales for the linears reading one tensor,
chosen on their calibration statistics, and the folding of 1/s into what produced that tensor.

A mapping is a set of linears W_k reading the same input X. Scaling the input channels by 1/s and the weights' columns
by s leaves X·Wᵀ unchanged (X diag(1/s) · (W diag(s))ᵀ); only the quantization of W diag(s) differs, and channels with
large activations lose less precision when their columns are scaled up. The candidates are s = mean|x|^α normalised by
sqrt(max·min) (α on a grid over [0, 1], α = 0 is s = 1), each judged by the error of the mapped outputs,
Σ_k ‖X W_kᵀ − X diag(1/s) Q(W_k diag(s))ᵀ‖² = Σ_k tr(D_k H D_kᵀ) with D_k = W_k − Q(W_k diag(s)) diag(1/s) and
H = XᵀX — the Hessian the walk already collects, so no activation is kept. The smallest error wins, so the chosen
scales are never worse on the mapped outputs than no scaling.

Folding 1/s: a norm's per-channel weight g(w) (g(w) = w, or 1 + w as in Gemma) and bias become g⁻¹(g(w)/s) and b/s;
a previous linear (v_proj before o_proj, up_proj before down_proj) has its output rows (and bias) divided by s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..runtime import fast_bfloat16
from .gptq import Factor, factorize, quadratic_error
from .spec import QuantSpec
from .weight import quantize_weight

SCALE_FLOOR = 1e-4  # as llm-compressor and AutoAWQ: no channel scaled below this before normalisation
# bfloat16 estimates of a candidate's error came within 7.4e-5 of float32 (int4, every mapping of the 1 GB bench
# model's first blocks, measured): with 1e-3 per estimate, the float32 winner is among those within this factor of
# the least estimate; of those, the RANKED best estimates are measured in float32 (more are nearly equal anyway)
RANKING_SLACK = (1 + 1e-3) / (1 - 1e-3)
RANKED = 3


def alphas(n_grid: int) -> list[float]:
    """The grid of exponents: n_grid points evenly over [0, 1] (α = 0 first; one point: α = 0 only)."""
    if n_grid < 1:
        raise ValueError(f"the AWQ grid needs at least one point, not {n_grid}")
    return [0.0] if n_grid == 1 else [i / (n_grid - 1) for i in range(n_grid)]


def channel_scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^α, floored, normalised so that max·min = 1 (float32); α = 0 gives exactly 1."""
    s = x_mean.float().pow(alpha).clamp(min=SCALE_FLOOR)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


ROWS = 512  # rows the search quantizes and measures at a time: its temporaries stay in cache and on the heap


@dataclass(frozen=True)
class Quantizer:
    """Q(W·diag(s), importance) → the dequantized float32 weight, for the search. `per_row`: rows are quantized
    independently (every grouping but one scale per tensor), so a weight may be quantized a block of rows at a time."""

    apply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    per_row: bool = True

    def __call__(self, w_scaled: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        return self.apply(w_scaled, importance)


def mse_quantizer(spec: QuantSpec) -> Quantizer:
    """Q(W·diag(s)) by the importance-weighted mse search (importance of the scaled inputs: E[x²]/s²), dequantized
    to float32. `spec`'s bits and grouping are used; its method is not (the search always judges with mse)."""
    mse = spec.with_method("mse")

    def quantize(w_scaled: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        return quantize_weight(w_scaled, mse, importance=importance).dequantize(torch.float32)
    return Quantizer(quantize, per_row=spec.strategy != "tensor")


# the quantizer of a mapped linear that stays dense (excluded from quantization): no error
kept_dense = Quantizer(lambda w_scaled, importance: w_scaled.float())


@dataclass(frozen=True)
class Searched:
    """The outcome of one mapping's search: the winning α and scales, and the mapped outputs' squared error for every
    α of the grid (errors[0] is α = 0, no scaling, always exact; so is the winner's; an α abandoned once its sum
    passed the best so far has a lower bound above the winner's; with the bfloat16 ranking, an α not measured again
    has its estimate, above the winner's)."""

    alpha: float
    scales: torch.Tensor
    errors: list[float]
    parts: tuple[float, ...] = ()   # the winner's error member by member (float32, as measured by the grid)

    @property
    def gain(self) -> float:
        """Error with the chosen scales relative to no scaling (≤ 1)."""
        base = self.errors[0]
        return min(self.errors) / base if base > 0 else 1.0


def mapped_error(members: Sequence[tuple[torch.Tensor, Callable]], hessian: torch.Tensor, importance: torch.Tensor,
                 s: torch.Tensor, form: Factor | None = None, bound: float = math.inf,
                 parts: list | None = None) -> float:
    """Σ_k ‖X W_kᵀ − X diag(1/s) Q_k(W_k diag(s))ᵀ‖² from H = XᵀX, members = [(W_k, Q_k)]; `form`: H's
    factorize(inverse=False), which a search over many s computes once (half a product with H per form). With
    `bound` (the best error so far: every term is a squared norm, the sum only grows), a sum past it is returned as
    soon as it passes: then only a lower bound, above `bound`, and the remaining rows are not even quantized.
    A per-row quantizer's weight is quantized and measured ROWS rows at a time (the same codes as all at once).
    `parts` receives each member's term."""
    total = 0.0
    imp = importance.float() / s.square()
    for w, quantize in members:
        step = ROWS if getattr(quantize, "per_row", False) else w.shape[0]
        start = total
        for r0 in range(0, w.shape[0], step):
            rows = w[r0:r0 + step]
            w_eff = quantize(scale_columns(rows, s), imp) / s
            if form is None:
                total += quadratic_error(rows, w_eff, hessian)
            else:
                total += form.quadratic(rows.float() - w_eff, stop=bound - total)
            if total > bound:
                return total
        if parts is not None:
            parts.append(total - start)
    return total


def search(members: Sequence[tuple[torch.Tensor, Callable]], hessian: torch.Tensor, x_mean: torch.Tensor,
           importance: torch.Tensor, n_grid: int = 20, rough: bool | None = None) -> Searched:
    """The scales of the grid whose quantized mapped outputs are closest to the originals (ties: the smaller α).

    members: each mapped linear's [out, in] weight and its quantizer Q(W·diag(s), importance/s²) → the dequantized
    float32 weight (mse_quantizer, or kept_dense); hessian: XᵀX [in, in] of their shared input; x_mean: mean|x| per
    channel; importance: mean x² per channel. rough: rank the grid with bfloat16 products first (`_ranked`; the
    same choice, faster where runtime.fast_bfloat16; default: there).
    """
    form = factorize(hessian, act_order=False, inverse=False)
    grid = [(alpha, channel_scales(x_mean, alpha).to(hessian.device)) for alpha in alphas(n_grid)]
    if rough is None:
        rough = len(grid) > 2 and fast_bfloat16(hessian.device)
    errors, (alpha, s), parts = (_ranked if rough else _measured)(members, hessian, importance, grid, form)
    return Searched(alpha, s, errors, parts)


def _measured(members, hessian, importance, grid, form) -> tuple[list[float], tuple, tuple]:
    """Every α of the grid in order, in float32, each sum stopped once past the best so far: (errors, (α, s) of the
    least error, ties to the smaller α, its members' terms)."""
    errors, best = [], None
    for alpha, s in grid:
        parts = []
        err = mapped_error(members, hessian, importance, s, form, best[0] if best is not None else math.inf, parts)
        errors.append(err)
        if best is None or err < best[0]:
            best = (err, (alpha, s), tuple(parts))
    return errors, best[1], best[2]


def _ranked(members, hessian, importance, grid, form) -> tuple[list[float], tuple, tuple]:
    """The grid estimated with bfloat16 products, then in float32 α = 0 and the RANKED best estimates among those
    within what bfloat16 could have misjudged of the least (RANKING_SLACK): the least float32 error of those, which
    is `_measured`'s choice unless more than RANKED candidates lie within RANKING_SLACK of the least estimate (then
    it is within that of it). Never worse than α = 0. errors: float32 where measured (α = 0 always; stopped sums are lower
    bounds), estimates elsewhere (above the winner's)."""
    rough = form.lowered(torch.bfloat16)
    estimates, least = [], math.inf
    for _, s in grid:
        estimates.append(mapped_error(members, hessian, importance, s, rough, least * RANKING_SLACK))
        least = min(least, estimates[-1])
    close = sorted((i for i in range(1, len(grid)) if estimates[i] <= least * RANKING_SLACK),
                   key=lambda i: (estimates[i], i))[:RANKED]
    errors, best = list(estimates), None
    for i in [0] + close:  # the likeliest winners first: a tight bound stops the others' sums early
        parts = []
        err = errors[i] = mapped_error(members, hessian, importance, grid[i][1], form,
                                       best[0] if best is not None else math.inf, parts)
        if best is None or (err, i) < best[:2]:
            best = (err, i, tuple(parts))
    return errors, grid[best[1]], best[2]


def scale_columns(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W·diag(s), in W's dtype (computed in float32)."""
    return (w.float() * s.to(w.device)).to(w.dtype)


def fold_into_norm(weight: torch.Tensor, s: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """The norm weight w' with g(w') = g(w)/s where g(w) = w + offset (Gemma's RMSNorm: offset 1)."""
    return ((weight.float() + offset) / s.to(weight.device) - offset).to(weight.dtype)


def fold_into_rows(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """A previous linear's weight [out, in] (or bias [out], or a norm's bias) with its output channels divided by s."""
    s = s.to(t.device)
    return ((t.float().T / s).T if t.ndim == 2 else t.float() / s).to(t.dtype)


def scaled_hessian(hessian: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """XᵀX of the scaled inputs X·diag(1/s): H / (s sᵀ)."""
    inv = s.to(hessian.device).reciprocal()
    return hessian * inv.unsqueeze(1) * inv.unsqueeze(0)


def relative_change(before: torch.Tensor, after: torch.Tensor) -> float:
    """‖after − before‖ / ‖before‖ in float64 (0 for an unchanged tensor; inf for a change from zero)."""
    b = before.double()
    num = float((after.double() - b).norm())
    den = float(b.norm())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))
