"""`qtool inspect`: what a checkpoint holds and costs, and optionally its error against a reference.

open → size part (and, for an adapter, its LoRA block; with --lora-rank, a fine-tune's memory) → with --against,
every floating tensor's error against the reference's, their summary and the gate → report."""
from __future__ import annotations

import time

from .. import runtime
from ..checkpoint import Checkpoint, open_checkpoint
from ..errors import QtoolError
from ..formats.dense import DenseView
from ..quant.core import error_stats
from ..report.errors import gate_part, summary_part
from ..report.lora import adapter_part, checkpoint_training_part
from ..report.schema import Layer, Report, assemble, timing_part
from ..report.size import listing, parameter_count, size_part
from .arguments import checked

TOP = 10  # names in `largest` and summary.worst (the command line's --top)


@checked
def inspect(source: str, against: str | None = None, base: str | None = None, revision: str | None = None,
            max_rel_error: float | None = None, lora_rank: int | None = None, top: int = TOP,
            lora_tokens: int = 0) -> Report:
    """Size report of SOURCE; with `against`, per-tensor errors of SOURCE against that reference. `top`: how many
    names the report's `largest` (by bytes) and, with `against`, `summary.worst` list; `lora_tokens`: the tokens of one
    training step in the `lora_rank` estimate (their activations)."""
    start = time.perf_counter()
    with runtime.session("cpu", parallel=False):
        ckpt = open_checkpoint(source, revision)
        size = size_part(listing(ckpt))
        lora = None
        if ckpt.adapter_config is not None:
            base_ckpt = _adapter_base(ckpt, base, revision)
            lora = adapter_part(ckpt, parameter_count(listing(base_ckpt)) if base_ckpt is not None else None)
        extra = {"largest": [r["name"] for r in sorted(size["layers"], key=lambda r: -r["bytes"])[:top]]}
        if lora_rank is not None:
            extra["lora_training"] = checkpoint_training_part(size, ckpt.config, lora_rank, lora_tokens)
        if against is None:
            return assemble("inspect", source, size, lora=lora, **extra)
        layers = _errors(size["layers"], DenseView(ckpt), DenseView(open_checkpoint(against)), source, against)
        return assemble("inspect", source, size, layers=layers, lora=lora, summary=summary_part(layers, worst=top),
                        gate=gate_part(layers, max_rel_error), timing=timing_part(start, size["bytes"]), **extra)


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


def _errors(layers: list[Layer], view: DenseView, ref: DenseView, source, ref_name) -> list[Layer]:
    """Each floating layer with its error against the same-named tensor of the reference."""
    missing = sorted(set(ref.names) ^ set(view.names))
    if missing:
        where = ref_name if missing[0] not in ref.names else source
        raise QtoolError(where, f"no tensor named {missing[0]!r} ({len(missing)} names differ between the two checkpoints)")
    out = []
    for row in layers:
        if view.is_floating(row["name"]):
            a, b = ref.get(row["name"]), view.get(row["name"])
            if a.shape != b.shape:
                raise QtoolError(row["name"], f"shape {tuple(b.shape)} differs from the reference's {tuple(a.shape)}")
            row = {**row, "error": error_stats(a, b)}
        out.append(row)
    return out
