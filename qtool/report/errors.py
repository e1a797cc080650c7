"""The error parts of a report: the summary of the per-tensor errors, and the quality gate."""
from __future__ import annotations

import math

from .schema import Gate, Layer, Summary

WORST = 5  # names in summary.worst unless the job is asked for another number (inspect --top)


def summary_part(layers: list[Layer], worst: int = WORST) -> Summary | None:
    # Averages over the quantized tensors when there are any: copied tensors' zero errors would dilute them.
    rows = [r for r in layers if r.get("error")]
    if any(r.get("quantized") for r in rows):
        rows = [r for r in rows if r.get("quantized")]
    errs = [(r["name"], r["error"]) for r in rows]
    if not errs:
        return None
    rel = [e["rel_error"] for _, e in errs]
    sq = [e["sqnr_db"] for _, e in errs if e["sqnr_db"] is not None]
    order = sorted(errs, key=lambda ne: -ne[1]["rel_error"])
    return {
        "rel_error_mean": sum(rel) / len(rel),
        "rel_error_max": max(rel),
        "sqnr_db_min": min(sq) if sq else None,
        "worst": [n for n, _ in order[:worst]],
    }


def gate_part(layers: list[Layer], max_rel_error: float | None) -> Gate | None:
    """Every tensor with an error block counts, dense ones included (a merge or any other change is gated too)."""
    if max_rel_error is None:
        return None
    failed = [r["name"] for r in layers if r.get("error") and not (r["error"]["rel_error"] <= max_rel_error)]
    return {"max_rel_error": max_rel_error, "passed": not failed, "failed": failed}


def json_safe(x: float | None) -> float | None:
    """JSON has no inf/nan: an exact reconstruction's SQNR is reported as null."""
    if x is None or math.isnan(x) or math.isinf(x):
        return None
    return float(x)
