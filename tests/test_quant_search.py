"""MSE search: never worse than min-max on any group, clearly better on average, importance-aware."""
import pytest
import torch

from qtool.quant import core, minmax_qparams
from qtool.quant import mse_qparams
from qtool.quant.spec import QuantSpec


def group_err(w, s, z, spec, imp=None):
    d = (core.dequantize(core.quantize(w, s, z, spec), s, z, spec).float() - w.float()) ** 2
    if imp is not None:
        d = d * imp
    return core.grouped(d, spec).sum(-1)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, 64, "mse"), QuantSpec(4, False, 64, "mse"),
                                  QuantSpec(8, True, -1, "mse"), QuantSpec(8, False, -1, "mse"),
                                  QuantSpec(4, True, 0, "mse")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_never_worse_than_minmax_per_group(spec, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 256, generator=g) * 0.02)
    w[0] = 0
    w[1, 3] = 0.4
    w = w.to(dtype)
    s0, z0 = minmax_qparams(w, spec)
    s, z = mse_qparams(w, spec)
    assert s.shape == s0.shape and s.dtype == s0.dtype
    assert (z is None) == (z0 is None)
    if z is not None:
        assert z.dtype == torch.int8 and int(z.min()) >= spec.qmin and int(z.max()) <= spec.qmax
    e0, e1 = group_err(w, s0, z0, spec), group_err(w, s, z, spec)
    assert bool((e1 <= e0).all())
    if spec.bits == 4 and spec.strategy != "tensor":
        # int4 groups lose ~15-20% (sym) / ~8% (asym) of their squared error
        assert e1.sum() < (0.9 if spec.symmetric else 0.95) * e0.sum()


def test_importance_weighting_helps_weighted_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 128, generator=g) * 0.02
    imp = torch.rand(128, generator=g) ** 4 * 10  # a few columns matter much more
    spec = QuantSpec(4, True, 128, "mse")
    s_plain, _ = mse_qparams(w, spec)
    s_imp, _ = mse_qparams(w, spec, importance=imp)
    assert group_err(w, s_imp, None, spec, imp).sum() < group_err(w, s_plain, None, spec, imp).sum()


def test_importance_length_checked():
    with pytest.raises(ValueError, match="importance"):
        mse_qparams(torch.randn(4, 64), QuantSpec(4, True, 32, "mse"), importance=torch.ones(10))
