"""Min-max round-to-nearest quantization in torch ops, matching compressed-tensors 0.20.1 byte for byte, and the
error statistics of a reconstruction.

Every function is pure and runs on the device of its inputs (qtool.quant.backend puts the native kernels in
front of the hot ones). The arithmetic mirrors CT's eager path (`quantization/utils/helpers.py::calculate_qparams`,
`lifecycle/forward_helpers.py::_quantize/_dequantize`):
scales are computed in the weight's dtype, `x / scale (+ zp)` is evaluated in the promoted dtype of
`x` and `scale` (so bf16 weights round the quotient to bf16 before `round`), round is half-to-even, and
divisions always take tensor operands (CUDA turns a division by a Python scalar into a multiplication
by its reciprocal, which would change the last bit).
"""
from __future__ import annotations

import math

import torch

from .spec import QuantSpec
from ..errors import ArgumentError

# Dtypes CT keeps for scales; any other weight dtype gets float16 scales (initialize_qparams step 2).
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Elements per chunk in the streaming loops: big enough to amortise op overhead, small enough to stay
# in cache and to avoid a fresh (page-faulting) full-size temporary per op.
CHUNK_ELEMS = 1 << 19
# sqnr_db reported for an exact reconstruction (keeps reports JSON-safe; no Infinity).
SQNR_CAP_DB = 200.0


def scale_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in SCALE_DTYPES else torch.float16


