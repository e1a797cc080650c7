"""GPTQ: lower output error than RTN on correlated inputs, exact shapes/dtypes, loud Hessian failure."""
import pytest
import torch

from qtool.errors import QtoolError
from qtool.quant import core, minmax_qparams
from qtool.quant.gptq import gptq_quantize, output_error
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
