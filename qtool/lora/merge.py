"""The merge math of peft 0.21.2 (`tuners/lora/layer.py`, `variants.py`, `dora.py`), in float32.

Each function takes the base tensor as stored and returns float32; the caller casts once to the output dtype.
The float32 operations are the ones PEFT runs (same order, same operands), so for a float32 base and float32
adapter the result is bit-identical to `merge_and_unload()`; for fp16/bf16 bases PEFT adds the fp32 delta into
the low-precision weight (computed in fp32, rounded once), which is also what one cast here gives.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from ..quant.backend import active

KINDS = ("linear", "conv1d", "embedding")


@dataclass(frozen=True)
class LoraTerm:
    """One adapter's low-rank update of one module (tensors already float32).

    linear:    A [r, in], B [out, r], weight [out, in], ΔW = s·B@A
    conv1d:    A [r, in], B [out, r], weight [in, out] (GPT-2 Conv1D), ΔW = (s·B@A)ᵀ
    embedding: A [r, vocab], B [dim, r], weight [vocab, dim], ΔW = (s·B@A)ᵀ  (lora_embedding_A/B)
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    kind: str = "linear"
    bias: torch.Tensor | None = None        # lora_B.bias [out] (lora_bias=True)
    magnitude: torch.Tensor | None = None   # lora_magnitude_vector [out] (DoRA); [dim] for embeddings
    weight: float = 1.0                     # the user's per-adapter weight wᵢ

    @property
    def rank(self) -> int:
        return self.A.shape[0]


_SCRATCH = threading.local()


