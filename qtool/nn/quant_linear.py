"""A linear layer that runs straight from compressed-tensors pack-quantized weights.

The module holds the file's tensors (its state_dict has the checkpoint's own names) and multiplies on the path
picked for its scheme and device when they are installed (`qtool.nn.kernels`): torch's int4/int8 weight-only
kernels on their own packed layout (the same bytes as `weight_packed`, which is rebuilt when asked for), or
tiles of output rows dequantized per call. No call ever holds the whole dense weight of a large layer, in the
forward or the backward pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..quant.core import dequantize as dequantize_codes
from ..quant.pack import packed_len, unpack_int32
from ..quant.spec import QuantSpec
from ..quant.weight import quantize_weight
from . import kernels

# Dense elements per tile. Small enough that a tile and its temporaries stay in a CPU's L2/L3 cache (the
# matmul then reads the tile from cache) and a forward pass never allocates a large layer's dense weight;
# on CUDA a bigger tile amortises kernel launches. Measured in bench/nn_bench.py.
TILE_ELEMS = {"cpu": 1 << 19, "cuda": 1 << 22}
# Tile rows are a multiple of this, so a row tile of zero points packed along dim 0 starts on a word boundary
# (32 codes of 1 bit; 8 of 4 bits; 4 of 8 bits).
_ROW_ALIGN = 32


class QuantLinear(nn.Module):
    """y = x @ Ŵᵀ + b with Ŵ = (q - zp) · scale (compressed-tensors math), on the layer's path (see kernels.py):
    one of torch's int4/int8 weight-only kernels where it applies, else tiles of Ŵ dequantized per call.

    state_dict (and so export) has the checkpoint's tensors under their own names: weight_packed int32
    [out, ceil(in·bits/32)]; weight_scale [out, groups], [out, 1] or [1]; weight_shape int64 [2];
    weight_zero_point (asymmetric only) int32 packed along dim 0 [ceil(out·bits/32), groups], or int8 of the
    scale's shape for the tensor strategy. A kernel path holds the codes in its own layout instead of
    weight_packed (same bytes) and rebuilds weight_packed when asked; it adds its scales and zeros in the
    compute dtype (int4: 4 bytes per group of g ≥ 32 columns; int8: none when the scale is bfloat16).
    Works on any device and for float32/float16/bfloat16 inputs; the output has the input's dtype.
    """

    def __init__(self, parts: dict[str, torch.Tensor], spec: QuantSpec, bias: torch.Tensor | None = None,
                 name: str = "QuantLinear", device=None, compute_dtype: torch.dtype | None = None,
                 kernels: bool = True, copy: bool = False):
        """Wrap the stored tensors of one module (local names weight_packed, weight_scale, weight_shape,
        weight_zero_point); shapes and dtypes are checked against the scheme, so a wrong file fails here, not
        inside a matmul. compute_dtype: the activations' dtype the kernel paths are built for (default: the
        scale's dtype); kernels=False keeps the tiled path on compressed-tensors' own words. copy: the layer
        owns new memory for every tensor it keeps (else it keeps the given ones where it can)."""
        super().__init__()
        self.spec, self.label, self.kernels = spec, name, kernels
        self._install(parts, device, compute_dtype, copy)
        out_f = self.out_features
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise QtoolError(f"{name}.bias", f"has shape {list(bias.shape)}, expected [{out_f}]")
        self.bias = None if bias is None else nn.Parameter(bias.to(self.device), requires_grad=False)

    def _install(self, parts: dict[str, torch.Tensor], device, compute_dtype: torch.dtype | None,
                 copy: bool = False) -> None:
        """Check one module's tensors, then hold them on `device` in the layout of the path picked for them."""
        module = ct.PackedModule.from_parts(parts, self.spec, self.label)
        parts, shape = module.parts, module.shape
        self.out_features, self.in_features = shape
        for key in list(self._buffers):
            del self._buffers[key]
        device = torch.device(device) if device is not None else parts["weight_packed"].device

        def keep(t: torch.Tensor) -> torch.Tensor:
            moved = t.to(device)
            return moved.clone() if copy and moved.data_ptr() == t.data_ptr() else moved

        self.register_buffer("weight_scale", keep(parts["weight_scale"]))
        self.register_buffer("weight_shape", torch.tensor(shape, dtype=torch.int64, device=device))
        zp = parts.get("weight_zero_point")
        self.register_buffer("weight_zero_point", None if zp is None else keep(zp))
        self.compute_dtype = compute_dtype or self.weight_scale.dtype
        self.path = kernels.pick(self.spec, *shape, device, self.compute_dtype, self.kernels)
        packed = parts["weight_packed"]
        self.path.build(self, keep(packed) if self.path.keeps_words else packed.to(device))

    def relayout(self, compute_dtype: torch.dtype | None = None, kernels: bool | None = None) -> "QuantLinear":
        """Pick the path again for another activation dtype (or with kernels off/on); the stored tensors stay."""
        if kernels is not None:
            self.kernels = kernels
        self._install(self.compressed_parts(), self.device, compute_dtype or self.compute_dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.weight_shape.device

    @classmethod
    def empty(cls, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
              scale_dtype: torch.dtype = torch.bfloat16, device=None, **kw) -> "QuantLinear":
        """A zero layer of the given shape (fill it with load_state_dict)."""
        parts = {local: torch.zeros(shape, dtype=dtype)
                 for local, (shape, dtype) in ct.layout((out_features, in_features), spec, scale_dtype).items()}
        parts[ct.SCALE] = torch.ones_like(parts[ct.SCALE])
        parts[ct.SHAPE] = torch.tensor([out_features, in_features])
        b = torch.zeros(out_features, dtype=scale_dtype) if bias else None
        return cls(parts, spec, bias=b, device=device, **kw)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, **kw) -> "QuantLinear":
        """Quantize a dense linear with min-max round-to-nearest (compressed-tensors' RTN), whatever spec.method says."""
        parts = ct.PackedModule.from_weight(quantize_weight(linear.weight.detach(), spec.with_method("rtn"))).parts
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(parts, spec, bias=bias, **kw)

    # ---- compressed-tensors in and out ----------------------------------------------------------------------
    def compressed_parts(self) -> dict[str, torch.Tensor]:
        """The module's compressed-tensors tensors by local name (weight_packed rebuilt from a kernel layout)."""
        parts = {ct.PACKED: self.path.packed(self), ct.SCALE: self.weight_scale, ct.SHAPE: self.weight_shape}
        if self.weight_zero_point is not None:
            parts[ct.ZERO_POINT] = self.weight_zero_point
        return dict(sorted(parts.items()))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self.compressed_parts().items():
            destination[prefix + key] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        parts = {k: state_dict[prefix + k] for k in ct.PARTS if prefix + k in state_dict}
        missing = [prefix + k for k in ct.layout((self.out_features, self.in_features), self.spec, torch.float16)
                   if k not in parts]
        if self.bias is not None and prefix + "bias" not in state_dict:
            missing.append(prefix + "bias")
        missing_keys.extend(missing)
        if strict:
            own = set(ct.PARTS) | {"bias"}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                                   and k[len(prefix):] not in own)
        if missing:
            return
        try:
            self._install(parts, self.device, self.compute_dtype, copy=True)
            if self.bias is not None:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
        except (QtoolError, RuntimeError) as e:
            error_msgs.append(f"{prefix or self.label}: {e}")

    def _apply(self, fn, recurse=True):
        """`.to()`, `.cuda()`, `.half()`...: applied to the compressed-tensors tensors, then the layout is built
        again for the new device and dtype (a CPU kernel layout means nothing on a GPU)."""
        parts = self.compressed_parts()
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        for key in list(self._buffers):
            del self._buffers[key]
        super()._apply(fn, recurse)  # the bias
        self._install({k: fn(v) for k, v in parts.items()}, probe.device, probe.dtype)
        return self

    # ---- dequantization -------------------------------------------------------------------------------------
    def tile_rows(self) -> int:
        """Output rows per tile: about TILE_ELEMS dense elements, a multiple of the row alignment."""
        align = math.lcm(_ROW_ALIGN, self.path.row_align)
        elems = TILE_ELEMS.get(self.device.type, TILE_ELEMS["cuda"])
        rows = max(align, elems // max(self.in_features, 1) // align * align)
        return min(rows, self.out_features)

    def zero_point_rows(self, r0: int, r1: int) -> torch.Tensor | None:
        """The zero points of rows r0:r1 as int8 [r1 - r0, groups] (r0 word-aligned), [1] for the tensor
        strategy, None when symmetric."""
        zp = self.weight_zero_point
        if zp is None or zp.dim() == 1:
            return zp
        bits = self.spec.bits
        w0, w1 = r0 * bits // 32, packed_len(r1, bits)
        return unpack_int32(zp[w0:w1], bits, (r1 - r0, zp.shape[1]), dim=0)

    def _scale(self, r0: int, r1: int) -> torch.Tensor:
        return self.weight_scale if self.weight_scale.dim() == 1 else self.weight_scale[r0:r1]

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense Ŵ[r0:r1] (in the scale's dtype unless `dtype`), exactly as compressed-tensors decompresses it."""
        return dequantize_codes(self.path.codes(self, r0, r1), self._scale(r0, r1), self.zero_point_rows(r0, r1),
                                self.spec, dtype=dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole dense weight [out, in] (for tests and export; forward never calls it)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    def kernel_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Ŵ[r0:r1] in the tiled matmul's column order, each element bit-identical to dequantize_rows'."""
        return dequantize_codes(self.path.tile_codes(self, r0, r1), self._scale(r0, r1),
                                self.zero_point_rows(r0, r1), self.spec, dtype=dtype)

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _QuantMatmul.apply(x, self, bias)

    @property
    def weight_nbytes(self) -> int:
        """Bytes the layer holds for its weight (codes in the path's layout, scales, zeros, shape; a buffer that
        is a view of another counts once)."""
        storages = {}
        for b in self.buffers(recurse=False):
            if b is not None:
                st = b.untyped_storage()
                storages[(st.data_ptr(), b.device)] = st.nbytes()
        return sum(storages.values())

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the module's compressed-tensors tensors (what a checkpoint holds for it)."""
        stored = ct.layout((self.out_features, self.in_features), self.spec, self.weight_scale.dtype)
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in stored.values())

    def extra_repr(self) -> str:
        s = self.spec
        kind = {"tensor": "tensor", "channel": "channel"}.get(s.strategy, f"group={s.group_size}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{s.bits} "
                f"{'sym' if s.symmetric else 'asym'} {kind}, bias={self.bias is not None}, path={self.path.name}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return kernels.tile_dtype(x.dtype, x.device)


class _QuantMatmul(torch.autograd.Function):
    """x @ Ŵᵀ + b: the layer's kernel when it serves x, else row tiles of Ŵ. The backward pass dequantizes the
    tiles again rather than keeping them, so training adapters on a QuantLinear never holds the dense weight."""

    @staticmethod
    def forward(ctx, x, layer: QuantLinear, bias):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        if layer.path.serves(x2):
            out = layer.path.mm(layer, x2)
            if bias is not None:
                out += bias
        else:
            out = _tiled(layer, x2, bias)
        return out.view(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad_out):
        layer, path = ctx.layer, ctx.layer.path
        grad_x = grad_b = None
        g2 = grad_out.reshape(-1, layer.out_features)
        if ctx.needs_input_grad[0]:
            cd = _compute_dtype(grad_out)
            gc = g2.to(cd)
            # every input column sums over all tiles: in float32, each tile's product rounded at most once
            gk = torch.zeros(g2.shape[0], path.width(layer), dtype=torch.float32, device=grad_out.device)
            step = layer.tile_rows()
            for r0 in range(0, layer.out_features, step):
                r1 = min(r0 + step, layer.out_features)
                if cd == torch.float32:
                    gk.addmm_(gc[:, r0:r1], layer.kernel_rows(r0, r1, cd))
                else:
                    gk += torch.mm(gc[:, r0:r1], layer.kernel_rows(r0, r1, cd))
            grad_x = path.from_cols(layer, gk).to(grad_out.dtype).view(*grad_out.shape[:-1], layer.in_features)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, None, grad_b


def _tiled(layer: QuantLinear, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    cd = _compute_dtype(x2)
    xk = layer.path.to_cols(layer, x2.to(cd))
    out = torch.empty(xk.shape[0], layer.out_features, dtype=cd, device=x2.device)
    step = layer.tile_rows()
    for r0 in range(0, layer.out_features, step):
        r1 = min(r0 + step, layer.out_features)
        torch.mm(xk, layer.kernel_rows(r0, r1, cd).t(), out=out[:, r0:r1])
    if bias is not None:
        out += bias
    return out.to(x2.dtype)
