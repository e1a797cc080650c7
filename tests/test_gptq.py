"""GPTQ: lower output error than RTN on correlated inputs, exact shapes/dtypes, loud Hessian failure."""
import pytest
import torch

from qtool.errors import QtoolError
from qtool.quant import core, minmax_qparams
from qtool.quant.gptq import factorize, gptq_quantize, output_error
from qtool.quant.spec import QuantSpec


def layer(rows=48, cols=128, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    # inputs with strongly correlated channels and uneven scales, like real activations
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = (torch.randn(n, cols, generator=g) @ mix) * torch.linspace(0.2, 3.0, cols)
    return w, x.T @ x


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 32, "gptq"), QuantSpec(4, False, 32, "gptq"),
                                  QuantSpec(8, True, -1, "gptq"), QuantSpec(4, True, 0, "gptq")])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_outputs(spec, act_order):
    w, h = layer()
    w = w.to(torch.bfloat16)
    s0, z0 = minmax_qparams(w, spec)
    rtn = core.dequantize(core.quantize(w, s0, z0, spec), s0, z0, spec)
    q, s, z = gptq_quantize(w, h, spec, act_order=act_order)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.bfloat16 and s.shape == s0.shape
    assert (z is None) == spec.symmetric
    if z is not None:
        assert z.dtype == torch.int8 and z.shape == s.shape
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    ours = core.dequantize(q, s, z, spec)
    assert output_error(w, ours, h) < 0.85 * output_error(w, rtn, h)


def test_deterministic_and_codes_consistent_with_scales():
    w, h = layer(seed=3)
    spec = QuantSpec(4, True, 32, "gptq")
    a = gptq_quantize(w, h, spec)
    b = gptq_quantize(w, h, spec)
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2]))


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 32, "gptq"), QuantSpec(4, False, 0, "gptq")])
def test_one_factor_serves_every_weight_reading_the_same_inputs(spec):
    # q/k/v share one factorization: each weight's codes, scales and recorded figures are those of its own call
    _, h = layer(seed=4)
    h[:, 7] = 0
    h[7, :] = 0  # a dead column too
    f = factorize(h, 0.01, True)
    for seed in (5, 6, 7):
        w, _ = layer(seed=seed)
        alone, shared = {}, {}
        a = gptq_quantize(w, h, spec, record=alone, measure=(w,))
        b = gptq_quantize(w, None, spec, record=shared, measure=(w,), factor=f)
        assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)
        assert alone["loss"] == shared["loss"] and alone["quadratic"] == shared["quadratic"]
        assert alone["lambda"] == shared["lambda"] and torch.equal(alone["dead"], shared["dead"])


@pytest.mark.parametrize("tokens", [512, 40])  # 40 < 128 columns: a singular H, PSD only
def test_quadratic_forms_from_the_factor_equal_the_product_with_h(tokens):
    from qtool.quant.gptq import quadratic_error
    w, _ = layer(seed=8)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(tokens, 128, generator=g) * torch.linspace(0.1, 4.0, 128)
    x[:, 11] = 0  # a dead column
    h = x.T @ x
    form = factorize(h, 0.01, act_order=False, inverse=False)
    assert form.Uj is None
    for d in (w, w - w.round(decimals=2), torch.randn(48, 128, generator=g)):
        want = float(((x.double() @ d.double().T) ** 2).sum())
        assert form.quadratic(d) == pytest.approx(want, rel=1e-4)
        assert form.quadratic(d) == pytest.approx(quadratic_error(d, torch.zeros_like(d), h), rel=1e-4)


