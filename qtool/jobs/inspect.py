"""`qtool inspect`: what a checkpoint holds and costs, and optionally its error against a reference."""
from __future__ import annotations

import time

from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import QtoolError
from ..formats.dense import DenseView
from ..quant.core import error_stats
from ..report.adapter import lora_block
from ..report.errors import gate as gate_block, summarize
from ..report.size import lora_training_estimate, size_report


def _adapter_base(adapter: Checkpoint, base: str | None, revision: str | None) -> Checkpoint | None:
    if base is not None:
        return open_checkpoint(base, revision)
    named = (adapter.adapter_config or {}).get("base_model_name_or_path")
    if not named:
        return None
    local = adapter.root / named
    try:  # the adapter's own record of its base: use it when it can be found here, else stay silent
        return open_checkpoint(local if local.exists() else named)
    except QtoolError:
        return None


def inspect(source: str, against: str | None = None, base: str | None = None, revision: str | None = None,
            max_rel_error: float | None = None, lora_rank: int | None = None, lora_tokens: int = 0) -> dict:
    """Size report of SOURCE; with `against`, per-tensor errors of SOURCE against that reference."""
    start = time.perf_counter()
    ckpt = open_checkpoint(source, revision)
    report = size_report(ckpt, source=str(source))
    if ckpt.adapter_config is not None:
        base_ckpt = _adapter_base(ckpt, base, revision)
        base_params = size_report(base_ckpt)["parameters"] if base_ckpt is not None else None
        report["lora"] = lora_block(ckpt, base_params)
    if lora_rank is not None:
        report["lora_training"] = lora_training_estimate(report, ckpt.config, lora_rank, tokens=lora_tokens)
    if against is not None:
        add_errors(report, DenseView(ckpt), DenseView(open_checkpoint(against)), against)
        report["gate"] = gate_block(report["layers"], max_rel_error)
        elapsed = time.perf_counter() - start
        report["timing"] = {"seconds": elapsed, "input_gb_per_s": report["bytes"] / 1e9 / elapsed if elapsed else None}
    return report


def add_errors(report: dict, view: DenseView, ref: DenseView, ref_name: str) -> None:
    """Fill each floating layer's error block against the same-named tensor of the reference."""
    missing = sorted(set(ref.names) ^ set(view.names))
    if missing:
        where = ref_name if missing[0] not in ref.names else report["source"]
        raise QtoolError(where, f"no tensor named {missing[0]!r} ({len(missing)} names differ between the two checkpoints)")
    for row in report["layers"]:
        if not view.is_floating(row["name"]):
            continue
        a, b = ref.get(row["name"]), view.get(row["name"])
        if a.shape != b.shape:
            raise QtoolError(row["name"], f"shape {tuple(b.shape)} differs from the reference's {tuple(a.shape)}")
        row["error"] = error_stats(a, b)
    report["summary"] = summarize(report["layers"])
