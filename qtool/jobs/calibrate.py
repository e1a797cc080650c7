"""`qtool calibrate`: run calibration data through the original model and save per-channel input statistics.

open → walk the model block by block collecting statistics → write the file atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import runtime
from ..calib.layerwise import collect_stats
from ..calib.moe import MoeCalib
from ..calib.stats import save_stats
from ..checkpoint import open_checkpoint
from ..checkpoint.outputs import STATS, guarded
from .arguments import checked


@checked
@guarded(inputs=("source", "calib"), outputs={"out": STATS})
def calibrate(source, calib, out, calib_samples: int = 128, seq_len: int = 512, device: str = "auto",
              moe_calib: str = "routed", moe_min_tokens: int | None = None, overwrite: bool = False,
              revision: str | None = None, progress=None) -> dict:
    """Write `out` (a qtool-calib-stats safetensors file); returns {"layers" (linear modules), "blocks", "samples",
    "tokens", "seq_len", "device", "seconds", "processes" (torchrun's world size), "out", "experts"} where "experts"
    has one row per MoE expert weight: {"module", "expert", "tokens" (routed to it), "stats" ("routed" or "all": where
    its statistics came from)}."""
    out = Path(out)
    ckpt = open_checkpoint(source, revision)
    with runtime.session(device, parallel=False) as rt:
        stats, info = collect_stats(ckpt, calib, samples=calib_samples, seq_len=seq_len, device=rt.device,
                                    progress=progress, moe=MoeCalib.of(moe_calib, moe_min_tokens), group=rt.group)
        summary = None
        if rt.group.root:  # under torchrun rank 0 holds the sums and alone writes the file
            meta = {"samples": info["samples"], "tokens": info["tokens"], "seq_len": seq_len, "source": str(source)}
            if info["experts"]:
                meta["experts"] = json.dumps({r["module"]: {"expert": r["expert"], "tokens": r["tokens"],
                                                            "stats": r["stats"]} for r in info["experts"]}, sort_keys=True)
            save_stats(out, stats, meta)
            summary = {"layers": info["modules"], "blocks": info["layers"], "samples": info["samples"],
                       "tokens": info["tokens"], "seq_len": seq_len, "device": info["device"],
                       "seconds": info["seconds"], "processes": info["processes"], "out": str(out),
                       "experts": info["experts"]}
        return rt.group.broadcast_object(summary, src=0)
