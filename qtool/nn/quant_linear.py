"""A linear layer that runs straight from compressed-tensors pack-quantized weights.

The module holds the tensors of the file as buffers (`weight_packed`, `weight_scale`, `weight_shape`,
`weight_zero_point`), so its memory is the packed size and its state_dict has the checkpoint's own names.
Each call dequantizes the weight one tile of output rows at a time and multiplies the input by that tile;
no call ever holds the whole dense weight of a large layer, in the forward or the backward pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..quant.core import dequantize as dequantize_codes
from ..quant.pack import packed_len, unpack_int32
from ..quant.spec import QuantSpec
from ..quant.weight import quantize_weight

# Dense elements per tile. Small enough that a tile and its temporaries stay in a CPU's L2/L3 cache (the
# matmul then reads the tile from cache) and a forward pass never allocates a large layer's dense weight;
# on CUDA a bigger tile amortises kernel launches. Measured in bench/nn_bench.py.
TILE_ELEMS = {"cpu": 1 << 19, "cuda": 1 << 22}
# Tile rows are a multiple of this, so a row tile of zero points packed along dim 0 starts on a word boundary
# (32 codes of 1 bit; 8 of 4 bits; 4 of 8 bits).
_ROW_ALIGN = 32


class QuantLinear(nn.Module):
    """y = x @ Ŵᵀ + b with Ŵ = (q - zp) · scale dequantized per call, tile by tile (compressed-tensors math).

    Buffers (the checkpoint's bytes): weight_packed int32 [out, ceil(in·bits/32)]; weight_scale [out, groups],
    [out, 1] or [1]; weight_shape int64 [2]; weight_zero_point (asymmetric only) int32 packed along dim 0
    [ceil(out·bits/32), groups], or unpacked int8 of the scale's shape for the tensor strategy.
    Works on any device and for float32/float16/bfloat16 inputs; the output has the input's dtype.
    """

    def __init__(self, parts: dict[str, torch.Tensor], spec: QuantSpec, bias: torch.Tensor | None = None,
                 name: str = "QuantLinear", device=None):
        """Wrap the stored tensors of one module (local names weight_packed, weight_scale, weight_shape,
        weight_zero_point) without copying them (unless `device` moves them). Shapes and dtypes are checked
        against the scheme, so a wrong file fails here, not inside a matmul."""
        super().__init__()
        m = ct.PackedModule.from_parts(parts, spec, name)
        out_f, in_f = m.shape
        self.in_features, self.out_features, self.spec = in_f, out_f, spec
        self.register_buffer(ct.PACKED, m.parts[ct.PACKED].to(device))
        self.register_buffer(ct.SCALE, m.parts[ct.SCALE].to(device))
        self.register_buffer(ct.SHAPE, torch.tensor(m.shape, dtype=torch.int64, device=device))
        zp = m.parts.get(ct.ZERO_POINT)
        if zp is None:
            self.weight_zero_point = None
        else:
            self.register_buffer(ct.ZERO_POINT, zp.to(device))
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise QtoolError(f"{name}.bias", f"has shape {list(bias.shape)}, expected [{out_f}]")
        self.bias = None if bias is None else nn.Parameter(bias.to(device), requires_grad=False)

    @classmethod
    def empty(cls, in_features: int, out_features: int, spec: QuantSpec, bias: bool = False,
              scale_dtype: torch.dtype = torch.bfloat16, device=None) -> "QuantLinear":
        """A zero layer of the given shape (fill it with load_state_dict)."""
        parts = {local: torch.zeros(shape, dtype=dtype)
                 for local, (shape, dtype) in ct.layout((out_features, in_features), spec, scale_dtype).items()}
        parts[ct.SCALE] = torch.ones_like(parts[ct.SCALE])
        parts[ct.SHAPE] = torch.tensor([out_features, in_features])
        b = torch.zeros(out_features, dtype=scale_dtype) if bias else None
        return cls(parts, spec, bias=b, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec) -> "QuantLinear":
        """Quantize a dense linear with min-max round-to-nearest (compressed-tensors' RTN), whatever spec.method says."""
        parts = ct.PackedModule.from_weight(quantize_weight(linear.weight.detach(), spec.with_method("rtn"))).parts
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(parts, spec, bias=bias)

    # ---- dequantization -------------------------------------------------------------------------------------
    def tile_rows(self) -> int:
        """Output rows per tile: about TILE_ELEMS dense elements, a multiple of _ROW_ALIGN."""
        elems = TILE_ELEMS.get(self.weight_packed.device.type, TILE_ELEMS["cuda"])
        rows = max(_ROW_ALIGN, elems // max(self.in_features, 1) // _ROW_ALIGN * _ROW_ALIGN)
        return min(rows, self.out_features)

    def _zero_point(self, r0: int, r1: int) -> torch.Tensor | None:
        zp = self.weight_zero_point
        if zp is None or zp.dim() == 1:
            return zp
        bits = self.spec.bits
        w0, w1 = r0 * bits // 32, packed_len(r1, bits)  # r0 is word-aligned (tile rows % _ROW_ALIGN == 0)
        return unpack_int32(zp[w0:w1], bits, (r1 - r0, zp.shape[1]), dim=0)

    def _scale(self, r0: int, r1: int) -> torch.Tensor:
        return self.weight_scale if self.weight_scale.dim() == 1 else self.weight_scale[r0:r1]

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense Ŵ[r0:r1] (in the scale's dtype unless `dtype`), exactly as compressed-tensors decompresses it."""
        q = unpack_int32(self.weight_packed[r0:r1], self.spec.bits, (r1 - r0, self.in_features))
        return dequantize_codes(q, self._scale(r0, r1), self._zero_point(r0, r1), self.spec, dtype=dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole dense weight [out, in] (for tests and export; forward never calls it)."""
        return self.dequantize_rows(0, self.out_features, dtype)

    # ---- the compute layout ---------------------------------------------------------------------------------
    # Interleaving the two nibbles of every byte back into column order is the slowest step of unpacking int4
    # (a strided write). The forward pass skips it: a tile holds, per block of input columns (a group, or the
    # whole padded row), first the low nibbles then the high ones, and the input's columns are put in that
    # same order once per call. Each weight is still exactly (q - zp)·scale; only the order of the sum changes.
    def _block(self) -> int | None:
        """Columns per block of the int4 compute layout (None: columns stay in their natural order)."""
        if self.spec.bits != 4:
            return None
        if self.spec.group_size > 0:
            return self.spec.group_size if self.spec.group_size % 2 == 0 else None
        return 4 * self.weight_packed.shape[1] * 2  # channel/tensor: the whole row, padding included

    def _kernel_width(self) -> int:
        blk = self._block()
        return self.in_features if blk is None or self.spec.group_size > 0 else blk

    def _to_kernel(self, x2: torch.Tensor) -> torch.Tensor:
        """[n, in] input columns -> the compute layout [n, width]."""
        blk = self._block()
        if blk is None:
            return x2
        width = self._kernel_width()
        if width != x2.shape[1]:
            x2 = F.pad(x2, (0, width - x2.shape[1]))
        return x2.reshape(x2.shape[0], -1, blk // 2, 2).transpose(-1, -2).reshape(x2.shape[0], width)

    def _from_kernel(self, g2: torch.Tensor) -> torch.Tensor:
        """Inverse of _to_kernel (for the input gradient)."""
        blk = self._block()
        if blk is None:
            return g2
        g2 = g2.reshape(g2.shape[0], -1, 2, blk // 2).transpose(-1, -2).reshape(g2.shape[0], -1)
        return g2[:, : self.in_features]

    def _kernel_codes(self, r0: int, r1: int) -> torch.Tensor:
        """int8 codes q of rows r0:r1 in the compute layout."""
        blk = self._block()
        rows = r1 - r0
        b = self.weight_packed[r0:r1].view(torch.uint8)  # the words' bytes, little-endian on every torch device
        if self.spec.bits == 8:  # one code per byte, stored as q + 128
            return (b[:, : self.in_features] ^ 0x80).view(torch.int8)
        if blk is None:
            return unpack_int32(self.weight_packed[r0:r1], self.spec.bits, (rows, self.in_features))
        width = self._kernel_width()
        # q + 8 in a nibble; xor 8 turns it into q as a 4-bit two's complement, and arithmetic shifts
        # sign-extend each nibble into an int8
        c = (b[:, : width // 2] ^ 0x88).view(torch.int8).view(rows, -1, blk // 2)
        out = torch.empty(rows, c.shape[1], 2, blk // 2, dtype=torch.int8, device=b.device)
        torch.bitwise_left_shift(c, 4, out=out[:, :, 0])
        out[:, :, 0] >>= 4
        torch.bitwise_right_shift(c, 4, out=out[:, :, 1])
        return out.view(rows, width)

    def kernel_rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Ŵ[r0:r1] in the compute layout, each element bit-identical to dequantize_rows'."""
        q = self._kernel_codes(r0, r1)
        return dequantize_codes(q, self._scale(r0, r1), self._zero_point(r0, r1), self.spec, dtype=dtype)

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _TiledQuantMatmul.apply(x, self, bias)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the stored quantized weight (packed codes, scales, zero points, shape)."""
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False) if b is not None)

    def extra_repr(self) -> str:
        s = self.spec
        kind = {"tensor": "tensor", "channel": "channel"}.get(s.strategy, f"group={s.group_size}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{s.bits} "
                f"{'sym' if s.symmetric else 'asym'} {kind}, bias={self.bias is not None}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # CPU matmuls in float16/bfloat16 are several times slower than in float32 without native support, and
    # accumulate in float32 anyway: multiply there and round the output once to the input's dtype.
    return torch.float32 if x.device.type == "cpu" else x.dtype


class _TiledQuantMatmul(torch.autograd.Function):
    """x @ Ŵᵀ + b over row tiles of Ŵ. The backward pass dequantizes the tiles again rather than keeping
    them, so training adapters on top of a QuantLinear also never holds the dense weight."""

    @staticmethod
    def forward(ctx, x, layer: QuantLinear, bias):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        cd = _compute_dtype(x)
        xk = layer._to_kernel(x.reshape(-1, x.shape[-1]).to(cd))
        out = torch.empty(xk.shape[0], layer.out_features, dtype=cd, device=x.device)
        step = layer.tile_rows()
        for r0 in range(0, layer.out_features, step):
            r1 = min(r0 + step, layer.out_features)
            torch.mm(xk, layer.kernel_rows(r0, r1, cd).t(), out=out[:, r0:r1])
        if bias is not None:
            out += bias
        return out.to(x.dtype).view(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        grad_x = grad_b = None
        g2 = grad_out.reshape(-1, layer.out_features)
        if ctx.needs_input_grad[0]:
            cd = _compute_dtype(grad_out)
            gc = g2.to(cd)
            gk = torch.zeros(g2.shape[0], layer._kernel_width(), dtype=cd, device=grad_out.device)
            step = layer.tile_rows()
            for r0 in range(0, layer.out_features, step):
                r1 = min(r0 + step, layer.out_features)
                gk.addmm_(gc[:, r0:r1], layer.kernel_rows(r0, r1, cd))
            grad_x = layer._from_kernel(gk).to(grad_out.dtype).view(*grad_out.shape[:-1], layer.in_features)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, None, grad_b