def scratch(slot: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 buffer of this thread, reused from tensor to tensor: a fresh 40 MB tensor costs more in page
    faults than the arithmetic done in it. Valid until the next call for the same slot."""
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    n = math.prod(shape)
    buf = bufs.get(slot)
    if buf is None or buf.numel() < n:
        buf = bufs[slot] = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(shape)


def delta_weight(t: LoraTerm, out: torch.Tensor | None = None) -> torch.Tensor:
    """wᵢ·sᵢ·Bᵢ@Aᵢ in the base weight's orientation (PEFT get_delta_weight; wᵢ = 1 leaves it bit-identical),
    scaled in place, into `out` when given ([out_features, in_features] float32 on the CPU)."""
    s = _scale(t)
    d = torch.matmul(t.B, t.A, out=out) if out is not None else t.B @ t.A
    d.mul_(s)
    return d if t.kind == "linear" else d.T


def merge_weight(W: torch.Tensor, terms: list[LoraTerm], inplace: bool = False) -> tuple[torch.Tensor, float]:
    """(W + Σ ΔWᵢ in float32, ‖W'−W‖/‖W‖); a DoRA term (always alone) rescales each output row to its magnitude.

    inplace=True lets a float32 W be overwritten (the streaming job owns it); otherwise W is left alone.
    """
    cpu = W.device.type == "cpu" and terms[0].B.device.type == "cpu"
    shape = (terms[0].B.shape[0], terms[0].A.shape[1])
    D = delta_weight(terms[0], out=scratch("delta", shape) if cpu else None)
    for t in terms[1:]:
        D.add_(delta_weight(t, out=scratch("term", shape) if cpu else None))
    if W.dtype == torch.float32:
        W32 = W
    elif cpu:
        W32 = scratch("weight", tuple(W.shape)).copy_(W)  # same values as W.float(), no fresh pages
    else:
        W32 = W.float()
    w_norm = float(torch.linalg.vector_norm(W32))
    dora = terms[0].magnitude
    if dora is None:
        merged = W32.add_(D) if (inplace or W32 is not W) else W32 + D
        return merged, _ratio(float(torch.linalg.vector_norm(D)), w_norm)
    # DoRA: the norm is taken over the unmerged base weight + delta, per output row of the [out, in] matrix;
    # Conv1D and embedding weights are stored transposed, so take it on the transposed view exactly as PEFT's
    # get_weight_norm does (same layout, same reduction order).
    merged = W32 + D
    if terms[0].kind == "linear":
        merged.mul_((dora / torch.linalg.norm(merged, dim=1)).view(-1, 1))
    else:
        merged.mul_((dora / torch.linalg.norm(merged.T, dim=1)).view(1, -1))
    return merged, _ratio(float(torch.linalg.vector_norm(merged - W32)), w_norm)


# float32 elements of one delta block (2 MiB): it is computed, added and cast while it stays in a core's L2;
# smaller blocks spend more time in per-call overhead (measured: 2 workers, 2 cores, 5632x2048 bf16 weights)
_BLOCK_ELEMS = 1 << 19


def fused_merge_applies(W: torch.Tensor, terms: list[LoraTerm], dtype: torch.dtype) -> bool:
    """merge_linear_cast handles these: nn.Linear LoRA terms (no DoRA) on a 2-D CPU weight the kernel reads."""
    return (W.ndim == 2 and all(t.kind == "linear" and t.magnitude is None and t.B.device.type == "cpu" for t in terms)
            and active().merge_applies(W, dtype))


def merge_linear_cast(W: torch.Tensor, terms: list[LoraTerm], dtype: torch.dtype, sink=None):
    """(W + Σ ΔWᵢ cast to `dtype`, ‖ΣΔWᵢ‖/‖W‖, every stored value finite) through the native kernel, a block of
    output rows at a time: the same float32 operations as merge_weight followed by one cast, so the same bits.
    With `sink` (a CheckpointWriter.sink) each block goes straight to the file while it is in cache and the first
    item is None. None where fused_merge_applies is False."""
    if not fused_merge_applies(W, terms, dtype):
        return None
    rows, cols = W.shape
    out = torch.empty(W.shape, dtype=dtype) if sink is None else None
    step = max(1, _BLOCK_ELEMS // max(cols, 1))
    ww = 0.0
    finite = True
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        t0 = terms[0]
        D = torch.matmul(t0.B[r0:r1], t0.A, out=scratch("delta", (r1 - r0, cols)))
        s = _scale(t0)
        if len(terms) > 1:  # Σ wᵢ·sᵢ·Bᵢ@Aᵢ summed as merge_weight does; the kernel then scales by 1 (exact)
            D.mul_(s)
            for t in terms[1:]:
                D.add_(torch.matmul(t.B[r0:r1], t.A, out=scratch("term", (r1 - r0, cols))).mul_(_scale(t)))
            s = 1.0
        block = out[r0:r1] if sink is None else sink.buffer((r1 - r0) * cols, dtype)
        a, ok = active().merge_into(W[r0:r1], D, s, block)
        if sink is not None:
            sink.write(r0 * cols * dtype.itemsize, block)
        ww, finite = ww + a, finite and ok
    return out, _ratio(delta_norm(terms), math.sqrt(ww)), finite


def delta_norm(terms: list[LoraTerm]) -> float:
    """‖Σ wᵢsᵢ·BᵢAᵢ‖_F from the factors, in float64: Σᵢⱼ cᵢcⱼ·⟨BᵢᵀBⱼ, AᵢAⱼᵀ⟩ (r×r products, no out×in pass)."""
    total = 0.0
    for ti in terms:
        for tj in terms:
            gram_b = ti.B.double().T @ tj.B.double()
            gram_a = ti.A.double() @ tj.A.double().T
            total += _scale(ti) * _scale(tj) * float((gram_b * gram_a).sum())
    return math.sqrt(max(total, 0.0))


def _scale(t: LoraTerm) -> float:
    return t.scaling if t.weight == 1.0 else t.scaling * t.weight


def merge_bias(b: torch.Tensor, terms: list[LoraTerm]) -> torch.Tensor:
    """b + Σ wᵢ·sᵢ·lora_Bᵢ.bias (lora_bias=True) in float32."""
    out = b.float().clone()
    for t in terms:
        if t.bias is not None:
            out += t.bias * (t.scaling if t.weight == 1.0 else t.scaling * t.weight)
    return out


def relative_norm(delta: torch.Tensor, ref: torch.Tensor) -> float:
    """‖delta‖_F / ‖ref‖_F (inf when ref is all zeros and delta is not)."""
    return _ratio(float(torch.linalg.vector_norm(delta.float())), float(torch.linalg.vector_norm(ref.float())))


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf: a finite norm proves it without a full-size mask; only an infinite one needs the exact test."""
    return math.isfinite(float(torch.linalg.vector_norm(t))) or bool(torch.isfinite(t).all())


def _ratio(d: float, r: float) -> float:
    if r == 0.0:
        return 0.0 if d == 0.0 else float("inf")
    return d / r
