"""The LM head in vocabulary chunks: the online logsumexp / KL formulation equals the direct computation."""
from __future__ import annotations

import pytest
import torch

from qtool.eval.head import TILE_ELEMENTS, WEIGHT_CHUNK_BYTES, Head, chunk_sizes, score


def _case(p=48, h=32, v=150_000, seed=0, scale=1.0, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(p, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.3 * scale
    b = torch.randn(v, generator=g)
    hid_r = hid + noise * torch.randn(p, h, generator=g)
    w_r = w + noise * scale * torch.randn(v, h, generator=g)
    y = torch.randint(0, v, (p,), generator=g)
    return hid, Head(w, b), hid_r, Head(w_r), y


def _direct(hid, head, hid_r, head_r, y):
    """Full [positions, vocab] logits in float32, then float64 log-softmax, NLL and KL."""
    z = hid @ head.weight.T + head.bias
    zr = hid_r @ head_r.weight.T
    lp, lpr = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
    rows = torch.arange(len(y))
    return -lp[rows, y], -lpr[rows, y], (lpr.exp() * (lpr - lp)).sum(-1), z.argmax(-1) == zr.argmax(-1)


@pytest.mark.parametrize("scale", [1.0, 30.0])   # 30: logits in the hundreds, where a naive exp overflows
def test_chunked_equals_direct_over_a_150k_vocabulary(scale):
    hid, head, hid_r, head_r, y = _case(scale=scale)
    nll, nll_r, kld, agree = _direct(hid, head, hid_r, head_r, y)
    # odd chunk sizes: the vocabulary and the positions both end in a partial chunk
    s = score(hid, head, y, ref=(hid_r, head_r), vocab_chunk=37_501, tile=29)
    torch.testing.assert_close(s.nll, nll, rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(s.nll_ref, nll_r, rtol=0, atol=1e-6 * scale)
    assert (s.kld - kld).abs().max() < 1e-6 * scale and kld.mean() > 0.05
    assert torch.equal(s.agree, agree) and not agree.all()


def test_chunking_does_not_change_the_result():
    hid, head, hid_r, head_r, y = _case(v=20_000)
    a = score(hid, head, y, ref=(hid_r, head_r))
    b = score(hid, head, y, ref=(hid_r, head_r), vocab_chunk=999, tile=13)
    c = score(hid, head, y, ref=(hid_r, head_r), vocab_chunk=20_000, tile=48)   # one chunk, one tile
    for x in (b, c):
        assert (a.kld - x.kld).abs().max() < 1e-7 and (a.nll - x.nll).abs().max() < 1e-7
        assert torch.equal(a.agree, x.agree)


def test_same_logits_give_exactly_zero():
    hid, head, _, _, y = _case(v=5000)
    s = score(hid, head, y, ref=(hid.clone(), Head(head.weight.clone(), head.bias.clone())), vocab_chunk=333, tile=7)
    assert torch.equal(s.kld, torch.zeros_like(s.kld)) and s.agree.all() and torch.equal(s.nll, s.nll_ref)


def test_far_apart_distributions():
    """Nearly disjoint supports: KL is large and still exact to float rounding."""
    hid, head, _, _, y = _case(v=3000)
    other = Head(-head.weight)
    nll, nll_r, kld, agree = _direct(hid, head, hid, other, y)
    s = score(hid, head, y, ref=(hid, other), vocab_chunk=256, tile=10)
    assert kld.min() > 1 and (s.kld - kld).abs().max() < 1e-5 * kld.max()
    assert torch.equal(s.agree, agree)


def test_argmax_ties_take_the_first_index_across_chunks():
    """Two equal maxima in different chunks: torch.argmax's first one, as the direct computation gives."""
    v, h = 50, 4
    w = torch.zeros(v, h)
    w[7, 0] = w[31, 0] = 2.0          # tie between chunk 0 and chunk 3 (chunks of 10)
    w_r = torch.zeros(v, h)
    w_r[31, 0] = 2.0                  # the reference's max is 31 alone
    hid = torch.tensor([[1.0, 0, 0, 0]])
    y = torch.tensor([7])
    s = score(hid, Head(w), y, ref=(hid, Head(w_r)), vocab_chunk=10, tile=1)
    assert (hid @ w.T).argmax() == 7 and not bool(s.agree[0])
    s_self = score(hid, Head(w), y, ref=(hid, Head(w)), vocab_chunk=10, tile=1)
    assert bool(s_self.agree[0])


def test_chunk_sizes_bound_memory():
    for vocab, hidden in ((152_064, 8192), (32_000, 2048), (1024, 64), (50, 7)):
        rows, tile = chunk_sizes(vocab, hidden)
        assert 1 <= rows <= vocab and rows * hidden * 4 <= max(WEIGHT_CHUNK_BYTES, hidden * 4)
        assert rows * tile <= max(TILE_ELEMENTS, rows)


def test_model_alone_gives_nll_only():
    hid, head, _, _, y = _case(v=4000)
    s = score(hid, head, y, vocab_chunk=500, tile=11)
    lp = torch.log_softmax((hid @ head.weight.T + head.bias).double(), -1)
    torch.testing.assert_close(s.nll, -lp[torch.arange(len(y)), y], rtol=0, atol=1e-6)
    assert s.kld is None and s.agree is None and s.nll_ref is None


def test_bf16_operands_give_the_float32_logits():
    """bf16 hidden states and head (the usual checkpoint): whatever kernel runs (oneDNN's bf16 one on CPUs that
    have it), the logits are float32 sums of exact products: as close to the correctly rounded float32 logits as
    the plain float32 GEMM's are, to a small factor (both differ from them only by the order of the float32 sums,
    and a blocked kernel's order can be a few times worse: 2.1x on an AMD EPYC with AVX-512 BF16), and four orders
    of magnitude closer than bf16-rounded logits would be."""
    hid, head, hid_r, head_r, y = _case(v=30_000, h=256)
    hb, hrb = hid.bfloat16(), hid_r.bfloat16()
    wb, wrb = head.weight.bfloat16(), head_r.weight.bfloat16()

    def kl(z, zr):
        lp, lpr = torch.log_softmax(z.double(), -1), torch.log_softmax(zr.double(), -1)
        return (lpr.exp() * (lpr - lp)).sum(-1), -lp[torch.arange(len(y)), y]

    exact, nll = kl((hb.double() @ wb.double().T).float(), (hrb.double() @ wrb.double().T).float())
    gemm, _ = kl(hb.float() @ wb.float().T, hrb.float() @ wrb.float().T)
    s = score(hb, Head(wb), y, ref=(hrb, Head(wrb)))
    err, gemm_err = (s.kld - exact).abs().max(), (gemm - exact).abs().max()
    bf16, _ = kl((hb.float() @ wb.float().T).bfloat16().float(), (hrb.float() @ wrb.float().T).bfloat16().float())
    assert err < 1e-5 and err <= 4 * gemm_err and err < 1e-3 * (bf16 - exact).abs().max() and exact.mean() > 0.05
    torch.testing.assert_close(s.nll, nll, rtol=0, atol=1e-5)
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"    # the switch does not leak out


def test_never_a_tokens_by_vocabulary_matrix(monkeypatch):
    """Every logits tile the head computes stays within TILE_ELEMENTS, far below [positions, vocab]."""
    sizes = []
    real = torch.nn.functional.linear

    def spy(x, w, b=None):
        out = real(x, w, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    hid, head, hid_r, head_r, y = _case(p=200, h=16)
    s = score(hid, head, y, ref=(hid_r, head_r))
    assert sizes and max(sizes) <= TILE_ELEMENTS < 200 * 150_000 and s.kld.shape == (200,)
