"""MSE-optimal scales: per group, search clipping of the min-max range, weighted by input importance.

For each group, candidate ranges are the min-max range shrunk by a small grid of ratios (asymmetric:
the min and max shrink jointly over a 2-D grid). For a candidate, codes L = clamp(round(x/s + z)) - z
are fixed and the scale is refitted in closed form, s* = Σ w·x·L / Σ w·L² (llama.cpp's make_qx_quants
step); the candidate whose refit error Σ w·x² - (Σ w·x·L)² / Σ w·L² is smallest wins. w is the per-column
importance (e.g. mean squared activation, llama.cpp's imatrix), 1 without calibration.

The winner is then checked against min-max with the exact quantizer (the scale rounded to its dtype, the
quotient rounded as compressed-tensors does): a group keeps its min-max scale unless the searched one is
strictly better, so the result is never worse than `rtn` on any group. Work is float32 on row chunks.
"""
from __future__ import annotations

import torch

from .core import check_shape, grouped, group_minmax
from .spec import QuantSpec
from ..errors import ArgumentError

# Symmetric: fractions of max|x| mapped to the code range. Asymmetric: per-side shrink ratios.
# Small on purpose: the closed-form refit does most of the work (MiniLM int4 g128 sym, mean rel_error of the 36
# encoder linears: min-max 0.1203; these 4 ratios 0.1099; 5 ratios 0.1098 at 15% more time; 14 ratios 9.1%
# below min-max at 3x the time).
SYM_GRID = (1.0, 0.92, 0.84, 0.76)
ASYM_GRID = (1.0, 0.88, 0.76)
# the search holds ~6 float32 copies of a chunk; keep a chunk near 1 Mi elements
_SEARCH_CHUNK = 1 << 18


def _exact_err(xd, x32, wt, s, z, spec: QuantSpec):
    """Σ w (x - (q - z) s)² per group with the quantizer's own dtype semantics (quotient rounded to w's dtype,
    dequant in the scale's dtype), so min-max vs searched comparisons are about the stored bytes."""
    q = xd / s
    if z is not None:
        q.add_(z.to(xd.dtype))
    q.clamp_(spec.qmin, spec.qmax).round_()
    q = q.to(s.dtype)
    if z is not None:
        q.sub_(z.to(s.dtype))
    q = q.mul_(s).float().sub_(x32).square_()
    if wt is not None:
        q.mul_(wt)
    return q.sum(-1)


def _search_chunk(x, wt, mn, mx, spec: QuantSpec):
    """Best (scale, zp-float) per group of a float32 chunk x [R, G, W] by refit error."""
    qrange = float(spec.qmax - spec.qmin)
    wx = x * wt if wt is not None else x
    best_err = None
    best_s = best_z = None
    if spec.symmetric:
        amax = torch.maximum(mx, -mn).unsqueeze(-1)
        cands = [(r, None) for r in SYM_GRID]
    else:
        lo = torch.clamp(mn, max=0).unsqueeze(-1)
        hi = torch.clamp(mx, min=0).unsqueeze(-1)
        cands = [(a, b) for a in ASYM_GRID for b in ASYM_GRID]
    for a, b in cands:
        # a candidate's codes are a heuristic, not stored: multiply by 1/s (a division costs ~10 multiplies)
        if spec.symmetric:
            s = (amax * a / (qrange / 2)).clamp_min(1e-30)
            z = None
            L = (x * s.reciprocal()).clamp_(spec.qmin, spec.qmax).round_()
        else:
            cl, ch = lo * a, hi * b
            s = ((ch - cl) / qrange).clamp_min(1e-30)
            z = (spec.qmin - cl / s).clamp_(spec.qmin, spec.qmax).round_()
            L = (x * s.reciprocal()).add_(z).clamp_(spec.qmin, spec.qmax).round_().sub_(z)
        sxl = torch.linalg.vecdot(wx, L)
        if wt is not None:
            sll = torch.linalg.vecdot(L * wt, L)
        else:
            sll = torch.linalg.vecdot(L, L)
        # refit: s* = Σwxl/Σwl², error drop = (Σwxl)²/Σwl² (larger is better)
        gain = torch.where(sll > 0, sxl * sxl / sll.clamp_min(1e-30), torch.zeros_like(sxl))
        s_fit = torch.where((sll > 0) & (sxl > 0), sxl / sll.clamp_min(1e-30), s.squeeze(-1))
        if best_err is None:
            best_err, best_s = gain, s_fit
            best_z = None if z is None else z.squeeze(-1)
        else:
            better = gain > best_err
            best_err = torch.where(better, gain, best_err)
            best_s = torch.where(better, s_fit, best_s)
            if z is not None:
                best_z = torch.where(better, z.squeeze(-1), best_z)
    return best_s, best_z


