"""The `lora` block of a report: what a PEFT adapter holds and what it adds to its base."""
from __future__ import annotations

import math

from ..checkpoint import Checkpoint


def adapter_targets(ckpt: Checkpoint) -> list[str]:
    """Module names (last part) that carry lora_A/lora_B tensors, e.g. ["q_proj", "v_proj"]."""
    found = set()
    for name in ckpt.tensors:
        parts = name.split(".")
        if "lora_A" in parts:
            found.add(parts[parts.index("lora_A") - 1])
    return sorted(found)


def lora_block(ckpt: Checkpoint, base_parameters: int | None) -> dict:
    cfg = ckpt.adapter_config or {}
    r = cfg.get("r")
    alpha = cfg.get("lora_alpha")
    scaling = None
    if r and alpha is not None:
        scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    params = sum(info.numel for info in ckpt.tensors.values())
    return {
        "rank": r,
        "alpha": alpha,
        "scaling": scaling,
        "use_rslora": bool(cfg.get("use_rslora")),
        "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "targets": adapter_targets(ckpt),
        "target_modules": cfg.get("target_modules"),
        "parameters": params,
        "base_parameters": base_parameters,
        "fraction_of_base": params / base_parameters if base_parameters else None,
    }