def test_lower_block_gram_equals_the_full_product():
    from qtool.calib.collect import GRAM_BLOCK, InputStats
    g = torch.Generator().manual_seed(0)
    n = 2 * GRAM_BLOCK + 37  # a partial last block
    st = InputStats(n, torch.device("cpu"), hessian=True)
    xs = [torch.randn(3, 19, n, generator=g) for _ in range(3)]
    for x in xs:
        st.add(x)
    X = torch.cat([x.reshape(-1, n) for x in xs]).double()
    ref = X.T @ X
    assert torch.equal(st.hessian, st.hessian.T)
    assert float((st.hessian.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())
    st.add(xs[0])  # more inputs after a read: the blocks above the diagonal follow again
    ref = ref + xs[0].reshape(-1, n).double().T @ xs[0].reshape(-1, n).double()
    assert float((st.hessian.double() - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [(3, 3), (3, 90), (127, 0)])
def test_non_finite_hessian_is_named_as_such(bad, where):
    w, h = layer()
    h[where] = h[where[::-1]] = bad  # XᵀX is symmetric, whatever it holds
    with pytest.raises(QtoolError, match="hessian has non-finite values") as e:
        gptq_quantize(w, h, QuantSpec(4, True, 32, "gptq"), name="model.layers.1.self_attn.o_proj")
    assert e.value.path == "model.layers.1.self_attn.o_proj"


def test_dead_columns_are_handled():
    w, h = layer(seed=1)
    h[:, 5] = 0
    h[5, :] = 0
    q, s, z = gptq_quantize(w, h, QuantSpec(4, True, 32, "gptq"))
    assert torch.isfinite(core.dequantize(q, s, z, QuantSpec(4, True, 32, "gptq")).float()).all()


def test_non_positive_definite_hessian_is_an_error():
    w, _ = layer()
    h = 1.5 * torch.eye(128) - 0.5 * torch.ones(128, 128)  # eigenvalue -62.5: no damping fixes it
    with pytest.raises(QtoolError) as e:
        gptq_quantize(w, h, QuantSpec(4, True, 32, "gptq"), name="model.layers.0.mlp.up_proj")
    assert e.value.path == "model.layers.0.mlp.up_proj"
    assert "not positive definite even with damping" in e.value.problem


def test_output_error_matches_definition():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 16, generator=g)
    w = torch.randn(8, 16, generator=g)
    w_hat = w + 0.1 * torch.randn(8, 16, generator=g)
    direct = ((x @ w.T - x @ w_hat.T).norm() / (x @ w.T).norm()).item()
    assert output_error(w, w_hat, x.T @ x) == pytest.approx(direct, rel=1e-6)


def _textbook_gptq(w, h, spec, damp=0.01):
    """GPTQ as the paper writes it, float64, no lazy blocks: act-order (columns by descending diag H) with static
    min-max group scales of the original columns, H⁻¹ of the damped Hessian, each column's error pushed through the
    rows of its Cholesky factor."""
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    W = w.double()[:, perm].clone()
    H = h.double()[perm][:, perm]
    H += damp * torch.mean(torch.diagonal(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    s, z = minmax_qparams(w, spec)
    width = spec.group_width(w.shape[1])
    Q = torch.empty(w.shape, dtype=torch.int8)
    for k in range(W.shape[1]):
        g = int(perm[k]) // width
        sj = s[:, g].double()
        zj = 0.0 if z is None else z[:, g].double()
        q = torch.clamp(torch.round(W[:, k] / sj + zj), spec.qmin, spec.qmax)
        Q[:, perm[k]] = q.to(torch.int8)
        err = (W[:, k] - (q - zj) * sj) / U[k, k]
        W[:, k:] -= err[:, None] * U[k, k:][None, :]
    return Q, s, z


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 32, "gptq"), QuantSpec(4, False, 128, "gptq")])
def test_gptq_matches_the_textbook_algorithm(spec):
    # lazy blocks, row tiles / the C kernel and the one-factorization inverse change rounding only: the codes agree
    # with a float64 column-by-column reference except at rare near-ties, and so does the output error
    w, h = layer(rows=64, cols=256, n=1024, seed=5)
    q, s, z = gptq_quantize(w, h, spec, search=False, block_size=64)
    rq, rs, rz = _textbook_gptq(w, h, spec)
    assert torch.equal(s, rs)
    assert (q != rq).float().mean() < 0.002
    ours, ref = core.dequantize(q, s, z, spec), core.dequantize(rq, rs, rz, spec)
    assert output_error(w, ours, h) == pytest.approx(output_error(w, ref, h), rel=2e-3)


def test_output_errors_share_the_denominator():
    from qtool.quant.gptq import output_errors
    w, h = layer(seed=6)
    a, b = w + 0.01 * torch.randn_like(w), w - 0.003
    assert output_errors(w, [a, b], h) == [output_error(w, a, h), output_error(w, b, h)]


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    from qtool.quant.gptq import _inverse_cholesky
    _, h = layer(seed=7)
    Uj, lam, _ = _inverse_cholesky(h, 0.01, "")
    U = Uj.flip(0, 1)  # returned reversed
    assert lam == pytest.approx(0.01 * float(torch.mean(torch.diagonal(h))))
    hd = h.double() + lam * torch.eye(h.shape[0], dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    assert torch.equal(U, torch.triu(U))
    assert float((U.double() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("act_order", [True, False])
def test_residual_equals_the_product_with_the_hessian(act_order):
    # GPTQ's own scaled errors give tr(ΔW H ΔWᵀ) (the report's output error) without a product with H; dead
    # columns and the damping are taken out again
    from qtool.quant.gptq import residual
    w, h = layer(rows=40, cols=256, seed=8)
    h[:, 7] = 0
    h[7, :] = 0
    spec = QuantSpec(4, False, 64, "gptq")
    record = {}
    other = w + 0.01 * torch.randn_like(w)
    q, s, z = gptq_quantize(w, h, spec, act_order=act_order, record=record, measure=(w, other))
    w_hat = core.dequantize(q, s, z, spec).float()
    d = (w - w_hat).double()
    direct = float(((d @ h.double()) * d).sum())
    assert residual(w, w_hat, record) == pytest.approx(direct, rel=1e-5)
    # tr(A H Aᵀ) of the measured matrices from the factor (its triangle, less damping and dead columns)
    for a, got in zip((w, other), record["quadratic"]):
        assert got == pytest.approx(float(((a.double() @ h.double()) * a.double()).sum()), rel=1e-5)
