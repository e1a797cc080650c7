"""QuantLinear against a dense linear holding the dequantized weight, for every scheme, dtype and odd shapes.

The reference weight comes from `qtool.formats.compressed_tensors.decompress` (the whole tensor at once, natural
column order); QuantLinear computes tile by tile in its own column layout. Tolerances: float32 1e-5 of the
output's scale (sum order only); float16/bfloat16 one rounding of the output (QuantLinear rounds once from a
float32 product, F.linear in the low dtype may round differently).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qtool.nn.quant_linear as ql
from qtool.errors import QtoolError
from qtool.nn import QuantLinear
from qtool.quant import minmax_qparams, quantize
from qtool.quant.spec import QuantSpec

from .conftest import decompress, packed_module

SCHEMES = [(bits, sym, gs) for bits in (4, 8) for sym in (True, False) for gs in (32, -1, 0)]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def parts_for(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    scale, zp = minmax_qparams(w, spec)
    q = quantize(w, scale, zp, spec)
    return packed_module(q, scale, zp, spec).parts


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # 32-row tiles on these small layers: several tiles, and zero points unpacked per row tile
    monkeypatch.setitem(ql.TILE_ELEMS, "cpu", 1)


# odd shapes: in = 70 and 33 are not whole int32 words of codes; group strategy needs in % group == 0 (as CT)
CASES = [(b, s, g, shape) for b, s, g in SCHEMES for shape in ((77, 96), (37, 70), (40, 33))
         if g <= 0 or shape[1] % g == 0]


@pytest.mark.parametrize("bits,sym,gs,shape", CASES)
def test_matches_dense_dequantized(bits, sym, gs, shape):
    spec = QuantSpec(bits, sym, gs, "rtn")
    g = torch.Generator().manual_seed(bits * 100 + shape[1])
    w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
    parts = parts_for(w, spec)
    bias = torch.randn(shape[0], generator=g)
    layer = QuantLinear(parts, spec, bias=bias)
    dense = decompress(parts, spec)
    assert torch.equal(layer.dequantize(), dense)
    assert layer.tile_rows() == 32 < shape[0]
    for dtype, tol in TOL.items():
        x = torch.randn(2, 3, shape[1], generator=g).to(dtype)
        y = layer(x)
        ref = F.linear(x.double(), dense.double(), bias.double())
        assert y.dtype == dtype and y.shape == (2, 3, shape[0])
        err = (y.double() - ref).abs().max() / ref.abs().max()
        assert err < tol, (dtype, float(err))


@pytest.mark.parametrize("bits,sym,gs", [(4, True, 32), (4, False, -1), (8, False, 32), (4, True, 0)])
def test_compute_layout_is_a_column_permutation(bits, sym, gs):
    spec = QuantSpec(bits, sym, gs, "rtn")
    w = torch.randn(64, 96).to(torch.float16)
    layer = QuantLinear(parts_for(w, spec), spec)
    natural = layer.dequantize_rows(0, 64, torch.float32)
    kernel = layer.kernel_rows(0, 64, torch.float32)
    # the permutation the layer applies to inputs, applied to the identity, maps kernel columns back
    eye = torch.eye(96)
    perm = layer._to_kernel(eye)  # [96, width]: row i is input column i placed in the compute layout
    assert torch.equal(kernel @ perm.T, natural)
    assert torch.equal(layer._from_kernel(layer._to_kernel(eye)), eye)


def test_buffers_are_the_file_bytes_and_no_dense_weight():
    spec = QuantSpec(4, False, 32, "rtn")
    w = torch.randn(64, 128).to(torch.bfloat16)
    parts = parts_for(w, spec)
    layer = QuantLinear(parts, spec)
    sd = layer.state_dict()
    assert set(sd) == set(parts)
    for k, v in parts.items():
        assert torch.equal(sd[k], v) and sd[k].dtype == v.dtype
    assert layer.weight_nbytes == sum(v.numel() * v.element_size() for v in parts.values())
    assert not any(t.is_floating_point() and t.numel() >= w.numel() for t in layer.state_dict().values())
    # int4 group 32 with bf16 scales and packed int4 zero points: 4 + 16/32 + 4/32 bits per weight (+ shape)
    assert layer.weight_nbytes == 64 * 128 // 2 + 64 * 4 * 2 + 8 * 4 * 4 + 16


def test_forward_never_builds_the_whole_weight(monkeypatch):
    monkeypatch.setitem(ql.TILE_ELEMS, "cpu", 32 * 256)
    spec = QuantSpec(4, True, 128, "rtn")
    layer = QuantLinear(parts_for(torch.randn(256, 256), spec), spec)
    seen = []
    orig = QuantLinear.kernel_rows

    def spy(self, r0, r1, dtype):
        t = orig(self, r0, r1, dtype)
        seen.append(t.numel())
        return t

    monkeypatch.setattr(QuantLinear, "kernel_rows", spy)
    x = torch.randn(4, 256, requires_grad=True)
    layer(x).sum().backward()
    assert len(seen) == 16 and max(seen) == 32 * 256  # 8 tiles forward, 8 again backward


def test_input_gradient_matches_dense():
    spec = QuantSpec(8, False, 32, "rtn")
    w = torch.randn(77, 96)
    parts = parts_for(w, spec)
    layer = QuantLinear(parts, spec, bias=torch.randn(77))
    dense = decompress(parts, spec)
    x = torch.randn(5, 96, requires_grad=True)
    g = torch.randn(5, 77)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ dense, rtol=1e-5, atol=1e-5)


def test_rejects_wrong_tensors():
    spec = QuantSpec(4, False, 32, "rtn")
    parts = parts_for(torch.randn(64, 128), spec)
    with pytest.raises(QtoolError, match="missing weight_zero_point"):
        QuantLinear({k: v for k, v in parts.items() if k != "weight_zero_point"}, spec)
    with pytest.raises(QtoolError, match="weight_packed"):
        QuantLinear({**parts, "weight_packed": parts["weight_packed"][:, :-1]}, spec)
    with pytest.raises(QtoolError, match="weight_scale"):
        QuantLinear(parts, QuantSpec(4, False, 64, "rtn"))
    with pytest.raises(QtoolError, match="missing weight_scale"):
        QuantLinear({k: v for k, v in parts.items() if k != "weight_scale"}, spec)


def test_from_linear_and_empty():
    lin = torch.nn.Linear(96, 40)
    spec = QuantSpec(4, True, 32, "rtn")
    layer = QuantLinear.from_linear(lin, spec)
    x = torch.randn(3, 96)
    ref = F.linear(x, layer.dequantize(torch.float32), lin.bias)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    empty = QuantLinear.empty(96, 40, spec, bias=True, scale_dtype=torch.float32)
    empty.load_state_dict(layer.state_dict())
    torch.testing.assert_close(empty(x), layer(x), rtol=0, atol=0)
