"""The eval report (kind "eval", report.schema.EvalReport), built from what the lockstep walk measured:

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
from .errors import json_safe
from .schema import EvalBlock, EvalGate, EvalReport, Kld

# metric (as named in gate.failed) → (report value, how it fails, the gate's limit field, how it is written)
GATES = {
    "kld": (lambda r: (r.get("kld") or {}).get("mean"), lambda v, x: v > x, "max_kld", ">"),
    "ppl_ratio": (lambda r: r.get("ppl_ratio"), lambda v, x: v > x, "max_ppl_ratio", ">"),
    "top1_agreement": (lambda r: r.get("top1_agreement"), lambda v, x: v < x, "min_top1", "<"),
}


def _ppl(nll: torch.Tensor) -> float:
    mean = float(nll.double().mean())
    return math.exp(mean) if mean < 709 else math.inf   # beyond exp's float64 range


def kld_part(kld: torch.Tensor) -> Kld:
    k = kld.double().numpy()
    median, p90, p99 = np.quantile(k, [0.5, 0.9, 0.99])
    stats = {"mean": k.mean(), "median": median, "p90": p90, "p99": p99, "max": k.max()}
    return {name: json_safe(float(v)) for name, v in stats.items()}


def eval_gate_part(report: EvalReport, limits: dict) -> EvalGate | None:
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


def eval_report(*, model: str, ref: str | None, data: str, seq_len: int, lengths: list[int], nll: torch.Tensor,
                nll_ref: torch.Tensor | None, kld: torch.Tensor | None, agree: torch.Tensor | None,
                hidden_errors: list[float] | None, limits: dict, device: str, seconds: float,
                processes: int = 1) -> EvalReport:
    """lengths: each window's tokens; nll, nll_ref, kld, agree: per predicted position; hidden_errors: per block;
    processes: the torchrun run's world size."""
    tokens = sum(lengths)
    ppl = _ppl(nll)
    ref_ppl = None if nll_ref is None else _ppl(nll_ref)
    ratio = None if ref_ppl is None else (ppl / ref_ppl if ref_ppl > 0 else math.inf)
    blocks: list[EvalBlock] | None = None if hidden_errors is None else [
        {"index": i, "hidden_rel_error": json_safe(e)} for i, e in enumerate(hidden_errors)]
    report: EvalReport = {
        "qtool_version": __version__, "kind": "eval", "model": model, "ref": ref, "data": data, "seq_len": seq_len,
        "windows": len(lengths), "tokens": tokens, "predicted": tokens - len(lengths),
        "ppl": json_safe(ppl), "ref_ppl": json_safe(ref_ppl), "ppl_ratio": json_safe(ratio),
        "kld": None if kld is None else kld_part(kld),
        "top1_agreement": None if agree is None else float(agree.double().mean()),
        "blocks": blocks, "gate": None, "device": device,
        "timing": {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
                   "processes": processes},
    }
    report["gate"] = eval_gate_part(report, limits)
    return report


def gate_failure(report: EvalReport) -> str:
    """One line naming each failed metric with its value and limit, e.g. `kld 0.0423 > 0.01`."""
    g = report["gate"]
    parts = []
    for metric in g["failed"]:
        value, _, key, op = GATES[metric]
        v = value(report)
        parts.append(f"{metric} not measured" if v is None else f"{metric} {v:.6g} {op} {g[key]}")
    return ", ".join(parts)
