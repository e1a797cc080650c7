"""The fused CPU kernels of qtool/_native.c as calls on torch tensors. Each call checks that its kernel can take the
tensors it is given (on the CPU, contiguous, a dtype it knows) and returns None or False where it cannot: the caller
then runs its torch path, which gives the same bytes (mse: the same search, whose sums run in another order, so a
near-tie may pick the other scale). Nothing here decides whether the kernels run at all: qtool.quant.backend does,
once. Outputs are allocated by the caller, which knows their layout. `spec` arguments are qtool.quant.QuantSpec.
"""
from __future__ import annotations

import sys

import torch

try:
    from . import _native
except ImportError:  # built without a C compiler: the torch path does everything
    _native = None

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> bool:
    """The extension is built, and this machine stores int32 words little-endian (the packing writes them byte by
    byte in that order)."""
    return _native is not None and sys.byteorder == "little"


def _fits(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def group_minmax(w: torch.Tensor, spec, mn: torch.Tensor, mx: torch.Tensor) -> bool:
    """Per-group (min, max) of a 2-D weight into float32 mn, mx [rows, n_groups]; symmetric: (-max|x|, max|x|).
    Group and channel strategies only (a tensor-wide reduction is one torch op already)."""
    if spec.strategy == "tensor" or w.dtype not in DTYPE_CODES or not _fits(w):
        return False
    rows, cols = w.shape
    _native.minmax(w.data_ptr(), DTYPE_CODES[w.dtype], rows, cols, spec.group_width(cols), int(spec.symmetric),
                   mn.data_ptr(), mx.data_ptr())
    return True


def quantize_pack(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, spec, out: torch.Tensor):
    """compressed-tensors' packed int32 codes of w into `out` and the error sums (Σw², Σw·d, Σd², max|d|) of its
    reconstruction d = w − ŵ, in one pass; None where the kernel does not apply. The scale must be in w's dtype (as
    compressed-tensors keeps it)."""
    if w.dtype not in DTYPE_CODES or scale.dtype != w.dtype or spec.bits not in (4, 8):
        return None
    zp = None if zero_point is None else zero_point.to(torch.int8).contiguous()
    if not _fits(w, scale) or (zp is not None and not _fits(zp)):
        return None
    rows, cols = w.shape
    per_row = 0 if spec.strategy == "tensor" else spec.n_groups(cols)
    return _native.quantize_pack(
        w.data_ptr(), DTYPE_CODES[w.dtype], rows, cols, spec.group_width(cols), scale.data_ptr(), per_row,
        0 if zp is None else zp.data_ptr(), per_row, spec.bits, out.data_ptr(), out.shape[1])


def quantize_rows(w: torch.Tensor, spec, weights: torch.Tensor | None, grid: tuple[float, ...] | None,
                  scale: torch.Tensor, zero_point: torch.Tensor | None, out: torch.Tensor):
    """The whole rtn (grid None) or mse (grid given) quantization of a group/channel-strategy weight in one pass
    over its rows, into scale (w's dtype), zero_point (int8, or None when symmetric) and out (packed int32 codes);
    returns the error sums, or None where the kernel does not apply."""
    if spec.strategy == "tensor" or w.dtype not in DTYPE_CODES or spec.bits not in (4, 8):
        return None
    if not _fits(w) or (weights is not None and (not _fits(weights) or weights.dtype != torch.float32)):
        return None
    rows, cols = w.shape
    g = torch.tensor(grid or (), dtype=torch.float32)
    return _native.quantize_rows(
        w.data_ptr(), DTYPE_CODES[w.dtype], rows, cols, spec.group_width(cols), int(spec.symmetric), spec.bits,
        int(grid is not None), 0 if weights is None else weights.data_ptr(), g.data_ptr(), len(g),
        scale.data_ptr(), 0 if zero_point is None else zero_point.data_ptr(), out.data_ptr(), out.shape[1])


def mse_search(w: torch.Tensor, spec, weights: torch.Tensor | None, grid: tuple[float, ...],
               mn: torch.Tensor, mx: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> bool:
    """qtool.quant.search's per-group search, in place: scale (w's dtype) and zero_point (int8) hold min-max's
    parameters on entry and the chosen ones on return. mn, mx: float32 [rows, n_groups]; weights: float32 [cols].
    Returns False (nothing done) where the kernel does not apply."""
    if spec.strategy == "tensor" or w.dtype not in DTYPE_CODES or scale.dtype != w.dtype:
        return False
    tensors = [w, scale, mn, mx] + [t for t in (weights, zero_point) if t is not None]
    if not _fits(*tensors) or mn.dtype != torch.float32 or mx.dtype != torch.float32:
        return False
    if (zero_point is None) != spec.symmetric or (zero_point is not None and zero_point.dtype != torch.int8):
        return False
    rows, cols = w.shape
    g = torch.tensor(grid, dtype=torch.float32)
    _native.mse_search(w.data_ptr(), DTYPE_CODES[w.dtype], rows, cols, spec.group_width(cols), int(spec.symmetric),
                       spec.bits, 0 if weights is None else weights.data_ptr(), g.data_ptr(), len(grid),
                       mn.data_ptr(), mx.data_ptr(), scale.data_ptr(), 0 if zero_point is None else zero_point.data_ptr())
    return True


def gptq_block(W1: torch.Tensor, U1: torch.Tensor, a: int, b: int, col_group: torch.Tensor, scale: torch.Tensor,
               zero_point: torch.Tensor | None, qmin: int, qmax: int, scale_dtype: torch.dtype, Q: torch.Tensor,
               Err1: torch.Tensor) -> bool:
    """GPTQ's column loop over columns a..b-1 of one lazy block, in place (qtool.quant.gptq._Columns: W1 float32
    [rows, nb], U1 float32 [nb, nb], col_group int64 [nb], scale/zero_point float32 [rows, n_groups], Q int8 the
    block's columns of the codes (row stride free), Err1 float32 [rows, nb]); False where the kernel does not apply."""
    f32 = torch.float32
    if scale_dtype not in DTYPE_CODES or not _fits(W1, U1, col_group, scale, Err1) or Q.device.type != "cpu":
        return False
    if W1.dtype != f32 or U1.dtype != f32 or scale.dtype != f32 or Err1.dtype != f32 or col_group.dtype != torch.int64:
        return False
    if zero_point is not None and (zero_point.dtype != f32 or not _fits(zero_point)):
        return False
    if Q.dtype != torch.int8 or Q.stride(1) != 1:
        return False
    rows, nb = W1.shape
    _native.gptq_block(W1.data_ptr(), rows, nb, U1.data_ptr(), a, b, col_group.data_ptr(), scale.data_ptr(),
                       scale.shape[1], 0 if zero_point is None else zero_point.data_ptr(), float(qmin), float(qmax),
                       DTYPE_CODES[scale_dtype], Q.data_ptr(), Q.stride(0), Err1.data_ptr())
    return True


def merge_applies(w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    return w.dtype in DTYPE_CODES and out_dtype in DTYPE_CODES and _fits(w)


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
    # plain I/O, not arithmetic: it runs wherever the extension is built
    if _native is None or t.device.type != "cpu" or not t.is_contiguous():
        return False
    return _native.pwrite(fd, t.data_ptr(), t.numel() * t.element_size(), offset)
