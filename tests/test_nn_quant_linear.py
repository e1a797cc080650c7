"""QuantLinear against a dense F.linear holding compressed-tensors' dequantized weight, on every path.

The reference weight is compressed-tensors' own pack-quantized decompression (the whole tensor at once); the
reference output is computed in float64. Each path is held to the bound stated in qtool/nn/kernels.py:
|y - y_ref| ≤ (c·u + K·2^-24)·A with A = |b| + Σ_k |x_k|(|Ŵ_k| + |zp_k·s_k|), u the input dtype's unit
roundoff, c = 4 on the kernel paths and 1 on the tiled path on the CPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qtool.nn.kernels as kn
import qtool.nn.quant_linear as ql
from qtool.errors import QtoolError
from qtool.formats import compressed_tensors as ct
from qtool.nn import QuantLinear
from qtool.quant import minmax_qparams, quantize
from qtool.quant.pack import unpack_int32
from qtool.quant.spec import QuantSpec

from .conftest import packed_module

ctq = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402

UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
HAS_KERNELS = kn.cpu_int4_layout() is not None and kn._cpu_vectorised()
kernels_only = pytest.mark.skipif(not HAS_KERNELS, reason="torch's vectorised CPU int4/int8 kernels not available")


def parts_for(w: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    scale, zp = minmax_qparams(w, spec)
    return packed_module(quantize(w, scale, zp, spec), scale, zp, spec).parts


def ct_dense(parts, spec) -> torch.Tensor:
    """The weight compressed-tensors 0.20.1 decompresses from these tensors."""
    scheme = ctq.QuantizationScheme(targets=["Linear"], weights=ctq.QuantizationArgs(**ct.weights_args(spec)),
                                    format="pack-quantized")
    return BaseCompressor.get_value_from_registry("pack-quantized").decompress(dict(parts), scheme)["weight"]


def zero_offsets(parts, spec) -> torch.Tensor:
    """|zp·s| per weight [out, in] (0 when symmetric): the part of the bound the kernels' zero form adds."""
    if spec.symmetric:
        return torch.zeros(())
    out_f, in_f = (int(s) for s in parts["weight_shape"])
    scale = parts["weight_scale"].double()
    zp = parts["weight_zero_point"]
    zp = zp.double().reshape(1, 1) if spec.strategy == "tensor" else \
        unpack_int32(zp, spec.bits, (out_f, scale.shape[1]), dim=0).double()
    z = (zp * scale.reshape(zp.shape[0], -1)).abs()
    return z.repeat_interleave(spec.group_width(in_f), dim=1).expand(out_f, in_f)


def assert_within_bound(layer, parts, spec, x, bias, c):
    dense = ct_dense(parts, spec).double()
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], layer.out_features)
    xd = x.double().reshape(-1, x.shape[-1])
    ref = F.linear(xd, dense, None if bias is None else bias.double())
    mag = xd.abs() @ (dense.abs() + zero_offsets(parts, spec)).T
    if bias is not None:
        mag = mag + bias.double().abs()
    bound = (c * UNIT[x.dtype] + layer.in_features * 2.0 ** -24) * mag
    err = (y.double().reshape(ref.shape) - ref).abs()
    assert bool((err <= bound).all()), (layer.path.name, x.dtype, float((err / bound).max()))
    return float((err / mag).max())


SCHEMES = [(bits, sym, gs) for bits in (4, 8) for sym in (True, False) for gs in (32, 128, -1, 0)]
# kernel-friendly shapes (out % 16, in % 32, a short last block of 16 or 48 rows) and odd ones (tiled only)
SHAPES = [(128, 256), (80, 128), (112, 96), (77, 96), (37, 70), (40, 33)]
CASES = [(b, s, g, shape) for b, s, g in SCHEMES for shape in SHAPES
         if (g <= 0 or shape[1] % g == 0)]


