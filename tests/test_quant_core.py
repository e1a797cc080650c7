"""Min-max RTN must equal compressed-tensors' calculate_qparams + quantize/dequantize bit for bit."""
import math

import pytest
import torch

from qtool.quant import core, fake_quantize, minmax_qparams
from qtool.quant.spec import QuantSpec

ct_args = pytest.importorskip("compressed_tensors.quantization")
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams  # noqa: E402

SPECS = [(b, s, g) for b in (4, 8) for s in (True, False) for g in (64, -1, 0)]


def ct_quant_args(bits, sym, gs):
    kw = dict(num_bits=bits, symmetric=sym, type="int")
    if gs > 0:
        kw["group_size"] = gs
    else:
        kw["strategy"] = "channel" if gs == -1 else "tensor"
    return ct_args.QuantizationArgs(**kw)


def ct_minmax(w, gs):
    # llm-compressor's min-max observer: per-group amin/amax in the weight's dtype
    if gs > 0:
        g = w.view(w.shape[0], -1, gs)
        return g.amin(-1), g.amax(-1)
    if gs == -1:
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    return w.min(), w.max()


def weight(dtype, rows=48, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[3] = 0  # an all-zero row: scale -> eps, asym zp from 0/0
    w[5, :64] = 0
    w[7] = w[7].abs()  # all-positive row: zero widening matters
    w[9] = -w[9].abs()
    w[11, 5] = 0.5  # an outlier
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,sym,gs", SPECS)
def test_minmax_quantize_dequantize_bit_identical_to_ct(dtype, bits, sym, gs):
    w = weight(dtype)
    spec = QuantSpec(bits, sym, gs, "rtn")
    args = ct_quant_args(bits, sym, gs)
    s_ct, z_ct = calculate_qparams(*ct_minmax(w, gs), args)
    s, z = minmax_qparams(w, spec)
    assert s.dtype == dtype and s.shape == s_ct.shape
    assert torch.equal(s, s_ct)
    expected_shape = {64: (48, 4), -1: (48, 1), 0: (1,)}[gs]
    assert tuple(s.shape) == expected_shape
    if sym:
        assert z is None
    else:
        assert z.dtype == torch.int8 and torch.equal(z, z_ct)
        assert int(z.min()) >= spec.qmin and int(z.max()) <= spec.qmax
    q_ct = ct_quantize(w, s_ct, None if sym else z_ct, args, dtype=torch.int8)
    q = core.quantize(w, s, z, spec)
    assert q.dtype == torch.int8 and torch.equal(q, q_ct)
    d_ct = ct_dequantize(q_ct, s_ct, None if sym else z_ct, args)
    d = core.dequantize(q, s, z, spec)
    assert d.dtype == d_ct.dtype == dtype and torch.equal(d, d_ct)
    assert core.dequantize(q, s, z, spec, dtype=torch.float32).dtype == torch.float32


def test_quantize_chunking_does_not_change_result(monkeypatch):
    w = weight(torch.bfloat16, rows=37, cols=128)
    spec = QuantSpec(4, False, 32, "rtn")
    s, z = minmax_qparams(w, spec)
    full = core.quantize(w, s, z, spec)
    monkeypatch.setattr(core, "CHUNK_ELEMS", 300)  # 2 rows per chunk, ragged tail
    assert torch.equal(core.quantize(w, s, z, spec), full)
    s2, z2 = minmax_qparams(w, spec)
    assert torch.equal(s, s2) and torch.equal(z, z2)


def test_symmetric_int4_known_values():
    w = torch.tensor([[0.75, -0.375, 0.1, 0.0]], dtype=torch.float32)
    spec = QuantSpec(4, True, -1, "rtn")
    s, z = minmax_qparams(w, spec)
    assert z is None and s.item() == pytest.approx(0.1)  # amax / 7.5, not / 7
    q = core.quantize(w, s, z, spec)
    assert q.tolist() == [[7, -4, 1, 0]]  # 7.5 clamps to 7; -3.75 -> -4; 1.0 -> 1


def test_round_half_even():
    spec = QuantSpec(8, True, -1, "rtn")
    s = torch.tensor([[1.0]])
    q = core.quantize(torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5]]), s, None, spec)
    assert q.tolist() == [[0, 2, 2, 0, -2]]


def test_group_size_must_divide_columns():
    with pytest.raises(ValueError, match="divisible"):
        minmax_qparams(torch.zeros(4, 100), QuantSpec(4, True, 64, "rtn"))


def test_non_float_scale_dtype_follows_ct():
    assert core.scale_dtype_for(torch.float64) == torch.float64
    assert core.scale_dtype_for(torch.float8_e4m3fn) == torch.float16


def test_error_stats_values():
    w = torch.tensor([[3.0, 4.0]])
    w_hat = torch.tensor([[3.0, 3.0]])
    e = core.error_stats(w, w_hat)
    assert e["rel_error"] == pytest.approx(1 / 5)
    assert e["sqnr_db"] == pytest.approx(-20 * math.log10(0.2))
    assert e["max_abs"] == pytest.approx(1.0)
    assert e["mse"] == pytest.approx(0.5)
    assert e["cosine"] == pytest.approx(21 / (5 * math.sqrt(18)))
    exact = core.error_stats(w, w.clone())
    assert exact["rel_error"] == 0.0 and exact["sqnr_db"] == core.SQNR_CAP_DB and exact["cosine"] == 1.0


def test_error_stats_matches_float64_reference():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(300, 500, generator=g).to(torch.bfloat16)
    w_hat = fake_quantize(w, QuantSpec(4, True, 100, "rtn"))
    e = core.error_stats(w, w_hat)
    a, b = w.double(), w_hat.double()
    rel = ((a - b).norm() / a.norm()).item()
    cos = (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item()
    assert e["rel_error"] == pytest.approx(rel, rel=1e-6)
    assert e["cosine"] == pytest.approx(cos, abs=1e-7)
    assert e["max_abs"] == pytest.approx((a - b).abs().max().item())


def test_spec_defaults_follow_the_bits():
    """The contract's defaults live in QuantSpec itself: int4 → group 128, int8 → per channel (the API used to give
    int8 group 128 while the command line gave per channel)."""
    assert QuantSpec(bits=8).group_size == -1 and QuantSpec(bits=8).strategy == "channel"
    assert QuantSpec().group_size == 128 and QuantSpec(bits=4).strategy == "group"
    assert QuantSpec(bits=8, group_size=128).group_size == 128  # asked for: kept
    assert QuantSpec(bits=8) == QuantSpec(8, True, -1, "mse")
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(bits=8, group_size=-2)
