"""The fused CPU kernels of qtool/_native.c, behind checks: each function says when its kernel does not apply
(None or False: no compiled extension, a GPU tensor, another dtype) and the caller then runs its torch path, which
gives the same bytes (mse: the same search, whose sums run in another order, so a near-tie may pick the other
scale). QTOOL_NATIVE=0 in the environment turns the arithmetic kernels off (the tests compare both paths);
`pwrite` is plain I/O and stays. `spec` arguments are qtool.quant.QuantSpec (not imported here: qtool.quant
imports this module).
"""
from __future__ import annotations

import os
import sys

import torch

try:
    from . import _native
except ImportError:  # built without a C compiler: the torch path does everything
    _native = None

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def enabled() -> bool:
    # the packing writes int32 words byte by byte in little-endian order
    return _native is not None and sys.byteorder == "little" and os.environ.get("QTOOL_NATIVE", "1") != "0"


def _applies(*tensors: torch.Tensor) -> bool:
    return enabled() and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def group_minmax(w: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-group (min, max) of a 2-D weight in its dtype, [rows, n_groups]; symmetric: (-max|x|, max|x|).
    Group and channel strategies only (a tensor-wide reduction is one torch op already)."""
    if spec.strategy == "tensor" or w.dtype not in DTYPE_CODES or not _applies(w):
        return None
    rows, cols = w.shape
    ng = spec.n_groups(cols)
    mn = torch.empty((rows, ng), dtype=torch.float32)
    mx = torch.empty((rows, ng), dtype=torch.float32)
    _native.minmax(w.data_ptr(), DTYPE_CODES[w.dtype], rows, cols, spec.group_width(cols), int(spec.symmetric),
                   mn.data_ptr(), mx.data_ptr())
    # min and max are values of w: converting back to its dtype is exact
    return mn.to(w.dtype), mx.to(w.dtype)


def quantize_pack(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec):
    """compressed-tensors' packed int32 codes of w [rows, packed_len(cols)] and the error sums
    (Σw², Σw·d, Σd², max|d|) of its reconstruction d = w − ŵ, in one pass; None where the kernel does not apply.
    The scale must be in w's dtype (as compressed-tensors keeps it)."""
    if w.dtype not in DTYPE_CODES or scale.dtype != w.dtype or spec.bits not in (4, 8):
        return None
    zp = None if zero_point is None else zero_point.to(torch.int8).contiguous()
    if not _applies(w, scale) or (zp is not None and not _applies(zp)):
        return None
    rows, cols = w.shape
    per_row = 0 if spec.strategy == "tensor" else spec.n_groups(cols)
    words = -(-cols * spec.bits // 32)
    out = torch.empty((rows, words), dtype=torch.int32)
    sums = _native.quantize_pack(
        w.data_ptr(), DTYPE_CODES[w.dtype], rows, cols, spec.group_width(cols), scale.data_ptr(), per_row,
        0 if zp is None else zp.data_ptr(), per_row, spec.bits, out.data_ptr(), words)
    return out, sums


def quantize_rows(w: torch.Tensor, spec, weights: torch.Tensor | None, grid: tuple[float, ...] | None):
    """The whole rtn (grid None) or mse (grid given) quantization of a group/channel-strategy weight in one pass
    over its rows: (scale in w's dtype, int8 zero point or None, packed int32 codes, error sums). None where the
    kernel does not apply."""
    if spec.strategy == "tensor" or w.dtype not in DTYPE_CODES or spec.bits not in (4, 8):
        return None
    if not _applies(w) or (weights is not None and (not _applies(weights) or weights.dtype != torch.float32)):
        return None
    rows, cols = w.shape
    ng = spec.n_groups(cols)
    scale = torch.empty((rows, ng), dtype=w.dtype)
    zp = None if spec.symmetric else torch.empty((rows, ng), dtype=torch.int8)
    words = -(-cols * spec.bits // 32)
    out = torch.empty((rows, words), dtype=torch.int32)
    g = torch.tensor(grid or (), dtype=torch.float32)
    sums = _native.quantize_rows(
        w.data_ptr(), DTYPE_CODES[w.dtype], rows, cols, spec.group_width(cols), int(spec.symmetric), spec.bits,
        int(grid is not None), 0 if weights is None else weights.data_ptr(), g.data_ptr(), len(g),
        scale.data_ptr(), 0 if zp is None else zp.data_ptr(), out.data_ptr(), words)
    return scale, zp, out, sums


def mse_search(w: torch.Tensor, spec, weights: torch.Tensor | None, grid: tuple[float, ...],
               mn: torch.Tensor, mx: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> bool:
    """qtool.quant.search's per-group search, in place: scale (w's dtype) and zero_point (int8) hold min-max's
    parameters on entry and the chosen ones on return. mn, mx: float32 [rows, n_groups]; weights: float32 [cols].
    Returns False (nothing done) where the kernel does not apply."""
    if spec.strategy == "tensor" or w.dtype not in DTYPE_CODES or scale.dtype != w.dtype:
        return False
    tensors = [w, scale, mn, mx] + [t for t in (weights, zero_point) if t is not None]
    if not _applies(*tensors) or mn.dtype != torch.float32 or mx.dtype != torch.float32:
        return False
    if (zero_point is None) != spec.symmetric or (zero_point is not None and zero_point.dtype != torch.int8):
        return False
    rows, cols = w.shape
    g = torch.tensor(grid, dtype=torch.float32)
    _native.mse_search(w.data_ptr(), DTYPE_CODES[w.dtype], rows, cols, spec.group_width(cols), int(spec.symmetric),
                       spec.bits, 0 if weights is None else weights.data_ptr(), g.data_ptr(), len(grid),
                       mn.data_ptr(), mx.data_ptr(), scale.data_ptr(), 0 if zero_point is None else zero_point.data_ptr())
    return True


def merge_applies(w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    return w.dtype in DTYPE_CODES and out_dtype in DTYPE_CODES and _applies(w)


def merge_into(w: torch.Tensor, delta: torch.Tensor, scaling: float, out: torch.Tensor):
    """out = cast(float(w) + delta·scaling) (delta float32, all three of one shape, contiguous, on the CPU: the
    caller guarantees it, having checked merge_applies once per weight), returning (Σw², every stored value
    finite). Where a value is not finite, out's bytes there are unspecified (the caller stops)."""
    n = w.numel()
    if delta.numel() != n or out.numel() != n or delta.dtype != torch.float32:
        raise ValueError("merge_into needs a float32 delta and an output of the weight's size")
    return _native.merge(w.data_ptr(), DTYPE_CODES[w.dtype], delta.data_ptr(), float(scaling), n,
                         out.data_ptr(), DTYPE_CODES[out.dtype])


def pwrite(fd: int, t: torch.Tensor, offset: int) -> bool:
    """Write a contiguous CPU tensor's bytes at `offset` of file descriptor `fd` with the GIL released; False (and
    nothing written) where the kernel does not apply."""
    # plain I/O, not arithmetic: QTOOL_NATIVE does not switch it off
    if _native is None or t.device.type != "cpu" or not t.is_contiguous():
        return False
    return _native.pwrite(fd, t.data_ptr(), t.numel() * t.element_size(), offset)