def expected_path(bits, sym, gs, shape, dtype) -> str:
    out_f, in_f = shape
    spec = QuantSpec(bits, sym, gs, "rtn")
    if not HAS_KERNELS or dtype != torch.bfloat16:
        return "tiled"
    if bits == 4:
        return "cpu-int4" if out_f % 16 == 0 and kn.kernel_group(spec, in_f) else "tiled"
    return "cpu-int8" if sym and gs <= 0 and in_f % 16 == 0 else "tiled"


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    # the smallest tiles (32 or 64 rows) on these small layers: several tiles, and zero points unpacked per tile
    monkeypatch.setitem(ql.TILE_ELEMS, "cpu", 1)


@pytest.mark.parametrize("bits,sym,gs,shape", CASES)
def test_every_path_within_its_bound(bits, sym, gs, shape):
    spec = QuantSpec(bits, sym, gs, "rtn")
    g = torch.Generator().manual_seed(bits * 100 + shape[1] + gs)
    w = (torch.randn(shape, generator=g) * 0.05).to(torch.bfloat16)
    parts = parts_for(w, spec)
    bias = torch.randn(shape[0], generator=g).to(torch.bfloat16)
    for compute in (torch.bfloat16, torch.float32, torch.float16):
        layer = QuantLinear(parts, spec, bias=bias, compute_dtype=compute)
        assert layer.path.name == expected_path(bits, sym, gs, shape, compute)
        assert torch.equal(layer.dequantize(), ct_dense(parts, spec))
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            x = torch.randn(2, 3, shape[1], generator=g).to(dtype)
            kernel = layer.path.serves(x.reshape(-1, shape[1]))
            assert kernel == (layer.path.name != "tiled" and dtype == compute)
            low = kernel or kn.tile_dtype(dtype, x.device) != torch.float32  # products in the input dtype
            assert_within_bound(layer, parts, spec, x, layer.bias.to(dtype), 4 if low else 1)


@kernels_only
@pytest.mark.parametrize("bits,sym,gs", [(4, True, 128), (4, False, 32), (4, True, -1), (4, False, 0), (8, True, -1),
                                         (8, True, 0)])
def test_kernel_paths_round_like_a_bf16_layer(bits, sym, gs):
    """Batch 1 and 64, realistic widths: the kernel's error is of the order of one bf16 rounding of the output."""
    spec = QuantSpec(bits, sym, gs, "rtn")
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(192, 1024, generator=g) * 0.02).to(torch.bfloat16)
    parts = parts_for(w, spec)
    layer = QuantLinear(parts, spec)
    assert layer.path.name == f"cpu-int{bits}"
    for batch in (1, 64):
        x = torch.randn(batch, 1024, generator=g).to(torch.bfloat16)
        worst = assert_within_bound(layer, parts, spec, x, None, 4)
        assert worst < 2 * UNIT[torch.bfloat16]


@pytest.mark.parametrize("bits,sym,gs", [(4, True, 32), (4, False, -1), (8, False, 32), (4, True, 0)])
def test_tiled_compute_layout_is_a_column_permutation(bits, sym, gs):
    spec = QuantSpec(bits, sym, gs, "rtn")
    w = torch.randn(64, 96).to(torch.float16)
    layer = QuantLinear(parts_for(w, spec), spec, kernels=False)
    natural = layer.dequantize_rows(0, 64, torch.float32)
    kernel = layer.kernel_rows(0, 64, torch.float32)
    eye = torch.eye(96)
    perm = layer.path.to_cols(layer, eye)  # [96, width]: row i is input column i placed in the compute layout
    assert torch.equal(kernel @ perm.T, natural)
    assert torch.equal(layer.path.from_cols(layer, layer.path.to_cols(layer, eye)), eye)


