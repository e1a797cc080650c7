"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns not yet
quantized through the inverse Hessian of the layer's inputs (H = XᵀX), in lazy blocks.

Storable in compressed-tensors without g_idx: with act-order, columns are *processed* in descending
order of diag(H), but group scales are computed up front ("static groups") on the original column
order and the codes are written back in that order, so `x̂ = (q - zp)·scale` per original group holds.
Matrix math is float32 (TF32 off on cuda) and deterministic for a given device.
"""
from __future__ import annotations

import torch

from ..errors import QtoolError
from ..runtime import exact_matmul
from .core import check_shape, scale_dtype_for
from .qparams import minmax_qparams, mse_qparams
from .spec import QuantSpec
from ..errors import ArgumentError

DAMP_RETRIES = 3  # damping is raised x10 this many times before giving up


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), raising λ x10 on failure."""
    mean_diag = torch.mean(torch.diagonal(h))
    idx = torch.arange(h.shape[0], device=h.device)
    d = damp
    # Each [in, in] matrix is freed as soon as the next one exists: at most three are alive at once.
    for _ in range(DAMP_RETRIES + 1):
        hd = h.clone()
        hd[idx, idx] += d * mean_diag
        L, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U
        d *= 10
    raise QtoolError(
        name or "weight",
        f"hessian is not positive definite even with damping {d / 10:g}; "
        "use more or more varied calibration data, or a larger --damp",
    )


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "",
    act_order: bool = True,
    search: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ codes for a 2-D [out, in] weight given H = XᵀX [in, in] of its inputs.

    Returns (q int8 [out, in], scale, zero_point | None) with the shapes/dtypes of minmax_qparams.
    Group scales: importance-weighted MSE search (importance = diag H) when `search`, else min-max.
    Dead columns (diag H = 0) get H[i, i] = 1 so they are quantized on their own, without spreading error.
    """
    check_shape(w, spec)
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ArgumentError("hessian", f"hessian shape {tuple(hessian.shape)} does not match {cols} input columns")
    device = w.device
    sdt = scale_dtype_for(w.dtype)
    with exact_matmul(device), torch.no_grad():
        H = hessian.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(H).all()):
            raise QtoolError(name or "weight", "hessian has non-finite values")
        dead = torch.diagonal(H) <= 0
        importance = torch.where(dead, 1.0, torch.diagonal(H))
        static = act_order or spec.strategy != "group"
        if static:
            # group params from the original weights (storable with act-order: no g_idx)
            scale, zp = _group_qparams(w.to(sdt), spec, importance, search)
        else:
            scale = torch.empty((rows, spec.n_groups(cols)), dtype=sdt, device=device)
            zp = None if spec.symmetric else torch.empty((rows, spec.n_groups(cols)), dtype=torch.int8, device=device)
        perm = torch.argsort(importance, descending=True, stable=True) if act_order else None
        U = _permuted_inverse(H, dead, perm, damp, name)
        del H
        col_group = torch.arange(cols, device=device) // spec.group_width(cols)
        W = w.to(torch.float32).clone()
        if perm is not None:
            W, col_group = W[:, perm], col_group[perm]
        Q = _Columns(W, U, scale, zp, spec, sdt, col_group, importance if not static else None, search).run(block_size)
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return Q.contiguous(), scale, zp


def _group_qparams(x: torch.Tensor, spec: QuantSpec, importance: torch.Tensor, search: bool):
    """Group scales: the importance-weighted search, or min-max."""
    return mse_qparams(x, spec, importance=importance) if search else minmax_qparams(x, spec)


def _permuted_inverse(H: torch.Tensor, dead, perm, damp: float, name: str) -> torch.Tensor:
    """The Cholesky factor of the damped inverse of H in processing order (a permuted copy: the caller's H is left
    alone). Dead columns (no input ever reached them) get H[i, i] = 1: quantized on their own, no error spread."""
    if perm is not None:
        H = H.index_select(0, perm).index_select(1, perm)
        dead = dead[perm]
    else:
        H = H.clone()
    H[dead, dead] = 1.0
    return _inverse_cholesky(H, damp, name)


class _Columns:
    """The column loop of GPTQ over W (float32, in processing order): quantize a column, push its error onto the
    columns not yet quantized, in lazy blocks. `lazy_importance` is set for groups whose parameters are taken from
    the already-updated weights as the loop reaches them (no act-order)."""

    def __init__(self, W, U, scale, zp, spec: QuantSpec, sdt, col_group, lazy_importance, search: bool):
        self.W, self.U, self.scale, self.zp, self.spec, self.sdt = W, U, scale, zp, spec, sdt
        self.col_group, self.lazy, self.search = col_group, lazy_importance, search
        self.rows, self.cols = W.shape
        self.width = spec.group_width(self.cols)
        self.Q = torch.empty((self.rows, self.cols), dtype=torch.int8, device=W.device)

    def run(self, block_size: int) -> torch.Tensor:
        W, U = self.W, self.U
        for i1 in range(0, self.cols, block_size):
            i2 = min(self.cols, i1 + block_size)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.empty_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                if self.lazy is not None and j % self.width == 0:
                    self._lazy_group(W1, i, i2, j)
                x = W1[:, i]
                err = (x - self._quantize(x, j)) / U1[i, i]
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        return self.Q

    def _lazy_group(self, W1, i: int, i2: int, j: int) -> None:
        # params from the already-updated weights of the group (columns past this block still hold their pre-block
        # values, as in the reference)
        g = int(self.col_group[j])
        blk = torch.cat([W1[:, i:i + self.width], self.W[:, i2:j + self.width]], dim=1)
        flat = QuantSpec(self.spec.bits, self.spec.symmetric, -1, self.spec.method)
        sg, zg = _group_qparams(blk.to(self.sdt), flat, self.lazy[j:j + self.width], self.search)
        self.scale[:, g] = sg[:, 0]
        if self.zp is not None:
            self.zp[:, g] = zg[:, 0]

    def _quantize(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """Column j's codes into Q; returns the column dequantized exactly as stored (product rounded to the scale
        dtype), in float32."""
        g = int(self.col_group[j])
        scale, zp, rows = self.scale, self.zp, self.rows
        s32 = (scale[:, g] if scale.ndim == 2 else scale.expand(rows)).float()
        z = None if zp is None else (zp[:, g] if zp.ndim == 2 else zp.expand(rows)).float()
        q = x / s32
        if z is not None:
            q = q + z
        q = q.clamp_(float(self.spec.qmin), float(self.spec.qmax)).round_()
        self.Q[:, j] = q.to(torch.int8)
        if z is not None:
            q = q - z
        return (q * s32).to(self.sdt).float()


def quadratic_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, rows: int = 256,
                    reference: bool = True) -> tuple[float, float | None]:
    """(‖XWᵀ − XŴᵀ‖², ‖XWᵀ‖² or None without `reference`) from H = XᵀX: tr(ΔW H ΔWᵀ) and tr(W H Wᵀ).

    float32 products over row chunks, float64 sums: no float64 copy of H or W (they can be hundreds of MB)."""
    H = hessian.to(torch.float32)
    num, den = 0.0, (0.0 if reference else None)
    for r0 in range(0, w.shape[0], rows):
        W = w[r0:r0 + rows].to(torch.float32)
        D = W - w_hat[r0:r0 + rows].to(torch.float32)
        num += float(((D @ H) * D).sum(dtype=torch.float64))
        if reference:
            den += float(((W @ H) * W).sum(dtype=torch.float64))
    return num, den


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, rows: int = 256) -> float:
    """‖XWᵀ − XŴᵀ‖_F / ‖XWᵀ‖_F from H = XᵀX: sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))."""
    num, den = quadratic_error(w, w_hat, hessian, rows)
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return (max(num, 0.0) / den) ** 0.5
