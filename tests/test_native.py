"""The native kernels (qtool/_native.c) against the torch path they replace: the same bits, every dtype and scheme."""
import math

import pytest
import torch

from qtool import native
from qtool.lora.merge import LoraTerm, merge_linear_cast, merge_weight
from qtool.quant import core, minmax_qparams, mse_qparams, quantize_weight
from qtool.quant.backend import NATIVE, TORCH, active, use
from qtool.quant.pack import pack_int32, packed_shape
from qtool.quant.spec import QuantSpec

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(autouse=True)
def kernels_on():
    """These tests compare both backends and switch between them with `use`; each starts with the kernels on (the
    rest of the suite may be run with QTOOL_NATIVE=0, which selects the torch backend for the whole process)."""
    with use(NATIVE):
        yield
SPECS = [
    QuantSpec(4, True, 128, "rtn"), QuantSpec(4, False, 128, "rtn"), QuantSpec(4, False, 32, "rtn"),
    QuantSpec(8, True, -1, "rtn"), QuantSpec(8, False, -1, "rtn"), QuantSpec(4, True, 0, "rtn"),
    QuantSpec(4, False, 0, "rtn"), QuantSpec(8, True, 16, "rtn"),
]


def test_extension_is_built():
    # setup.py marks the extension optional; in the dev install it must exist, or these tests prove nothing
    assert native._native is not None and native.available() and active() is NATIVE


def _weight(rows, cols, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, :16] = 0.0                       # an all-zero start of a row
    w[1, 3] = 0.5                         # an outlier
    w[2, :] = torch.linspace(-1e-6, 1e-6, cols)  # tiny values (fp16 subnormals)
    return w.to(dtype)


def _torch_path(w, scale, zp, spec):
    acc = core.ErrorAccumulator()
    q = core.quantize(w, scale, zp, spec, errors=acc)
    return pack_int32(q, spec.bits), acc.stats()


def _kernel_pack(w, scale, zp, spec):
    out = torch.empty(packed_shape(*w.shape, spec.bits), dtype=torch.int32)
    return native.quantize_pack(w, scale, zp, spec, out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"int{s.bits}-{'sym' if s.symmetric else 'asym'}-g{s.group_size}")
@pytest.mark.parametrize("cols", [256, 96, 37 * 16])
def test_quantize_pack_matches_torch(dtype, spec, cols):
    if spec.group_size > 0 and cols % spec.group_size:
        pytest.skip("group does not divide")
    w = _weight(24, cols, dtype)
    mn_t, mx_t = TORCH.group_minmax(w, spec)
    scale, zp = core.qparams_from_minmax(mn_t, mx_t, spec)
    packed_t, err_t = _torch_path(w, scale, zp, spec)
    assert TORCH.quantize_pack(w, scale, zp, spec)[0].equal(packed_t)
    mn_n, mx_n = NATIVE.group_minmax(w, spec)
    assert torch.equal(mn_n, mn_t) and torch.equal(mx_n, mx_t) and mn_n.dtype == dtype
    assert _kernel_pack(w, scale, zp, spec) is not None
    packed_n, err_n = NATIVE.quantize_pack(w, scale, zp, spec)
    assert packed_n.dtype == torch.int32 and torch.equal(packed_n, packed_t)
    for k in ("rel_error", "mse", "cosine", "sqnr_db"):
        assert err_n[k] == pytest.approx(err_t[k], rel=1e-6, abs=1e-12), k
    assert err_n["max_abs"] == err_t["max_abs"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [s for s in SPECS if s.group_size != 0],
                         ids=lambda s: f"int{s.bits}-{'sym' if s.symmetric else 'asym'}-g{s.group_size}")
