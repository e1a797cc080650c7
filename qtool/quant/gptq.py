"""GPTQ: quantize a weight column by column, pushing each column's error onto the columns not yet
quantized through the inverse Hessian of the layer's inputs (H = XᵀX), in lazy blocks.

Storable in compressed-tensors without g_idx: with act-order, columns are *processed* in descending
order of diag(H), but group scales are computed up front ("static groups") on the original column
order and the codes are written back in that order, so `x̂ = (q - zp)·scale` per original group holds.
Matrix math is float32 (TF32 off on cuda) and deterministic for a given device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..errors import QtoolError
from ..runtime import exact_matmul
from . import backend
from .core import check_shape, scale_dtype_for
from .qparams import minmax_qparams, mse_qparams
from .spec import QuantSpec
from ..errors import ArgumentError

DAMP_RETRIES = 3  # damping is raised x10 this many times before giving up


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str,
                      inverse: bool = True) -> tuple[torch.Tensor | None, float, torch.Tensor]:
    """(L⁻¹, λ, L): the upper Cholesky factor U of (H + λI)⁻¹ (H + λI = (UᵀU)⁻¹), as its reversal J U J = L⁻¹ (no
    copy is made to flip it: `_Columns` reads U's blocks from it), with λ = damp·mean(diag H), raising λ x10 on
    failure, and the lower factor L of the reversed J(H + λI)J = LLᵀ it came from.

    One factorization and one triangular inverse: with J the reversal, J(H + λI)J = LLᵀ gives U = J L⁻¹ J (upper,
    positive diagonal), where inverting H and factorizing the inverse would take two Cholesky factorizations and an
    inverse. Without `inverse`, L alone (L⁻¹ is None): enough for quadratic forms."""
    mean_diag = torch.mean(torch.diagonal(h))
    d = damp
    for _ in range(DAMP_RETRIES + 1):
        hd = h.flip(0, 1)
        torch.diagonal(hd).add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(hd)
        del hd
        if int(info) == 0:
            inv = _lower_inverse(L) if inverse else L
            if bool(torch.isfinite(inv.amax())) and bool(torch.isfinite(inv.amin())):  # amax/amin propagate NaN
                return inv if inverse else None, float(d * mean_diag), L
            del L, inv
        d *= 10
    raise QtoolError(
        name or "weight",
        f"hessian is not positive definite even with damping {d / 10:g}; "
        "use more or more varied calibration data, or a larger --damp",
    )


def _lower_inverse(L: torch.Tensor, block: int = 512) -> torch.Tensor:
    """L⁻¹ of a lower-triangular L, a block of columns at a time: block j solves only the trailing triangle
    L[j:, j:] (the rows above it are zero), n³/3 flops instead of a full triangular solve's n³."""
    n = L.shape[0]
    out = torch.zeros_like(L)
    for b0 in range(0, n, block):
        b1 = min(n, b0 + block)
        rhs = torch.zeros((n - b0, b1 - b0), dtype=L.dtype, device=L.device)
        rhs.diagonal().fill_(1.0)
        out[b0:, b0:b1] = torch.linalg.solve_triangular(L[b0:, b0:], rhs, upper=False)
    return out


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    damp: float = 0.01,
    block_size: int = 128,
    name: str = "",
    act_order: bool = True,
    search: bool = True,
    record: dict | None = None,
    measure: tuple = (),
    factor: Factor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ codes for a 2-D [out, in] weight given H = XᵀX [in, in] of its inputs.

    Returns (q int8 [out, in], scale, zero_point | None) with the shapes/dtypes of minmax_qparams.
    Group scales: importance-weighted MSE search (importance = diag H) when `search`, else min-max.
    Dead columns (diag H = 0) get H[i, i] = 1 so they are quantized on their own, without spreading error.
    `record`, when given, receives what `residual` needs: {"loss": Σ of the scaled errors², "lambda": the damping
    used, "dead": the dead columns}, and "quadratic": tr(A H Aᵀ) of each [out, in] matrix A in `measure`, from the
    factor at half a product's cost (the report's output errors: A = W and W − Ŵ_rtn). `factor`: H's
    `factorize(hessian, damp, act_order)`, when the caller shares one between the weights that read the same inputs.
    """
    check_shape(w, spec)
    rows, cols = w.shape
    if (factor.Uj if factor is not None else hessian).shape != (cols, cols):
        raise ArgumentError("hessian", f"hessian shape {tuple(hessian.shape)} does not match {cols} input columns")
    device = w.device
    sdt = scale_dtype_for(w.dtype)
    with exact_matmul(device), torch.no_grad():
        f = factor if factor is not None else factorize(hessian, damp, act_order, name, device)
        static = act_order or spec.strategy != "group"
        if static:
            # group params from the original weights (storable with act-order: no g_idx)
            scale, zp = _group_qparams(w.to(sdt), spec, f.importance, search)
        else:
            scale = torch.empty((rows, spec.n_groups(cols)), dtype=sdt, device=device)
            zp = None if spec.symmetric else torch.empty((rows, spec.n_groups(cols)), dtype=torch.int8, device=device)
        perm = f.perm
        if record is not None:
            record["quadratic"] = [_quadratic(a, f.L, perm, f.lam, f.dead) for a in measure]
        col_group = torch.arange(cols, device=device) // spec.group_width(cols)
        W = w.to(torch.float32).clone()
        if perm is not None:
            W, col_group = W[:, perm], col_group[perm]
        loop = _Columns(W, f.Uj, scale, zp, spec, sdt, col_group, f.importance if not static else None, search)
        Q = loop.run(block_size)
        if record is not None:
            record.update(loss=loop.loss, dead=f.dead.cpu(), **{"lambda": f.lam})
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return Q.contiguous(), scale, zp


@dataclass
class Factor:
    """What GPTQ needs of a Hessian, whatever the weight: the same for every linear that reads the same inputs
    (q/k/v, gate/up), so they can share one factorization. Act-order's permutation depends only on diag H."""
    importance: torch.Tensor  # diag H, 1 on dead columns
    dead: torch.Tensor        # columns no input ever reached
    perm: torch.Tensor | None  # processing order (act-order)
    Uj: torch.Tensor | None   # the reversed inverse factor (see _inverse_cholesky); None: quadratic forms only
    lam: float                # the damping added
    L: torch.Tensor           # the lower factor it came from

    def lowered(self, dtype: torch.dtype) -> "Factor":
        """This factor's quadratic forms with L and A in `dtype` (bfloat16: estimates of float32's, see
        qtool.quant.awq.RANKING_SLACK, at a fraction of the time where the hardware multiplies bfloat16 fast)."""
        return replace(self, L=self.L.to(dtype), Uj=None)

    def quadratic(self, a: torch.Tensor, stop: float = math.inf) -> float:
        """tr(A H Aᵀ) of an [out, in] matrix A, from the factor: half the flops of a product with H. With `stop`, the
        sum ends as soon as it exceeds it: the value returned is then only a lower bound, above `stop`."""
        return _quadratic(a, self.L, self.perm, self.lam, self.dead, stop=stop)


