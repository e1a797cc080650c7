"""Per-position next-token metrics from final hidden states, the LM head applied in vocabulary chunks.

Logits are float32 (the head runs in float32 whatever the model's dtype) and only ever exist as tiles of
[tokens, vocabulary chunk]: a 150k-token vocabulary never becomes a [tokens, vocab] matrix. One pass over the
chunks keeps, per position and model, the running max m and s = Σ exp(z − m) rescaled whenever m grows (an online
logsumexp), the target's logit and the argmax; and for the reference also a = Σ exp(z_ref − m_ref)·(z_ref − z),
rescaled with s_ref. At the end, with logZ = m + log s:

    NLL = logZ − z[target]
    KL(P_ref ‖ P) = Σ p_ref·(log p_ref − log p) = a / s_ref − logZ_ref + logZ      (nats, full vocabulary)

Tiles are float32 (z − m ≤ 0, its exp, z_ref − z); every sum, rescaling and the final combination are float64,
so the result equals the direct float32-logits computation to about 1e-8 (each term's float32 rounding, about
6e-8 relative, averages out in the float64 sums). Where both models give the
same logits bit for bit, a is exactly 0 and both logZ are the same bits: KL is exactly 0.

When hidden states and head are both bfloat16 (values a bf16 number holds exactly), the float32 GEMM on the CPU
runs on oneDNN's bf16 kernels (AMX / AVX-512 BF16): the products are exact and the sums float32, as in the
float32 GEMM, at 2-3 times its speed; only the order of the float32 sums differs.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

TILE_ELEMENTS = 1 << 22          # logits per tile: 16 MB of float32 (fewer, larger ops: a busy CPU's threads
                                 # lose more to each op's synchronisation than to its arithmetic)
WEIGHT_CHUNK_BYTES = 16 << 20    # float32 head rows converted at once, per model


class Head:
    """An LM head (weight [vocab, hidden], bias), served as float32 row chunks on a device, and the model's logit
    post-processing if any (`logit_transform`), applied to each float32 tile."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, transform=None):
        self.weight, self.bias, self.transform = weight, bias, transform
        self.vocab, self.hidden = weight.shape
        self.dtype = weight.dtype

    def rows(self, v0: int, v1: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.weight, self.bias
        return w[v0:v1].to(device, torch.float32), None if b is None else b[v0:v1].to(device, torch.float32)


@dataclass
class Scores:
    """Per predicted position (CPU): the model's NLL; with a reference, its NLL, the KL and argmax agreement."""
    nll: torch.Tensor                     # float64 [P]
    nll_ref: torch.Tensor | None = None   # float64 [P]
    kld: torch.Tensor | None = None       # float64 [P], KL(P_ref ‖ P_model) ≥ 0
    agree: torch.Tensor | None = None     # bool [P], argmax_ref == argmax_model (first index on ties)


class _Online:
    """One model's running statistics over the vocabulary chunks seen so far, for P positions."""

    def __init__(self, n: int, device: torch.device):
        self.m = torch.full((n,), -torch.inf, dtype=torch.float32, device=device)   # running max logit
        self.s = torch.zeros(n, dtype=torch.float64, device=device)                 # Σ exp(z − m)
        self.arg = torch.zeros(n, dtype=torch.long, device=device)                  # index of the first max
        self.target = torch.zeros(n, dtype=torch.float32, device=device)            # z[target]

    def update(self, z: torch.Tensor, r: slice, c0: int, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold tile z [rows r, columns c0:c0+c] in; returns (exp(z − m_new), the factor old sums are rescaled by)."""
        local = targets - c0
        inside = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(1)
        if inside.numel():
            self.target[r][inside] = z[inside, local[inside]]
        cmax = z.amax(dim=1)
        m_old = self.m[r]
        grew = (cmax > m_old).nonzero().squeeze(1)   # strictly: an equal later maximum keeps the first index
        if grew.numel():                              # argmax only where this chunk holds a new maximum
            self.arg[r][grew] = z[grew].argmax(dim=1) + c0
        m_new = torch.maximum(cmax, m_old)
        rescale = torch.exp(m_old.double() - m_new.double())   # exp(-inf) = 0 on the first chunk
        e = torch.sub(z, m_new[:, None]).exp_()
        self.s[r] = self.s[r] * rescale + e.sum(dim=1, dtype=torch.float64)
        self.m[r] = m_new
        return e, rescale

    def log_normalizer(self) -> torch.Tensor:
        return self.m.double() + torch.log(self.s)

    def nll(self) -> torch.Tensor:
        return self.log_normalizer() - self.target.double()


@contextmanager
def _bf16_products(on: bool):
    """float32 GEMMs of operands that hold bf16 values on oneDNN's bf16 kernels (exact products, float32 sums)."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if not on or matmul is None or not hasattr(matmul, "fp32_precision"):   # torch < 2.9: the plain float32 GEMM
        yield
        return
    old = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def logit_transform(config):
    """What a causal LM's forward does to its head's output, as transformers' models do it (on float32 tiles here):
    Gemma-2/3 soft-capping `tanh(z / c)·c`, Granite's `z / logits_scaling`, Cohere's `z · logit_scale`. None: none."""
    cap = getattr(config, "final_logit_softcapping", None)
    divide = getattr(config, "logits_scaling", None)
    scale = getattr(config, "logit_scale", None)
    steps = []
    if divide not in (None, 1, 1.0):
        steps.append(lambda z: z.div_(divide))
    if scale not in (None, 1, 1.0):
        steps.append(lambda z: z.mul_(scale))
    if cap is not None:
        steps.append(lambda z: z.div_(cap).tanh_().mul_(cap))
    if not steps:
        return None

    def transform(z: torch.Tensor) -> torch.Tensor:
        for step in steps:
            z = step(z)
        return z
    return transform


def _logits(hidden: torch.Tensor, head: Head, w: torch.Tensor, b: torch.Tensor | None, bf16: bool) -> torch.Tensor:
    with _bf16_products(bf16):
        z = torch.nn.functional.linear(hidden.float(), w)
    z = z if b is None else z + b
    return z if head.transform is None else head.transform(z)


def chunk_sizes(vocab: int, hidden: int) -> tuple[int, int]:
    """(vocabulary rows per chunk, positions per tile): fixed by the shapes alone, so runs are deterministic."""
    rows = max(1, min(vocab, WEIGHT_CHUNK_BYTES // (4 * hidden)))
    return rows, max(1, TILE_ELEMENTS // rows)


@torch.no_grad()
def score(hidden: torch.Tensor, head: Head, targets: torch.Tensor, ref: tuple | None = None,
          vocab_chunk: int | None = None, tile: int | None = None) -> Scores:
    """Metrics of `hidden` [P, H] (final-norm outputs) under `head` for next tokens `targets` [P]; with
    `ref` = (hidden_ref, head_ref), also the reference's NLL, KL(P_ref ‖ P) and argmax agreement."""
    device = hidden.device
    n = hidden.shape[0]
    vocab = head.vocab
    on_cpu = device.type == "cpu"
    bf16 = on_cpu and hidden.dtype == head.dtype == torch.bfloat16
    bf16_ref = ref is not None and on_cpu and ref[0].dtype == ref[1].dtype == torch.bfloat16
    rows, per_tile = chunk_sizes(vocab, hidden.shape[1])
    rows, per_tile = vocab_chunk or rows, tile or per_tile
    targets = targets.to(device)
    model = _Online(n, device)
    other = _Online(n, device) if ref is not None else None
    a = torch.zeros(n, dtype=torch.float64, device=device) if ref is not None else None
    for v0 in range(0, vocab, rows):
        v1 = min(vocab, v0 + rows)
        w, b = head.rows(v0, v1, device)
        wr, br = ref[1].rows(v0, v1, device) if ref is not None else (None, None)
        for p0 in range(0, n, per_tile):
            r = slice(p0, min(n, p0 + per_tile))
            z = _logits(hidden[r], head, w, b, bf16)
            model.update(z, r, v0, targets[r])
            if ref is None:
                continue
            zr = _logits(ref[0][r], ref[1], wr, br, bf16_ref)
            e, rescale = other.update(zr, r, v0, targets[r])
            a[r] = a[r] * rescale + e.mul_(zr.sub_(z)).sum(dim=1, dtype=torch.float64)   # Σ p_ref·(z_ref − z)
    if ref is None:
        return Scores(model.nll().cpu())
    kld = (a / other.s + (model.log_normalizer() - other.log_normalizer())).clamp_min(0.0)
    return Scores(model.nll().cpu(), other.nll().cpu(), kld.cpu(), (model.arg == other.arg).cpu())
