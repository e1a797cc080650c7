"""Which arithmetic runs the hot loops: torch ops, or qtool's fused C kernels (qtool/_native.c) in front of them.

One rule, applied once per process: the kernels run when the extension is built for this machine
(`native.available()`) and QTOOL_NATIVE was not "0" at start-up (`qtool.runtime.NATIVE`); otherwise torch does
everything. A kernel still steps aside, call by call, where it cannot take the tensors (a GPU tensor, another dtype,
a strided view) and the torch path runs instead, with the same bytes (the mse search: the same search with its sums
in another order, so a near-tie may go the other way). Tests compare the two with `use(TORCH)` / `use(NATIVE)`.
"""
from __future__ import annotations

import contextlib

import torch

from .. import native, runtime
from . import search
from .core import ErrorAccumulator, group_minmax, quantize, stats_from_sums
from .pack import pack_int32, packed_shape
from .spec import QuantSpec


class Backend:
    """torch ops for everything (the reference, and the path on GPUs)."""

    name = "torch"

    def group_minmax(self, w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group (min, max) of w in its dtype (qtool.quant.core.group_minmax)."""
        return group_minmax(w, spec)

    def mse_search(self, w: torch.Tensor, spec: QuantSpec, weights: torch.Tensor | None, mn: torch.Tensor,
                   mx: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None):
        """The search's (scale, zero point) of a group/channel-strategy weight from its min-max ones."""
        return search.refine(w, spec, weights, scale, zp)

    def quantize_pack(self, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, spec: QuantSpec):
        """(packed int32 codes, error stats of the reconstruction): codes and errors chunk by chunk, then packing."""
        acc = ErrorAccumulator()
        q = quantize(w, scale, zp, spec, errors=acc)
        return pack_int32(q, spec.bits, dim=1), acc.stats()

    def quantize_rows(self, w: torch.Tensor, spec: QuantSpec, weights: torch.Tensor | None):
        """(scale, zero point, packed codes, error stats) of rtn/mse in one pass over the rows, or None: torch has no
        such pass, and the caller chooses the scales first, then quantize_pack."""
        return None

    def gptq_block(self, W1, U1, a: int, b: int, col_group, scale32, zp32, qmin: int, qmax: int, sdt, Q, Err1) -> bool:
        """GPTQ's column loop over one lazy block's columns a..b-1 (qtool.quant.gptq._Columns), or False: torch runs
        it as tensor ops over row tiles."""
        return False

    def merge_applies(self, w: torch.Tensor, out_dtype: torch.dtype) -> bool:
        """Whether merge_into takes this weight (qtool.lora.merge's fused add-and-cast)."""
        return False

    def merge_into(self, w: torch.Tensor, delta: torch.Tensor, scaling: float, out: torch.Tensor):
        raise NotImplementedError("torch merges with torch ops (qtool.lora.merge.merge_weight)")


class NativeBackend(Backend):
    """The C kernels where they take the tensors, torch's path where they do not."""

    name = "native"

    def group_minmax(self, w, spec):
        rows, cols = w.shape
        mn = torch.empty(spec.scale_shape(rows, cols), dtype=torch.float32)
        mx = torch.empty_like(mn)
        if native.group_minmax(w, spec, mn, mx):
            # min and max are values of w: converting back to its dtype is exact
            return mn.to(w.dtype), mx.to(w.dtype)
        return super().group_minmax(w, spec)

    def mse_search(self, w, spec, weights, mn, mx, scale, zp):
        out_s, out_z = scale.clone(), None if zp is None else zp.clone()
        if native.mse_search(w, spec, weights, search.grid(spec), mn.float(), mx.float(), out_s, out_z):
            return out_s, out_z
        return super().mse_search(w, spec, weights, mn, mx, scale, zp)

    def quantize_pack(self, w, scale, zp, spec):
        out = torch.empty(packed_shape(*w.shape, spec.bits), dtype=torch.int32)
        sums = native.quantize_pack(w, scale, zp, spec, out)
        if sums is None:
            return super().quantize_pack(w, scale, zp, spec)
        return out, stats_from_sums(sums, w.numel())

    def quantize_rows(self, w, spec, weights):
        rows, cols = w.shape
        scale = torch.empty(spec.scale_shape(rows, cols), dtype=w.dtype)
        zp = None if spec.symmetric else torch.empty(scale.shape, dtype=torch.int8)
        out = torch.empty(packed_shape(rows, cols, spec.bits), dtype=torch.int32)
        grid = search.grid(spec) if spec.method == "mse" else None
        sums = native.quantize_rows(w, spec, weights, grid, scale, zp, out)
        return None if sums is None else (scale, zp, out, stats_from_sums(sums, w.numel()))

    def gptq_block(self, W1, U1, a, b, col_group, scale32, zp32, qmin, qmax, sdt, Q, Err1):
        return native.gptq_block(W1, U1, a, b, col_group, scale32, zp32, qmin, qmax, sdt, Q, Err1)

    def merge_applies(self, w, out_dtype):
        return native.merge_applies(w, out_dtype)

    def merge_into(self, w, delta, scaling, out):
        return native.merge_into(w, delta, scaling, out)


TORCH = Backend()
NATIVE = NativeBackend()
_active = NATIVE if runtime.NATIVE and native.available() else TORCH


def active() -> Backend:
    """The backend this process runs (the one rule, applied at import; `use` switches it for tests)."""
    return _active


@contextlib.contextmanager
def use(backend: Backend):
    """Run with `backend` until the block ends (tests comparing the two paths; not thread-local)."""
    global _active
    old, _active = _active, backend
    try:
        yield backend
    finally:
        _active = old