def factorize(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True, name: str = "",
              device=None, inverse: bool = True) -> Factor:
    """The Factor of H = XᵀX [in, in] on `device` (H's own by default), float32; without `inverse`, only what
    `Factor.quadratic` needs (no triangular inverse)."""
    device = hessian.device if device is None else device
    with exact_matmul(device), torch.no_grad():
        H = hessian.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(torch.diagonal(H)).all()):
            raise QtoolError(name or "weight", "hessian has non-finite values")
        dead = torch.diagonal(H) <= 0
        importance = torch.where(dead, 1.0, torch.diagonal(H))
        perm = torch.argsort(importance, descending=True, stable=True) if act_order else None
        try:
            Uj, lam, L = _permuted_inverse(H, dead, perm, damp, name, inverse)
        except QtoolError:
            # a NaN or inf off the diagonal fails the factorization or its finiteness check: only then look for it
            if not bool(torch.isfinite(H).all()):
                raise QtoolError(name or "weight", "hessian has non-finite values") from None
            raise
        return Factor(importance, dead, perm, Uj, lam, L)


def _group_qparams(x: torch.Tensor, spec: QuantSpec, importance: torch.Tensor, search: bool):
    """Group scales: the importance-weighted search, or min-max."""
    return mse_qparams(x, spec, importance=importance) if search else minmax_qparams(x, spec)