@pytest.mark.parametrize("bits,sym,gs", [(4, False, 32), (4, True, 128), (8, True, -1), (8, False, 32)])
def test_state_dict_is_the_file_bytes_and_memory_is_stated(bits, sym, gs):
    spec = QuantSpec(bits, sym, gs, "rtn")
    out_f, in_f = 96, 256
    parts = parts_for(torch.randn(out_f, in_f).to(torch.bfloat16), spec)
    stored = sum(v.numel() * v.element_size() for v in parts.values())
    for kernels in (True, False):
        layer = QuantLinear(parts, spec, kernels=kernels)
        sd = layer.state_dict()
        assert list(sd) == list(parts)
        for k, v in parts.items():
            assert torch.equal(sd[k], v) and sd[k].dtype == v.dtype, (layer.path.name, k)
        # memory: the file's bytes, plus for int4 kernels scale+zero (2 x bf16) per group of g columns
        extra = 0
        if layer.path.name == "cpu-int4":
            extra = out_f * (in_f // kn.kernel_group(spec, in_f)) * 2 * 2
        assert layer.weight_nbytes == stored + extra, layer.path.name
        assert not any(t.is_floating_point() and t.numel() >= out_f * in_f for t in layer.buffers())
    assert QuantLinear(parts, spec, kernels=False).weight_nbytes == stored
    if sym and gs == 32 and bits == 4:  # int4 g32 bf16 scales, packed zero points: 4 + 16/32 + 4/32 bits + shape
        assert stored == out_f * in_f // 2 + out_f * 8 * 2 + 12 * 8 * 4 + 16


@kernels_only
def test_cpu_int4_layout_against_the_kernel_itself():
    """The learned CPU layout reads back the codes torch packed, as does the layout-free route the CUDA path uses
    (the kernel multiplying rows of the identity), on full blocks and every short last block."""
    layout = kn.cpu_int4_layout()
    g = torch.Generator().manual_seed(3)
    for out_f in (64, 80, 96, 112, 192):
        u = torch.randint(0, 16, (out_f, 128), dtype=torch.int32, generator=g)
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
        assert torch.equal(layout.unpack(w, out_f, 128, 0, out_f).to(torch.int32), u - 8)
        by_kernel = kn.codes_by_identity(torch.ops.aten._weight_int4pack_mm_for_cpu, w, out_f, 128, 32,
                                         torch.bfloat16, "cpu", chunk=48)
        assert torch.equal(by_kernel.to(torch.int32), u)


@kernels_only
def test_kernel_formula_from_the_source():
    """int4: w = (u - 8)·s + z in float32, summed in float32, rounded once; int8: w = q·s (int4mm/int8mm_kernel.cpp)."""
    g = torch.Generator().manual_seed(5)
    u = torch.randint(0, 16, (64, 256), dtype=torch.int32, generator=g)
    sz = (torch.rand(8, 64, 2, generator=g) - 0.3).to(torch.bfloat16)
    x = torch.randn(3, 256, generator=g).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1),
                                                   32, sz)
    s, z = (sz[..., i].double().t().repeat_interleave(32, 1) for i in (0, 1))
    ref = x.double() @ ((u.double() - 8) * s + z).T
    assert ((y.double() - ref).abs() <= UNIT[torch.bfloat16] * ref.abs() + 256 * 2.0 ** -24 *
            (x.double().abs() @ ((u.double() - 8) * s + z).abs().T)).all()
    q = torch.randint(-128, 128, (48, 64), dtype=torch.int8, generator=g)
    s8 = (torch.rand(48, generator=g) * 0.01).to(torch.bfloat16)
    ref8 = (x[:, :64].double() @ q.double().T) * s8.double()
    y8 = torch.ops.aten._weight_int8pack_mm(x[:, :64].contiguous(), q, s8)
    assert torch.allclose(y8.double(), ref8, rtol=2 * UNIT[torch.bfloat16], atol=1e-6)


@kernels_only
def test_int8_kernel_takes_unaligned_views():
    spec = QuantSpec(8, True, -1, "rtn")
    parts = parts_for(torch.randn(64, 128).to(torch.bfloat16), spec)
    layer = QuantLinear(parts, spec)
    big = torch.randn(5 * 128 + 3).to(torch.bfloat16)
    x = big[3:].view(5, 128)  # 6 bytes past an aligned start
    assert x.data_ptr() % 32 and layer.path.name == "cpu-int8"
    torch.testing.assert_close(layer(x), layer(x.clone()), rtol=0, atol=0)


