"""The eval report (kind "eval"): perplexities, KL statistics, top-1 agreement, per-block hidden errors, gate.

    ppl = exp(Σ NLL / predicted positions) over all windows; ppl_ratio = ppl / ref_ppl
    kld: mean, median, p90, p99 (linear interpolation between order statistics, numpy's default) and max of the
         per-position KL(P_ref ‖ P_model) in nats
    top1_agreement: fraction of predicted positions where both models' argmax agree
Without a reference only ppl and the counts are filled; the comparison fields are null.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import __version__
from ..report.errors import json_safe

# metric (as named in gate.failed) → (report value, how it fails)
GATES = {
    "kld": (lambda r: (r.get("kld") or {}).get("mean"), lambda v, x: v > x),
    "ppl_ratio": (lambda r: r.get("ppl_ratio"), lambda v, x: v > x),
    "top1_agreement": (lambda r: r.get("top1_agreement"), lambda v, x: v < x),
}


def _ppl(nll: torch.Tensor) -> float:
    mean = float(nll.double().mean())
    return math.exp(mean) if mean < 709 else math.inf   # beyond exp's float64 range


def kld_stats(kld: torch.Tensor) -> dict:
    k = kld.double().numpy()
    median, p90, p99 = np.quantile(k, [0.5, 0.9, 0.99])
    return {"mean": float(k.mean()), "median": float(median), "p90": float(p90), "p99": float(p99),
            "max": float(k.max())}


def gate(report: dict, limits: dict) -> dict | None:
    """limits: {"kld": X, "ppl_ratio": R, "top1_agreement": P} (None = not gated). A metric that is missing or not
    a number fails its gate: a release cannot pass on a value it could not measure."""
    active = {k: v for k, v in limits.items() if v is not None}
    if not active:
        return None
    failed = []
    for metric, limit in active.items():
        value, fails = GATES[metric][0](report), GATES[metric][1]
        if value is None or not math.isfinite(value) or fails(value, limit):
            failed.append(metric)
    return {"passed": not failed, "failed": failed, "max_kld": limits.get("kld"),
            "max_ppl_ratio": limits.get("ppl_ratio"), "min_top1": limits.get("top1_agreement")}


def build(*, model: str, ref: str | None, data: str, seq_len: int, windows: list[torch.Tensor], walked,
          limits: dict, device: str, seconds: float) -> dict:
    tokens = sum(int(w.numel()) for w in windows)
    predicted = tokens - len(windows)
    nll, nll_ref, kld, agree = (walked.cat(n) for n in ("nll", "nll_ref", "kld", "agree"))
    ppl = _ppl(nll)
    ref_ppl = None if nll_ref is None else _ppl(nll_ref)
    ratio = None if ref_ppl is None else (ppl / ref_ppl if ref_ppl > 0 else math.inf)
    errors = walked.hidden_rel_errors()
    report = {
        "kind": "eval", "qtool_version": __version__, "model": model, "ref": ref, "data": data, "seq_len": seq_len,
        "windows": len(windows), "tokens": tokens, "predicted": predicted,
        "ppl": json_safe(ppl), "ref_ppl": json_safe(ref_ppl), "ppl_ratio": json_safe(ratio),
        "kld": None if kld is None else {k: json_safe(v) for k, v in kld_stats(kld).items()},
        "top1_agreement": None if agree is None else float(agree.double().mean()),
        "blocks": None if errors is None else [{"index": i, "hidden_rel_error": json_safe(e)} for i, e in enumerate(errors)],
        "gate": None, "device": device,
        "timing": {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None},
    }
    report["gate"] = gate(report, limits)
    return report


def gate_failure(report: dict) -> str:
    """One line naming each failed metric with its value and limit, e.g. `kld 0.0423 > 0.01`."""
    g = report["gate"]
    limit_of = {"kld": ("max_kld", ">"), "ppl_ratio": ("max_ppl_ratio", ">"), "top1_agreement": ("min_top1", "<")}
    parts = []
    for metric in g["failed"]:
        key, op = limit_of[metric]
        value = GATES[metric][0](report)
        shown = "not measured" if value is None else f"{value:.6g}"
        parts.append(f"{metric} {shown} {op} {g[key]}" if value is not None else f"{metric} {shown}")
    return ", ".join(parts)