def _permuted_inverse(H: torch.Tensor, dead, perm, damp: float, name: str,
                      inverse: bool = True) -> tuple[torch.Tensor | None, float, torch.Tensor]:
    """_inverse_cholesky of H in processing order (a permuted copy: the caller's H is left alone). Dead columns (no
    input ever reached them) get H[i, i] = 1: quantized on their own, no error spread."""
    if perm is not None:
        H = H.index_select(0, perm).index_select(1, perm)
        dead = dead[perm]
    else:
        H = H.clone()
    H[dead, dead] = 1.0
    return _inverse_cholesky(H, damp, name, inverse)


class _Columns:
    """The column loop of GPTQ over W (float32, in processing order): quantize a column, push its error onto the
    columns not yet quantized, in lazy blocks. `lazy_importance` is set for groups whose parameters are taken from
    the already-updated weights as the loop reaches them (no act-order).

    Given U, rows are independent: within a block the loop runs on row tiles that stay in cache (the C kernel one
    row at a time, torch on ROW_TILE rows), with the same float32 operations per element either way."""

    ROW_TILE = 256  # rows of the torch loop per pass on the CPU: a [256, 128] float32 block is 128 KB

    def __init__(self, W, Uj, scale, zp, spec: QuantSpec, sdt, col_group, lazy_importance, search: bool):
        # Uj = J U J (U's reversal, the lower inverse factor): U[i1:i2, k1:k2] = Uj[n-i2:n-i1, n-k2:n-k1] flipped
        self.W, self.Uj, self.scale, self.zp, self.spec, self.sdt = W, Uj, scale, zp, spec, sdt
        self.col_group, self.lazy, self.search = col_group, lazy_importance, search
        self.rows, self.cols = W.shape
        self.width = spec.group_width(self.cols)
        self.Q = torch.empty((self.rows, self.cols), dtype=torch.int8, device=W.device)
        self.loss = 0.0  # Σ err² of the scaled errors: tr(ΔW H' ΔWᵀ) for the damped H' that U factors (see residual)
        # float32 copies of the group parameters, [rows, n_groups], converted once (lazy groups update them)
        self.s32 = scale.float().reshape(-1, scale.shape[-1] if scale.ndim == 2 else 1).expand(self.rows, -1).contiguous()
        self.z32 = None if zp is None else zp.float().reshape(-1, zp.shape[-1] if zp.ndim == 2 else 1).expand(self.rows, -1).contiguous()

    def run(self, block_size: int) -> torch.Tensor:
        W = self.W
        for i1 in range(0, self.cols, block_size):
            i2 = min(self.cols, i1 + block_size)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.empty_like(W1)
            U1 = self._u(i1, i2, i1, i2)
            groups = self.col_group[i1:i2].contiguous()
            for a, b in self._segments(i1, i2):
                if self.lazy is not None:
                    self._lazy_group(W1, a, i2, i1 + a)
                if not backend.active().gptq_block(W1, U1, a, b, groups, self.s32, self.z32, self.spec.qmin,
                                                   self.spec.qmax, self.sdt, self.Q[:, i1:i2], Err1):
                    self._torch_loop(W1, U1, Err1, i1, a, b)
            self.loss += float(Err1.double().square().sum())
            if i2 < self.cols:
                W[:, i2:] -= Err1 @ self._u(i1, i2, i2, self.cols)
        return self.Q

    def _u(self, i1: int, i2: int, k1: int, k2: int) -> torch.Tensor:
        """U[i1:i2, k1:k2] (a contiguous copy), read from its reversal."""
        n = self.cols
        return self.Uj[n - i2:n - i1, n - k2:n - k1].flip(0, 1).contiguous()

    def _segments(self, i1: int, i2: int) -> list[tuple[int, int]]:
        """Column ranges of the block (relative to i1) the loop runs without a stop: lazy groups stop it where each
        group starts, to compute that group's parameters from the updated weights."""
        if self.lazy is None:
            return [(0, i2 - i1)]
        cuts = [j - i1 for j in range(i1, i2) if j % self.width == 0]
        starts = cuts if cuts and cuts[0] == 0 else [0] + cuts
        return list(zip(starts, starts[1:] + [i2 - i1]))

    def _torch_loop(self, W1, U1, Err1, i1: int, a: int, b: int) -> None:
        tile = self.rows if W1.device.type != "cpu" else self.ROW_TILE
        for r0 in range(0, self.rows, tile):
            w1, e1, r1 = W1[r0:r0 + tile], Err1[r0:r0 + tile], min(self.rows, r0 + tile)
            for i in range(a, b):
                x = w1[:, i]
                err = (x - self._quantize(x, i1 + i, r0, r1)) / U1[i, i]
                w1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                e1[:, i] = err

    def _lazy_group(self, W1, i: int, i2: int, j: int) -> None:
        # params from the already-updated weights of the group (columns past this block still hold their pre-block
        # values, as in the reference)
        if j % self.width:
            return
        g = int(self.col_group[j])
        blk = torch.cat([W1[:, i:i + self.width], self.W[:, i2:j + self.width]], dim=1)
        flat = QuantSpec(self.spec.bits, self.spec.symmetric, -1, self.spec.method)
        sg, zg = _group_qparams(blk.to(self.sdt), flat, self.lazy[j:j + self.width], self.search)
        self.scale[:, g] = sg[:, 0]
        self.s32[:, g] = sg[:, 0].float()
        if self.zp is not None:
            self.zp[:, g] = zg[:, 0]
            self.z32[:, g] = zg[:, 0].float()

    def _quantize(self, x: torch.Tensor, j: int, r0: int, r1: int) -> torch.Tensor:
        """Column j's codes (rows r0..r1-1) into Q; returns the column dequantized exactly as stored (product
        rounded to the scale dtype), in float32."""
        g = int(self.col_group[j])
        s32 = self.s32[r0:r1, g]
        z = None if self.z32 is None else self.z32[r0:r1, g]
        q = x / s32
        if z is not None:
            q = q + z
        q = q.clamp_(float(self.spec.qmin), float(self.spec.qmax)).round_()
        self.Q[r0:r1, j] = q.to(torch.int8)
        if z is not None:
            q = q - z
        return (q * s32).to(self.sdt).float()


