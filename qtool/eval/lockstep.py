"""Walk MODEL (and REF) block by block in lockstep on batches of windows, then score the next-token distributions.

Per batch of windows: each model captures the batch (its own forward up to the first block: embedding, mask,
rotary tables); then block i of each model is loaded, run and freed before block i + 1 of either, both hidden states
are kept, and ‖h_model − h_ref‖ / ‖h_ref‖ over the batch's real tokens accumulates per block. After the last block
each model's tail gives the input of its output embeddings and its head, and the heads score every predicted
position together (`head.score`, vocabulary chunks). Windows of different lengths are right-padded to the longest
in the batch and no attention mask is passed: in a causal decoder a position never sees a later one, so padding
cannot change any real position, and padded positions are never scored.

Memory: one block of each model, or the heads of both, plus both models' hidden states of one batch of windows.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from ..progress import NullProgress
from .head import Scores, score
from .stages import ModelStages

DEFAULT_BATCH_TOKENS = 8192  # default windows per batch: this many tokens at --seq-len


@dataclass
class Walked:
    """What the walk measured, on the CPU: per predicted position scores, per block hidden-state sums."""
    scores: list[Scores] = field(default_factory=list)
    diff_sq: torch.Tensor | None = None      # float64 [blocks]: Σ ‖h_model − h_ref‖² over real tokens
    ref_sq: torch.Tensor | None = None       # float64 [blocks]: Σ ‖h_ref‖²

    def cat(self, name: str) -> torch.Tensor | None:
        parts = [getattr(s, name) for s in self.scores]
        return None if parts[0] is None else torch.cat(parts)

    def hidden_rel_errors(self) -> list[float] | None:
        if self.diff_sq is None:
            return None
        return [float(d.sqrt() / r.sqrt()) if r > 0 else (0.0 if d == 0 else float("inf"))
                for d, r in zip(self.diff_sq, self.ref_sq)]


def gathered(group, walked: Walked) -> Walked | None:
    """A torchrun run's walks, one per process over its contiguous share of the windows, on rank 0 as one (None
    elsewhere): per-position scores concatenated in rank order, which is window order, so every per-position value
    and quantile is the one process's; block sums added rank by rank (float64, a fixed order)."""
    parts = group.gather(walked)
    if parts is None:
        return None
    if len(parts) == 1:
        return parts[0]
    out = Walked(scores=[s for p in parts for s in p.scores])
    if walked.diff_sq is not None:
        out.diff_sq, out.ref_sq = parts[0].diff_sq.clone(), parts[0].ref_sq.clone()
        for p in parts[1:]:
            out.diff_sq += p.diff_sq
            out.ref_sq += p.ref_sq
    return out


def default_batch_size(seq_len: int) -> int:
    return max(1, DEFAULT_BATCH_TOKENS // seq_len)


def _pad(windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([w.numel() for w in windows])
    ids = torch.zeros(len(windows), int(lengths.max()), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, : w.numel()] = w
    return ids, lengths


def _token_rows(lengths: torch.Tensor, width: int, hidden: int) -> list[tuple[int, int]]:
    """Row ranges of the real tokens in a [B·L, hidden] view of a batch, adjacent windows merged, each range cut to
    about 2^22 elements (few large ops, bounded float32 copies)."""
    step = max(1, (1 << 22) // hidden)
    merged: list[list[int]] = []
    for b, n in enumerate(lengths.tolist()):
        if merged and merged[-1][1] == b * width:
            merged[-1][1] = b * width + n
        else:
            merged.append([b * width, b * width + n])
    return [(r, min(r + step, stop)) for start, stop in merged for r in range(start, stop, step)]


def _sq_diff(hm: torch.Tensor, hr: torch.Tensor, lengths: torch.Tensor) -> tuple[float, float]:
    """(Σ‖hm − hr‖², Σ‖hr‖²) over the batch's real tokens: float32 differences, float64 sums."""
    b, width, hidden = hr.shape
    hm, hr = hm.reshape(b * width, hidden), hr.reshape(b * width, hidden)
    d = r = 0.0
    for r0, r1 in _token_rows(lengths, width, hidden):
        y = hr[r0:r1].float()
        d += float(torch.linalg.vector_norm(hm[r0:r1].float() - y, dtype=torch.float64)) ** 2
        r += float(torch.linalg.vector_norm(y, dtype=torch.float64)) ** 2
    return d, r


def walk(model: ModelStages, ref: ModelStages | None, windows: list[torch.Tensor], batch_size: int,
         progress=None) -> Walked:
    progress = progress or NullProgress()
    out = Walked()
    walkers = [model] if ref is None else [model, ref]
    if ref is not None:
        out.diff_sq = torch.zeros(model.num_blocks, dtype=torch.float64)
        out.ref_sq = torch.zeros(model.num_blocks, dtype=torch.float64)
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    progress.start("evaluating", len(batches) * model.num_blocks)
    for batch in batches:
        ids, lengths = _pad(batch)
        for w in walkers:
            w.capture(ids)
        _blocks(walkers, out, lengths, progress)
        out.scores.append(_score(walkers, ids, lengths))
    return out


def _blocks(walkers: list[ModelStages], out: Walked, lengths: torch.Tensor, progress) -> None:
    """Every block of each model on the batch, block i of both before block i + 1 of either (one block of each
    model loaded at a time); with a reference, the hidden-state error after each block."""
    stages = [w.blocks() for w in walkers]
    try:
        for i in range(walkers[0].num_blocks):
            for w, blocks in zip(walkers, stages):
                w.run(next(blocks))
            if len(walkers) > 1:
                d, r = _sq_diff(walkers[0].hidden, walkers[1].hidden, lengths)
                out.diff_sq[i] += d
                out.ref_sq[i] += r
            progress.advance(1, description=f"block {i}")
    finally:
        for blocks in stages:
            blocks.close()   # frees the last block


def _score(walkers: list[ModelStages], ids: torch.Tensor, lengths: torch.Tensor) -> Scores:
    """Every predicted position of the batch (each window's positions but its last) against the next token."""
    pos = torch.arange(ids.shape[1])
    predicts = pos[None, :] < (lengths - 1)[:, None]            # [B, L]: position t predicts token t + 1
    targets = torch.roll(ids, -1, dims=1)[predicts]
    with ExitStack() as tails:   # both heads at once: the vocabulary chunks of both are scored together
        heads = [tails.enter_context(w.head()) for w in walkers]
        finals = [h[predicts.to(h.device)] for h, _ in heads]
        ref = (finals[1], heads[1][1]) if len(walkers) > 1 else None
        return score(finals[0], heads[0][1], targets, ref=ref)
