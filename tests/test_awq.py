"""AWQ's pure parts (qtool.quant.awq): the scale grid, the search on the mapped outputs, folding into norms and rows."""
import pytest
import torch

from qtool.quant import awq
from qtool.quant.spec import QuantSpec


def _acts(tokens=512, cols=128, outliers=(3, 17, 90), gain=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    x[:, list(outliers)] *= gain  # a few salient channels, as in LLM activations
    return x


def _stats(x):
    return x.T @ x, x.abs().mean(0), x.square().mean(0)


def test_grid_and_scales():
    assert awq.alphas(20)[0] == 0.0 and awq.alphas(20)[-1] == 1.0 and len(awq.alphas(20)) == 20
    assert awq.alphas(1) == [0.0]
    with pytest.raises(ValueError):
        awq.alphas(0)
    m = torch.rand(64) + 0.01
    assert torch.equal(awq.channel_scales(m, 0.0), torch.ones(64))
    s = awq.channel_scales(m, 0.7)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    # ranks follow the activations, and α = 1 spreads them as far as the activations are spread
    assert torch.equal(torch.argsort(s), torch.argsort(m))
    s1 = awq.channel_scales(m, 1.0)
    assert float(s1.max() / s1.min()) == pytest.approx(float(m.max() / m.min()), rel=1e-4)


def test_mapped_error_equals_the_outputs_error_on_the_activations():
    x = _acts()
    h, x_mean, imp = _stats(x)
    spec = QuantSpec(bits=4, group_size=32)
    quantize = awq.mse_quantizer(spec)
    g = torch.Generator().manual_seed(1)
    ws = [torch.randn(48, 128, generator=g), torch.randn(16, 128, generator=g)]
    s = awq.channel_scales(x_mean, 0.5)
    want = 0.0
    for w in ws:
        q = quantize((w * s), imp / s.square())
        want += float(((x @ w.T) - (x / s) @ q.T).double().square().sum())
    assert awq.mapped_error([(w, quantize) for w in ws], h, imp, s) == pytest.approx(want, rel=1e-4)
    assert awq.mapped_error([(w, awq.kept_dense) for w in ws], h, imp, s) < 1e-6 * want


def test_big_weights_are_quantized_in_row_blocks_with_the_same_error():
    # more rows than the search takes at a time: per-row schemes go block by block, one scale per tensor at once
    x = _acts()
    h, x_mean, imp = _stats(x)
    w = torch.randn(2 * awq.ROWS + 76, 128, generator=torch.Generator().manual_seed(6))
    s = awq.channel_scales(x_mean, 0.5)
    for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=-1), QuantSpec(bits=4, group_size=0)):
        quantize = awq.mse_quantizer(spec)
        assert quantize.per_row == (spec.group_size != 0)
        q = quantize(w * s, imp / s.square())
        want = float(((x @ w.T) - (x / s) @ q.T).double().square().sum())
        assert awq.mapped_error([(w, quantize)], h, imp, s) == pytest.approx(want, rel=1e-4)
        form = awq.factorize(h, act_order=False, inverse=False)
        assert awq.mapped_error([(w, quantize)], h, imp, s, form) == pytest.approx(want, rel=1e-4)


def test_search_is_never_worse_than_no_scaling_and_helps_with_salient_channels():
    x = _acts()
    h, x_mean, imp = _stats(x)
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(64, 128, generator=g) for _ in range(3)]
    for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=-1), QuantSpec(bits=8)):
        found = awq.search([(w, awq.mse_quantizer(spec)) for w in ws], h, x_mean, imp, n_grid=11)
        assert len(found.errors) == 11
        assert min(found.errors) <= found.errors[0]
        assert found.errors[awq.alphas(11).index(found.alpha)] == min(found.errors)
        assert torch.equal(found.scales, awq.channel_scales(x_mean, found.alpha))
    found = awq.search([(w, awq.mse_quantizer(QuantSpec(bits=4, group_size=-1))) for w in ws], h, x_mean, imp,
                       n_grid=11)
    assert found.alpha > 0 and found.gain < 0.9  # per-channel int4 with 40x outliers: scaling pays


def test_abandoned_candidates_change_nothing_but_their_own_errors():
    # the search stops summing a candidate once it passes the best so far: the same winner, scales and exact errors
    # as every candidate summed in full, and each abandoned one's figure a lower bound above the winner's
    x = _acts()
    h, x_mean, imp = _stats(x)
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(64, 128, generator=g) for _ in range(3)]
    members = [(w, awq.mse_quantizer(QuantSpec(bits=4, group_size=32))) for w in ws]
    found = awq.search(members, h, x_mean, imp, n_grid=11, rough=False)
    form = awq.factorize(h, act_order=False, inverse=False)
    full = [awq.mapped_error(members, h, imp, awq.channel_scales(x_mean, a), form) for a in awq.alphas(11)]
    best = min(range(11), key=lambda i: (full[i], i))
    assert found.alpha == awq.alphas(11)[best] and found.errors[0] == full[0] and min(found.errors) == full[best]
    pruned = [i for i in range(11) if found.errors[i] != full[i]]
    assert pruned and all(full[best] < found.errors[i] <= full[i] for i in pruned)