def test_fused_rtn_rows_match_torch(dtype, spec):
    """quantize_weight's one-pass kernel (min-max, CT's qparams, codes) against min-max → quantize → pack in torch."""
    w = _weight(40, 256, dtype, seed=7)
    w[5] = 0.0                 # all-zero rows: scale eps, asymmetric zero point from 0/0
    w[6] = w[6].abs() + 0.01   # positive only: the range is widened to hold 0
    w[7] = -w[7].abs() - 0.01
    spec = QuantSpec(spec.bits, spec.symmetric, spec.group_size, "rtn")
    with use(TORCH):
        ref = quantize_weight(w, spec)
    assert NATIVE.quantize_rows(w, spec, None) is not None
    got = quantize_weight(w, spec)
    assert torch.equal(got.packed, ref.packed) and torch.equal(got.scale, ref.scale) and got.scale.dtype == dtype
    assert (got.zero_point is None and ref.zero_point is None) or torch.equal(got.zero_point, ref.zero_point)
    assert got.error["rel_error"] == pytest.approx(ref.error["rel_error"], rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_mse_rows_match_the_two_step_path(dtype):
    """With the kernel on, the one-pass mse (search inside the row loop) equals mse_qparams → quantize_pack."""
    w = _weight(48, 384, dtype, seed=11)
    imp = torch.rand(384, generator=torch.Generator().manual_seed(2)) + 0.1
    for spec in (QuantSpec(4, True, 128), QuantSpec(4, False, 64), QuantSpec(8, False, -1)):
        qw = quantize_weight(w, spec, importance=imp)
        s2, z2 = mse_qparams(w, spec, importance=imp)
        p2, e2 = NATIVE.quantize_pack(w, s2, z2, spec)
        assert torch.equal(qw.scale, s2) and torch.equal(qw.packed, p2)
        assert qw.zero_point is None or torch.equal(qw.zero_point, z2)
        assert qw.error == e2 and qw.info == {"method": "mse", "weighted": True}


def _group_errors(w, scale, zp, spec, imp):
    """Σ importance·(ŵ − w)² per group of the stored quantization (float64)."""
    q = core.quantize(w, scale, zp, spec)
    err = (core.dequantize(q, scale, zp, spec).double() - w.double()) ** 2 * imp.double()
    return err.view(w.shape[0], -1, spec.group_width(w.shape[1])).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [QuantSpec(4, True, 128), QuantSpec(4, False, 64), QuantSpec(8, True, -1)],
                         ids=lambda s: f"int{s.bits}-{'sym' if s.symmetric else 'asym'}-g{s.group_size}")
def test_mse_search_native_vs_torch(dtype, spec):
    # The search's sums run in another order in C than in torch, so a near-tie may go the other way (and float32
    # refits differ in the last bits): the same quality, never worse than min-max on any group, mostly equal bytes.
    w = _weight(64, 512, dtype, seed=3)
    imp = torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.1
    mm = _group_errors(w, *minmax_qparams(w, spec), spec, imp)
    with use(TORCH):
        ref = mse_qparams(w, spec, importance=imp)
    got = mse_qparams(w, spec, importance=imp)
    assert got[0].dtype == dtype and got[0].shape == ref[0].shape
    e_got, e_ref = _group_errors(w, *got, spec, imp), _group_errors(w, *ref, spec, imp)
    assert (e_got <= mm).all()
    assert float(e_got.sum()) < float(mm.sum())
    assert float(e_got.sum()) == pytest.approx(float(e_ref.sum()), rel=2e-3)
    if dtype != torch.float32:
        assert (got[0] == ref[0]).float().mean() > 0.98


