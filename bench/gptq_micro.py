#!/usr/bin/env python
"""Evidence for the avoidable costs of qtool's GPTQ loop: each step as qtool does it beside a cheaper equal one.

    python bench/gptq_micro.py [--rows 5632] [--cols 2048] [--threads 1]

Thread CPU seconds (time.thread_time), one torch thread by default, random data with the shapes of the 1 GB
bench model (gate/up: 5632 x 2048, down: 2048 x 5632). Each pair is checked to give the same numbers.
  rank-1 update    W1[:, i:] -= err ⊗ U1[i, i:] per column over all rows of the block (qtool: [rows, 128], 2.9 MB
                   for 5632 rows, past L2) vs addr_ in place vs the same on 256-row tiles (128 KB, cache-resident)
  lazy update      W[:, i2:] -= Err1 @ U[i1:i2, i2:] per block (a [rows, cols - i2] temporary) vs addmm_
  inverse factor   chol(H) → cholesky_inverse → chol(·, upper) (qtool's _inverse_cholesky) vs one Cholesky
                   of the reversed matrix and one triangular inverse (U = J·L⁻ᵀ·J, J the reversal)
  output error     tr(W H Wᵀ) computed twice (before and after) vs once
"""
from __future__ import annotations

import argparse
import time

import torch


def cpu(fn, *args):
    t = time.thread_time()
    out = fn(*args)
    return time.thread_time() - t, out


def rank1_current(W1, err_cols, U1):
    W1 = W1.clone()
    for i in range(W1.shape[1]):
        W1[:, i:] -= err_cols[:, i].unsqueeze(1) * U1[i, i:].unsqueeze(0)
    return W1


def rank1_inplace(W1, err_cols, U1):
    W1 = W1.clone()
    for i in range(W1.shape[1]):
        W1[:, i:].addr_(err_cols[:, i], U1[i, i:], alpha=-1)
    return W1


def rank1_row_tiles(W1, err_cols, U1, tile=256):
    # rows are independent given U: the same updates on row tiles that stay in L1/L2 (here [256, 128] floats)
    W1 = W1.clone()
    for r0 in range(0, W1.shape[0], tile):
        T = W1[r0:r0 + tile]
        E = err_cols[r0:r0 + tile]
        for i in range(T.shape[1]):
            T[:, i:] -= E[:, i].unsqueeze(1) * U1[i, i:].unsqueeze(0)
    return W1


def lazy_current(W, Err, U, block=128):
    W = W.clone()
    for i1 in range(0, W.shape[1], block):
        i2 = min(W.shape[1], i1 + block)
        W[:, i2:] -= Err[:, i1:i2] @ U[i1:i2, i2:]
    return W


def lazy_inplace(W, Err, U, block=128):
    W = W.clone()
    for i1 in range(0, W.shape[1], block):
        i2 = min(W.shape[1], i1 + block)
        W[:, i2:].addmm_(Err[:, i1:i2], U[i1:i2, i2:], alpha=-1)
    return W


def inv_factor_current(H):
    L = torch.linalg.cholesky(H)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def inv_factor_one_cholesky(H):
    # J H J = L Lᵀ (J reverses the order) gives H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper triangular
    Lr = torch.linalg.cholesky(H.flip(0, 1))
    Linv = torch.linalg.solve_triangular(Lr, torch.eye(H.shape[0], dtype=H.dtype), upper=False)
    return Linv.flip(0, 1).contiguous()


def err_current(W, D, H):
    a = float(((D @ H) * D).sum(dtype=torch.float64)) / float(((W @ H) * W).sum(dtype=torch.float64))
    b = float(((D @ H) * D).sum(dtype=torch.float64)) / float(((W @ H) * W).sum(dtype=torch.float64))
    return a, b


def err_once(W, D, H):
    den = float(((W @ H) * W).sum(dtype=torch.float64))
    return float(((D @ H) * D).sum(dtype=torch.float64)) / den, float(((D @ H) * D).sum(dtype=torch.float64)) / den


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5632)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows, cols = a.rows, a.cols
    X = torch.randn(4 * cols, cols, generator=g)
    H = X.T @ X
    H += 0.01 * H.diagonal().mean() * torch.eye(cols)
    W = torch.randn(rows, cols, generator=g) * 0.02
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Err = torch.randn(rows, cols, generator=g) * 1e-3
    print(f"shape [{rows}, {cols}], {a.threads} thread(s); CPU seconds (current → cheaper, same result)")
    t1, r1 = cpu(rank1_current, W[:, :128], Err[:, :128], U[:128, :128])
    t2, r2 = cpu(rank1_inplace, W[:, :128], Err[:, :128], U[:128, :128])
    t3, r3 = cpu(rank1_row_tiles, W[:, :128], Err[:, :128], U[:128, :128])
    blocks = cols // 128
    print(f"rank-1 updates, one 128-column block: {t1:.3f} s; addr_ {t2:.3f} s; 256-row tiles {t3:.3f} s "
          f"(x{blocks} blocks per weight); max diff {float((r1 - r2).abs().max()):.2e}, "
          f"{float((r1 - r3).abs().max()):.2e}")
    t1, r1 = cpu(lazy_current, W, Err, U)
    t2, r2 = cpu(lazy_inplace, W, Err, U)
    print(f"lazy block updates, whole weight: {t1:.2f} → {t2:.2f} s; max rel diff "
          f"{float((r1 - r2).abs().max() / r1.abs().max()):.2e}")
    t1, u1 = cpu(inv_factor_current, H)
    t2, u2 = cpu(inv_factor_one_cholesky, H)
    print(f"upper factor of H⁻¹ [{cols}²]: {t1:.2f} → {t2:.2f} s; max rel diff "
          f"{float((u1 - u2).abs().max() / u1.abs().max()):.2e}")
    D = W - torch.round(W * 50) / 50
    t1, e1 = cpu(err_current, W, D, H)
    t2, e2 = cpu(err_once, W, D, H)
    print(f"output error before+after (2 ratios): {t1:.2f} → {t2:.2f} s (den once); same: {e1 == e2}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