def _low_rank_acts(seed, rank, tokens=512, cols=128):
    # strongly correlated inputs (a low-rank X plus noise) with a few larger channels
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    x = x + 0.05 * torch.randn(tokens, cols, generator=g)
    x[:, :4] *= 1.0 + seed % 5
    return x, torch.randn(64, cols, generator=g)


def test_bfloat16_ranking_makes_the_float32_choice():
    # the grid ranked with bfloat16 products, then the likely winners measured in float32: the same α, scales and
    # float32 errors as the float32 search (these problems' candidates are far enough apart); the other candidates'
    # estimates within 1e-3 of their float32 errors
    problems = [(_acts(), 2), (_acts(gain=3.0, seed=4), 3)] + [(_low_rank_acts(seed, 4)[0], 1) for seed in (33, 36)]
    g = torch.Generator().manual_seed(7)
    for x, n_members in problems:
        h, x_mean, imp = _stats(x)
        ws = [torch.randn(96, 128, generator=g) for _ in range(n_members)]
        for spec in (QuantSpec(bits=4, group_size=32), QuantSpec(bits=4, group_size=-1)):
            members = [(w, awq.mse_quantizer(spec)) for w in ws]
            exact = awq.search(members, h, x_mean, imp, n_grid=11, rough=False)
            ranked = awq.search(members, h, x_mean, imp, n_grid=11, rough=True)
            assert ranked.alpha == exact.alpha and torch.equal(ranked.scales, exact.scales)
            assert ranked.errors[0] == exact.errors[0] and min(ranked.errors) == min(exact.errors)
            form = awq.factorize(h, act_order=False, inverse=False)
            full = [awq.mapped_error(members, h, imp, awq.channel_scales(x_mean, a), form) for a in awq.alphas(11)]
            for got, want in zip(ranked.errors, full):
                assert got <= want * (1 + 1e-3) and (got >= want * (1 - 1e-3) or got > min(full))
    # every candidate the same (no salient channel: s = 1 for every α): the tie goes to α = 0, as in float32
    x = torch.ones(256, 64)
    h, x_mean, imp = _stats(x)
    w = torch.randn(32, 64, generator=g)
    tie = awq.search([(w, awq.mse_quantizer(QuantSpec(bits=4, group_size=32)))], h, x_mean, imp, n_grid=5, rough=True)
    assert tie.alpha == 0.0 and tie.gain == 1.0


def test_no_salient_channel_keeps_alpha_zero_possible():
    # uniform activations: every s is ~1, the search may keep α = 0; its error is then exactly the unscaled one
    x = torch.ones(256, 64)
    h, x_mean, imp = _stats(x)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    found = awq.search([(w, awq.mse_quantizer(QuantSpec(bits=4, group_size=32)))], h, x_mean, imp, n_grid=5)
    assert found.alpha == 0.0 and found.gain == 1.0


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_fold_into_norm_rescales_its_output(offset):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    norm = Gemma2RMSNorm(32) if offset else LlamaRMSNorm(32)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=g) * 0.3)
        x = torch.randn(5, 32, generator=g)
        s = torch.rand(32, generator=g) + 0.5
        want = norm(x) / s
        norm.weight.copy_(awq.fold_into_norm(norm.weight, s, offset))
        torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-6)


def test_layernorm_and_linear_rows_fold_exactly():
    g = torch.Generator().manual_seed(5)
    ln, v, o = torch.nn.LayerNorm(16), torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)
    with torch.no_grad():
        for p in (*ln.parameters(), *v.parameters(), *o.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(7, 16, generator=g)
        want = o(v(ln(x)))
        s_ln, s_v = torch.rand(16, generator=g) + 0.5, torch.rand(24, generator=g) + 0.5
        ln.weight.copy_(awq.fold_into_norm(ln.weight, s_ln))
        ln.bias.copy_(awq.fold_into_rows(ln.bias, s_ln))
        v.weight.copy_(awq.scale_columns(v.weight, s_ln))
        v.weight.copy_(awq.fold_into_rows(v.weight, s_v))
        v.bias.copy_(awq.fold_into_rows(v.bias, s_v))
        o.weight.copy_(awq.scale_columns(o.weight, s_v))
        torch.testing.assert_close(o(v(ln(x))), want, rtol=1e-5, atol=1e-5)


def test_scaled_hessian_and_relative_change():
    x = _acts(tokens=64, cols=16, outliers=(2,))
    s = torch.rand(16, generator=torch.Generator().manual_seed(6)) + 0.5
    torch.testing.assert_close(awq.scaled_hessian(x.T @ x, s), (x / s).T @ (x / s), rtol=1e-5, atol=1e-3)
    a = torch.tensor([3.0, 4.0])
    assert awq.relative_change(a, a) == 0.0
    assert awq.relative_change(a, torch.tensor([3.0, 5.0])) == pytest.approx(0.2)
    assert awq.relative_change(torch.zeros(2), a) == float("inf")