def _quadratic(a: torch.Tensor, L: torch.Tensor, perm, lam: float, dead, block: int = 512,
               stop: float = math.inf) -> float:
    """tr(A H Aᵀ) from the lower factor L of the reversed, permuted, damped H' (J P H' Pᵀ J = LLᵀ): ‖A P J L‖², the
    product with the triangle only (a block of L's columns meets only the rows from its own down), less the damping's
    and the dead columns' parts. float32 products, float64 sums. The blocks' parts are never negative, so once the
    running sum passes `stop` it can only grow: it is returned as it is (a lower bound)."""
    A = a.to(device=L.device, dtype=torch.float32)
    total = -_undamped_part(A, lam, dead)
    B = (A[:, perm] if perm is not None else A).flip(1).to(L.dtype)
    for j in range(0, L.shape[0], block):
        total += float((B[:, j:] @ L[j:, j:j + block]).float().square_().sum(dtype=torch.float64))
        if total > stop:
            break
    return total


def _undamped_part(d: torch.Tensor, lam: float, dead, rows: int = 256) -> float:
    """λ‖D‖² + ‖D[:, dead]‖²: what the damping and the dead columns' unit diagonal add to tr(D H' Dᵀ) (float64
    sums over row chunks: no float64 copy of D)."""
    dead = dead.to(d.device) if bool(dead.any()) else None
    total = 0.0
    for r0 in range(0, d.shape[0], rows):
        c = d[r0:r0 + rows]
        total += lam * float(c.square().sum(dtype=torch.float64))
        if dead is not None:
            total += float(c[:, dead].square().sum(dtype=torch.float64))
    return total