def test_odd_rows_tail_word_padding():
    # 13 columns of int4: one full word and a zero-padded partial word per row
    w = _weight(5, 13 * 8 + 5, torch.bfloat16)
    spec = QuantSpec(4, True, -1, "rtn")
    scale, zp = minmax_qparams(w, spec)
    packed_n, _ = NATIVE.quantize_pack(w, scale, zp, spec)
    assert torch.equal(packed_n, pack_int32(core.quantize(w, scale, zp, spec), 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fused_rows_odd_widths(dtype, symmetric):
    """Rows whose width is not a multiple of the 8-wide vectors: the scalar tails and the partial last word."""
    w = _weight(9, 13 * 8 + 5, dtype, seed=4)
    for bits in (4, 8):
        spec = QuantSpec(bits, symmetric, -1, "rtn")
        with use(TORCH):
            ref = quantize_weight(w, spec)
        got = quantize_weight(w, spec)
        assert torch.equal(got.packed, ref.packed) and torch.equal(got.scale, ref.scale)
        assert got.error["max_abs"] == ref.error["max_abs"]


def test_nonfinite_weight_poisons_the_error():
    w = _weight(8, 128, torch.bfloat16)
    w[4, 7] = float("nan")
    spec = QuantSpec(4, True, 128, "rtn")
    scale, zp = minmax_qparams(w, spec)
    assert torch.isnan(scale[4, 0])
    _, err = NATIVE.quantize_pack(w, scale, zp, spec)
    assert math.isnan(err["mse"])  # what the quantize job checks before it counts the bad values


def _terms(out, inp, ranks, weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LoraTerm(A=torch.randn(r, inp, generator=g) * 0.1, B=torch.randn(out, r, generator=g) * 0.1,
                     scaling=2.0 / math.sqrt(r), weight=wt) for r, wt in zip(ranks, weights)]


@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
@pytest.mark.parametrize("ranks,weights", [((8,), (1.0,)), ((4, 16), (0.7, -0.3))])
def test_merge_matches_torch(src, dst, ranks, weights):
    W = _weight(300, 1000, src, seed=5)  # 300 rows: several row blocks with a short last one
    terms = _terms(300, 1000, ranks, weights)
    ref, _ = merge_weight(W, terms)
    got, rel, finite = merge_linear_cast(W, terms, dst)
    assert finite and got.dtype == dst
    assert torch.equal(got, ref.to(dst))
    exact = sum(t.weight * t.scaling * (t.B.double() @ t.A.double()) for t in terms)
    assert rel == pytest.approx(float(exact.norm() / W.double().norm()), rel=1e-6)


@pytest.mark.parametrize("dtype,big", [(torch.float16, 6e4), (torch.bfloat16, 3.3e38), (torch.float32, 3.3e38)])
def test_merge_reports_values_that_overflow_the_output(dtype, big):
    # finite in float32 or not: what counts is the stored value
    W = torch.full((4, 64), big, dtype=dtype)
    W[0] = 1.0
    terms = [LoraTerm(A=torch.ones(4, 64), B=torch.ones(4, 4), scaling=big / 8)]
    out, _, finite = merge_linear_cast(W, terms, dtype)
    assert not finite and torch.isinf(out[1:]).all() and torch.isfinite(out[0]).all()
    W[1:] = 0.0
    assert merge_linear_cast(W, terms, dtype)[2]


def test_kernels_step_aside_where_they_do_not_apply():
    w = _weight(8, 128, torch.float64)
    spec = QuantSpec(4, True, 128, "rtn")
    scale, zp = minmax_qparams(w, spec)
    assert _kernel_pack(w, scale, zp, spec) is None       # float64: torch path
    assert _kernel_pack(w.float().t(), scale.float(), zp, spec) is None  # not contiguous
    packed, _ = NATIVE.quantize_pack(w, scale, zp, spec)   # the backend falls back to torch, same bytes
    assert torch.equal(packed, TORCH.quantize_pack(w, scale, zp, spec)[0])
    terms = [LoraTerm(A=torch.ones(2, 128), B=torch.ones(8, 2), scaling=1.0, kind="conv1d")]
    assert merge_linear_cast(w.float(), terms, torch.float32) is None
    with use(TORCH):
        assert active() is TORCH
        assert merge_linear_cast(w.float(), [LoraTerm(A=torch.ones(2, 128), B=torch.ones(8, 2), scaling=1.0)],
                                 torch.float32) is None


def test_the_switch_is_read_once_at_start_up():
    """QTOOL_NATIVE=0 in the environment of a fresh process selects the torch backend for all of it; changing the
    variable later in the running process changes nothing (the rule is applied once)."""
    import os
    import subprocess
    import sys
    probe = ("import os; from qtool.quant.backend import active; a = active().name; "
             "os.environ['QTOOL_NATIVE'] = '1' if a == 'torch' else '0'; from qtool.quant import backend; "
             "print(a, backend.active().name)")
    for value, want in (("0", "torch torch"), ("1", "native native")):
        env = dict(os.environ, QTOOL_NATIVE=value)
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == want.split()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", [QuantSpec(4, True, 32, "gptq"), QuantSpec(4, False, 32, "gptq"),
                                  QuantSpec(8, True, -1, "gptq"), QuantSpec(4, False, 0, "gptq")])
def test_gptq_column_loop_matches_torch(dtype, spec, monkeypatch):
    # rows not a multiple of the torch loop's row tile; lazy groups (act_order False) stop the loop mid-block
    from qtool.quant import gptq
    from tests.test_gptq import layer
    w, h = layer(rows=300, cols=192, n=384, seed=4)
    w = w.to(dtype)
    taken = []
    kernel = native.gptq_block
    monkeypatch.setattr(native, "gptq_block", lambda *args: taken.append(kernel(*args)) or taken[-1])
    for act_order in (True, False):
        # the group scales' search runs with the kernels in both (its sums differ in order between backends)
        with use(TORCH):
            tq = gptq.gptq_quantize(w, h, spec, act_order=act_order, search=False)
        nq = gptq.gptq_quantize(w, h, spec, act_order=act_order, search=False)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(tq, nq))
    assert taken and all(taken)  # the kernel took every block it was offered (the torch path is not compared to itself)