def grid(spec: QuantSpec) -> tuple[float, ...]:
    return SYM_GRID if spec.symmetric else ASYM_GRID


def importance_weights(importance: torch.Tensor | None, cols: int, device) -> torch.Tensor | None:
    """The search's float32 per-column weights from an importance vector (None: unweighted)."""
    if importance is None:
        return None
    imp = importance.to(device=device, dtype=torch.float32).reshape(-1)
    if imp.numel() != cols:
        raise ArgumentError("importance", f"importance has {imp.numel()} values for {cols} input columns")
    # a column no input ever reached still deserves a little weight, so its group is not left arbitrary
    floor = imp.mean().clamp_min(1e-12) * 1e-3 if imp.numel() else 1.0
    return torch.clamp(torch.nan_to_num(imp, nan=0.0), min=0.0) + floor


def refine(w: torch.Tensor, spec: QuantSpec, weights: torch.Tensor | None, scale: torch.Tensor,
           zp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The search over a group/channel-strategy weight (already in its scale dtype) from its min-max scale and zero
    point, row chunk by row chunk: each group keeps min-max's parameters unless the searched ones are strictly
    better with the exact quantizer."""
    rows, cols = w.shape
    out_s, out_z = scale.clone(), None if zp is None else zp.clone()
    wt_g = None if weights is None else weights.view(1, -1, spec.group_width(cols))
    step = max(1, _SEARCH_CHUNK // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        xd = grouped(w[r0:r1], spec)
        x = xd.float()
        mn, mx = group_minmax(w[r0:r1], spec)
        s_new, z_new = _search_chunk(x, wt_g, mn.float(), mx.float(), spec)
        s_new = s_new.to(w.dtype)
        s_new = torch.where(s_new > 0, s_new, scale[r0:r1])
        z_new = None if z_new is None else z_new.to(torch.int8)
        s_mm = scale[r0:r1]
        z_mm = None if zp is None else zp[r0:r1]
        e_mm = _exact_err(xd, x, wt_g, s_mm.unsqueeze(-1), None if z_mm is None else z_mm.unsqueeze(-1), spec)
        e_new = _exact_err(xd, x, wt_g, s_new.unsqueeze(-1), None if z_new is None else z_new.unsqueeze(-1), spec)
        better = e_new < e_mm
        out_s[r0:r1] = torch.where(better, s_new, s_mm)
        if out_z is not None:
            out_z[r0:r1] = torch.where(better, z_new, z_mm)
    return out_s, out_z


def tensor_search(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None, scale: torch.Tensor,
                  zp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One scale for the whole tensor: the same search over the tensor as a single group."""
    check_shape(w, spec)
    rows, cols = w.shape
    flat = QuantSpec(spec.bits, spec.symmetric, -1, spec.method)
    wt = importance_weights(importance, cols, w.device)
    wt_g = None if wt is None else wt.view(1, 1, -1)
    x = w.float().view(1, 1, -1)
    wt_flat = None if wt_g is None else wt_g.expand(rows, 1, cols).reshape(1, 1, -1)
    mn, mx = group_minmax(w, spec)
    s_new, z_new = _search_chunk(x, wt_flat, mn.view(1, 1).float(), mx.view(1, 1).float(), flat)
    s_new = s_new.reshape(1).to(scale.dtype)
    if not bool(s_new > 0):
        return scale, zp
    z_new = None if z_new is None else z_new.reshape(1).to(torch.int8)
    xd = w.view(1, 1, -1)
    e_mm = _exact_err(xd, x, wt_flat, scale.view(1, 1, 1), None if zp is None else zp.view(1, 1, 1), spec)
    e_new = _exact_err(xd, x, wt_flat, s_new.view(1, 1, 1), None if z_new is None else z_new.view(1, 1, 1), spec)
    return (s_new, z_new) if bool(e_new < e_mm) else (scale, zp)