def residual(w: torch.Tensor, w_hat: torch.Tensor, record: dict) -> float:
    """tr(ΔW H ΔWᵀ) of a GPTQ result without a product with H, from what gptq_quantize recorded.

    With E the scaled errors (column i's error over U_ii) the loop leaves W − Ŵ = E·U exactly, and U factors the
    inverse of its damped H' = H + λI (+1 on each dead column's diagonal), so tr(ΔW H' ΔWᵀ) = ‖E‖²: subtracting the
    damping's part gives the undamped value (agrees with the product to ~1e-7 relative)."""
    d = w.to(torch.float32) - w_hat.to(torch.float32)
    return record["loss"] - _undamped_part(d, record["lambda"], record["dead"])


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, rows: int = 256) -> float:
    """‖XWᵀ − XŴᵀ‖_F / ‖XWᵀ‖_F from H = XᵀX: sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))."""
    return output_errors(w, [w_hat], hessian, rows)[0]


def error_ratio(num: float, den: float) -> float:
    """sqrt(num / den) of two quadratic forms: an output error (0 for an all-zero output with no error)."""
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return (max(num, 0.0) / den) ** 0.5


def output_errors(w: torch.Tensor, w_hats: list[torch.Tensor], hessian: torch.Tensor, rows: int = 256,
                  known: list[float] = (), den: float | None = None) -> list[float]:
    """output_error of each reconstruction in `w_hats`, with tr(W H Wᵀ) computed once for all of them (or `den`
    when the caller knows it), then of each numerator tr(ΔW H ΔWᵀ) already `known` (GPTQ's `residual`)."""
    nums, ref = _quadratics(w, w_hats, hessian, rows, reference=den is None)
    return [error_ratio(num, ref if den is None else den) for num in nums + list(known)]


def quadratic_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, rows: int = 256) -> float:
    """‖XWᵀ − XŴᵀ‖² = tr(ΔW H ΔWᵀ) from H = XᵀX."""
    return _quadratics(w, [w_hat], hessian, rows, reference=False)[0][0]


def _quadratics(w: torch.Tensor, w_hats: list[torch.Tensor], hessian: torch.Tensor, rows: int,
                reference: bool) -> tuple[list[float], float]:
    """(tr(ΔW H ΔWᵀ) for each reconstruction, tr(W H Wᵀ) or 0.0 without `reference`).

    float32 products over row chunks, float64 sums: no float64 copy of H or W (they can be hundreds of MB)."""
    H = hessian.to(torch.float32)
    nums, den = [0.0] * len(w_hats), 0.0
    for r0 in range(0, w.shape[0], rows):
        W = w[r0:r0 + rows].to(torch.float32)
        if reference:
            den += float(((W @ H) * W).sum(dtype=torch.float64))
        for k, w_hat in enumerate(w_hats):
            D = W - w_hat[r0:r0 + rows].to(torch.float32)
            nums[k] += float(((D @ H) * D).sum(dtype=torch.float64))
    return nums, den