def check_shape(w: torch.Tensor, spec: QuantSpec) -> None:
    """Raise ValueError unless w is 2-D and, for groups, its columns split evenly into groups."""
    if w.ndim != 2:
        raise ArgumentError("w", f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if spec.group_size > 0 and w.shape[1] % spec.group_size:
        raise ArgumentError(
            "w",
            f"{w.shape[1]} input columns are not divisible by the group size {spec.group_size}"
        )


def grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View [rows, in] as [rows, n_groups, width] (width = in for channel/tensor)."""
    return x.view(x.shape[0], -1, spec.group_width(x.shape[1]))


def as_groups(p: torch.Tensor, rows: int) -> torch.Tensor:
    """A scale/zp of any strategy as [rows or 1, n_groups, 1] so it broadcasts over grouped(x)."""
    if p.ndim == 1:  # tensor strategy: (1,)
        return p.view(1, 1, 1)
    return p.unsqueeze(-1)


def rows_per_chunk(cols: int) -> int:
    return max(1, CHUNK_ELEMS // max(cols, 1))


def _range(spec: QuantSpec, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    # CT builds the range as float32 0-dim tensors; mixed with `dtype` tensors they adopt `dtype`.
    return (torch.tensor(float(spec.qmin), device=device), torch.tensor(float(spec.qmax), device=device))


def qparams_from_minmax(
    mn: torch.Tensor, mx: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CT's calculate_qparams for INT args: scale in mn's dtype, zero point int8 (None if symmetric)."""
    zeros = torch.zeros_like(mn)
    mn = torch.minimum(mn, zeros)  # 0 must be representable
    mx = torch.maximum(mx, zeros)
    bit_min, bit_max = _range(spec, mn.dtype, mn.device)
    bit_range = bit_max - bit_min
    if spec.symmetric:
        amax = torch.maximum(mn.abs(), mx.abs())
        scale = amax / (bit_range.to(amax.dtype) / 2)
        zp = None
    else:
        scale = (mx - mn) / bit_range.to(mx.dtype)
        zp = torch.clamp(bit_min - mn / scale, bit_min, bit_max)
    eps = torch.finfo(scale.dtype).eps
    scale = torch.where(scale == 0, torch.tensor(eps, dtype=scale.dtype, device=scale.device), scale)
    if zp is not None:
        # an all-zero group gives 0/0 = nan here; CT's cast turns it into 0 on common hardware,
        # we make that explicit so every device agrees
        zp = torch.round(torch.clamp(torch.nan_to_num(zp, nan=0.0), -128, 127)).to(torch.int8)
    return scale, zp


def group_minmax(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (min, max) of w in w's dtype: [rows, n_groups] (tensor strategy: (1,) each).

    Symmetric schemes only need max|x| (= max(|min(mn,0)|, max(mx,0)) exactly), returned as (-amax, amax).
    """
    rows, cols = w.shape
    if spec.strategy == "tensor":
        if spec.symmetric:
            a = w.abs().amax().reshape(1)
            return -a, a
        return w.amin().reshape(1), w.amax().reshape(1)
    ng = spec.n_groups(cols)
    mn = torch.empty((rows, ng), dtype=w.dtype, device=w.device)
    mx = torch.empty_like(mn)
    step = rows_per_chunk(cols)
    for r0 in range(0, rows, step):
        g = grouped(w[r0:r0 + step], spec)
        if spec.symmetric:
            torch.amax(g.abs(), dim=-1, out=mx[r0:r0 + step])
        else:
            torch.amin(g, dim=-1, out=mn[r0:r0 + step])
            torch.amax(g, dim=-1, out=mx[r0:r0 + step])
    if spec.symmetric:
        torch.neg(mx, out=mn)
    return mn, mx


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec: QuantSpec,
    errors: "ErrorAccumulator | None" = None,
) -> torch.Tensor:
    """q = clamp(round(w / scale + zp), qmin, qmax) as int8 [out, in], in CT's dtypes, row chunk by chunk.

    With `errors`, each chunk's reconstruction (q - zp)·scale (in the scale's dtype, as `dequantize` computes it)
    is compared with w while both are still in cache, so no dense Ŵ is ever built: errors.stats() afterwards.
    """
    check_shape(w, spec)
    rows, cols = w.shape
    out = torch.empty((rows, cols), dtype=torch.int8, device=w.device)
    s = as_groups(scale, rows)
    z = None if zero_point is None else as_groups(zero_point, rows)
    work_dtype = torch.result_type(w, scale)
    step = rows_per_chunk(cols)
    buf = None
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = grouped(w[r0:r1], spec)
        if buf is None or buf.shape[0] != r1 - r0:
            buf = torch.empty(x.shape, dtype=work_dtype, device=w.device)
        sc = s if s.shape[0] == 1 else s[r0:r1]
        torch.div(x, sc, out=buf)
        zc = None
        if z is not None:
            zc = z if z.shape[0] == 1 else z[r0:r1]
            buf.add_(zc.to(w.dtype))
        buf.clamp_(spec.qmin, spec.qmax).round_()
        out[r0:r1].view(buf.shape).copy_(buf)
        if errors is not None:
            x_hat = buf.to(scale.dtype)
            if zc is not None:
                x_hat.sub_(zc.to(scale.dtype))
            errors.add(x, x_hat.mul_(sc))
    return out


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x̂ = (q - zp) * scale computed in the scale's dtype (as CT does), then cast to `dtype`."""
    check_shape(q, spec)
    rows, cols = q.shape
    s = as_groups(scale, rows)
    z = None if zero_point is None else as_groups(zero_point, rows)
    x = grouped(q, spec).to(scale.dtype)
    if z is not None:
        x.sub_(z.to(scale.dtype))
    x.mul_(s)
    x = x.view(rows, cols)
    return x if dtype is None or dtype == x.dtype else x.to(dtype)


def _dot(x: torch.Tensor, y: torch.Tensor, run: int = 1024) -> float:
    """x·y of 1-D float32 tensors: float32 dots over runs of 1024 (BLAS, no temporaries), summed in float64.
    As fast as one float32 dot and ~1e-9 relative error, where a single float32 dot of 10M terms is off by 1e-4."""
    n = x.numel() // run * run
    total = float(torch.linalg.vecdot(x[:n].view(-1, run), y[:n].view(-1, run)).double().sum()) if n else 0.0
    if n < x.numel():
        total += float(torch.dot(x[n:].double(), y[n:].double()))
    return total


class ErrorAccumulator:
    """Sums for rel_error, sqnr_db, max_abs, mse and cosine, fed chunk by chunk (float32 math, float64 sums)."""

    def __init__(self):
        self.ss_w = self.ss_h = self.dot = self.ss_d = self.max_abs = 0.0
        self.n = 0

    def add(self, w: torch.Tensor, w_hat: torch.Tensor) -> None:
        x = w.float().reshape(-1)
        y = w_hat.float().reshape(-1)
        d = x - y
        # three dots give all four sums: w·ŵ = w·w − w·d and ŵ·ŵ = w·w − 2 w·d + d·d
        ww, wd, dd = _dot(x, x), _dot(x, d), _dot(d, d)
        max_abs = 0.0
        if d.numel():
            lo, hi = torch.aminmax(d)
            max_abs = max(float(hi), -float(lo))
        self.add_sums(ww, wd, dd, max_abs, d.numel())

    def add_sums(self, ww: float, wd: float, dd: float, max_abs: float, n: int) -> None:
        """Sums taken elsewhere (the native kernel): Σw², Σw·d, Σd², max|d| over n elements, d = w − ŵ."""
        self.ss_w += ww
        self.ss_d += dd
        self.dot += ww - wd
        self.ss_h += ww - 2 * wd + dd
        self.n += n
        self.max_abs = max(self.max_abs, max_abs)

    def stats(self) -> dict:
        """sqnr_db is capped at SQNR_CAP_DB for an exact reconstruction so the dict stays JSON-safe."""
        nw, nd, nh = math.sqrt(self.ss_w), math.sqrt(self.ss_d), math.sqrt(self.ss_h)
        if nd == 0.0:
            rel = 0.0
        else:
            rel = nd / nw if nw > 0 else float(torch.finfo(torch.float32).max)
        if rel == 0.0:
            sqnr = SQNR_CAP_DB
        elif math.isnan(rel):  # NaN/Inf in w: keep it visible (min() would hide a NaN)
            sqnr = rel
        else:
            sqnr = min(SQNR_CAP_DB, -20.0 * math.log10(rel))
        if nw > 0 and nh > 0:
            cosine = max(-1.0, min(1.0, self.dot / (nw * nh)))
        else:
            cosine = 1.0 if nw == nh else 0.0
        return {"rel_error": rel, "sqnr_db": sqnr, "max_abs": self.max_abs, "mse": self.ss_d / max(self.n, 1),
                "cosine": cosine}


def stats_from_sums(sums: tuple[float, float, float, float], n: int) -> dict:
    """error_stats' dict from a native kernel's (Σw², Σw·d, Σd², max|d|) over n elements."""
    acc = ErrorAccumulator()
    acc.add_sums(*sums, n)
    return acc.stats()


def error_stats(w: torch.Tensor, w_hat: torch.Tensor) -> dict:
    """rel_error, sqnr_db, max_abs, mse, cosine of a reconstruction, one cache-sized chunk at a time."""
    if w.shape != w_hat.shape:
        raise ArgumentError("w_hat", f"shapes differ: {tuple(w.shape)} vs {tuple(w_hat.shape)}")
    a = w.reshape(w.shape[0] if w.ndim > 1 else 1, -1)
    b = w_hat.reshape(a.shape)
    acc = ErrorAccumulator()
    step = rows_per_chunk(a.shape[1])
    for r0 in range(0, a.shape[0], step):
        acc.add(a[r0:r0 + step], b[r0:r0 + step])
    return acc.stats()