def test_forward_and_backward_never_build_the_whole_weight(monkeypatch):
    monkeypatch.setitem(ql.TILE_ELEMS, "cpu", 64 * 256)
    spec = QuantSpec(4, True, 128, "rtn")
    seen = []
    orig = QuantLinear.kernel_rows

    def spy(self, r0, r1, dtype):
        t = orig(self, r0, r1, dtype)
        seen.append(t.numel())
        return t

    monkeypatch.setattr(QuantLinear, "kernel_rows", spy)
    for kernels in (False, True):
        seen.clear()
        layer = QuantLinear(parts_for(torch.randn(256, 256).to(torch.bfloat16), spec), spec, kernels=kernels)
        x = torch.randn(4, 256, requires_grad=True).to(torch.bfloat16)
        x.retain_grad()
        layer(x).float().sum().backward()
        tiles_forward = 0 if layer.path.name != "tiled" else 4
        assert len(seen) == tiles_forward + 4 and max(seen) == 64 * 256  # 4 tiles per pass


@pytest.mark.parametrize("bits,sym,gs", [(8, False, 32), (4, True, 128), (8, True, -1), (4, False, 32)])
def test_input_gradient_matches_dense(bits, sym, gs):
    spec = QuantSpec(bits, sym, gs, "rtn")
    parts = parts_for(torch.randn(96, 128).to(torch.bfloat16), spec)
    layer = QuantLinear(parts, spec, bias=torch.randn(96))
    dense = ct_dense(parts, spec).float()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, 128).to(dtype).requires_grad_(True)
        g = torch.randn(5, 96).to(dtype)
        (layer(x) * g).sum().backward()
        want = g.double() @ dense.double()
        # products in the tile dtype, rounded at most once per tile, summed in float32, rounded once
        bound = (3 * UNIT[dtype] + 96 * 2.0 ** -24) * (g.double().abs() @ dense.double().abs())
        assert bool(((x.grad.double() - want).abs() <= bound).all())


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
    layer = QuantLinear(parts, spec)
    bad = {**layer.state_dict(), "weight_scale": torch.ones(3, 3)}
    with pytest.raises(RuntimeError, match="weight_scale"):
        layer.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="weight_shape"):
        layer.load_state_dict({k: v for k, v in layer.state_dict().items() if k != "weight_shape"})


def test_from_linear_empty_and_state_dict_across_paths():
    lin = torch.nn.Linear(96, 48).to(torch.bfloat16)
    spec = QuantSpec(4, True, 32, "rtn")
    layer = QuantLinear.from_linear(lin, spec)
    x = torch.randn(3, 96).to(torch.bfloat16)
    ref = F.linear(x.float(), layer.dequantize(torch.float32), lin.bias.float())
    torch.testing.assert_close(layer(x).float(), ref, rtol=2e-2, atol=2e-2)
    empty = QuantLinear.empty(96, 48, spec, bias=True, kernels=False)
    empty.load_state_dict(layer.state_dict())
    assert empty.path.name == "tiled"
    torch.testing.assert_close(empty(x.float()), layer(x.float()), rtol=1e-6, atol=1e-6)  # sum order
    again = QuantLinear.empty(96, 48, spec, bias=True)
    again.load_state_dict(empty.state_dict())
    assert again.path.name == layer.path.name
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), layer.state_dict().values()))


def test_to_dtype_and_device_rebuild_the_path():
    spec = QuantSpec(4, True, 32, "rtn")
    parts = parts_for(torch.randn(64, 128).to(torch.bfloat16), spec)
    layer = QuantLinear(parts, spec)
    name = layer.path.name
    layer.float()
    assert layer.path.name == "tiled" and layer.weight_scale.dtype == torch.float32 and layer.compute_dtype == \
        torch.float32
    assert torch.equal(layer.state_dict()["weight_packed"], parts["weight_packed"])
    layer.to(torch.bfloat16).to("cpu")
    assert layer.path.name == name and torch.equal(layer.state_dict()["weight_scale"], parts["weight_scale"])
    x = torch.randn(2, 128).to(torch.bfloat16)
    torch.testing.assert_close(layer(x), QuantLinear(parts, spec)(x), rtol=0, atol=0)
