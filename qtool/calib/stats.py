"""The calibration statistics file (`qtool calibrate ... -o stats.safetensors`), an imatrix-like record.

Per linear module `<module>` (the weight's name without `.weight`):
  `<module>.input_sum_sq`  float32 [in]  Σ x_j² over every calibration token reaching the module
  `<module>.input_absmax`  float32 [in]  max |x_j|
  `<module>.input_count`   int64   [1]   number of tokens
Metadata (all strings): format "qtool-calib-stats", version "1", samples, tokens, seq_len, source, and for a
mixture-of-experts model `experts`: JSON {expert module: {"expert", "tokens" (routed to it), "stats" ("routed" or
"all": whether its statistics come from its routed tokens or from every token)}}.
Importance for --method mse is the mean square `input_sum_sq / input_count` (llama.cpp's imatrix `in_sum2 / count`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import QtoolError
from .data import STATS_FORMAT

VERSION = "1"
SUFFIXES = ("input_sum_sq", "input_absmax", "input_count")


def stats_tensors(stats: dict[str, dict]) -> dict[str, torch.Tensor]:
    """{module: {"sum_sq", "absmax", "count"}} → the file's flat tensor dict (CPU, contiguous)."""
    out = {}
    for module in sorted(stats):
        s = stats[module]
        out[f"{module}.input_sum_sq"] = s["sum_sq"].detach().to("cpu", torch.float32).contiguous()
        out[f"{module}.input_absmax"] = s["absmax"].detach().to("cpu", torch.float32).contiguous()
        out[f"{module}.input_count"] = torch.tensor([int(s["count"])], dtype=torch.int64)
    return out


def save_stats(path: str | Path, stats: dict[str, dict], metadata: dict) -> None:
    """Write atomically (checkpoint.outputs): complete, or no file at all."""
    from safetensors.torch import save_file
    from ..checkpoint.outputs import STATS, output_file
    meta = {"format": STATS_FORMAT, "version": VERSION, **{k: str(v) for k, v in metadata.items()}}
    from safetensors import SafetensorError
    try:
        with output_file(path, STATS) as tmp:
            save_file(stats_tensors(stats), str(tmp), metadata=meta)
    except (OSError, SafetensorError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise QtoolError(path, f"cannot write the statistics file ({why}); no file was left") from None


def read_stats(path: str | Path) -> tuple[dict[str, dict], dict]:
    """({module: {"sum_sq", "absmax", "count"}}, metadata) of a statistics file, checked."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise QtoolError(path, "no such statistics file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATS_FORMAT:
                raise QtoolError(path, f"not a qtool calibration statistics file (metadata format is {meta.get('format')!r})")
            if meta.get("version") != VERSION:
                raise QtoolError(path, f"statistics file version {meta.get('version')!r} is not supported (expected {VERSION})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except QtoolError:
        raise
    except Exception as e:
        raise QtoolError(path, f"not a valid safetensors file ({e})") from None
    stats: dict[str, dict] = {}
    for key, t in tensors.items():
        module, _, kind = key.rpartition(".")
        if kind not in SUFFIXES or not module:
            raise QtoolError(path, f"unexpected tensor {key!r} in a statistics file")
        stats.setdefault(module, {})[kind] = t
    out = {}
    for module, parts in stats.items():
        if set(parts) != set(SUFFIXES):
            raise QtoolError(path, f"module {module!r} lacks {sorted(set(SUFFIXES) - set(parts))}")
        ss, am, cnt = parts["input_sum_sq"], parts["input_absmax"], parts["input_count"]
        if ss.ndim != 1 or am.shape != ss.shape or cnt.numel() != 1 or int(cnt) < 0:
            raise QtoolError(path, f"module {module!r}: inconsistent statistics shapes")
        out[module] = {"sum_sq": ss.float(), "absmax": am.float(), "count": int(cnt)}
    return out, meta


def importance(entry: dict) -> torch.Tensor:
    """Mean squared input per channel; a module no token reached gets uniform importance (as imatrix does)."""
    if entry["count"] <= 0:
        return torch.ones_like(entry["sum_sq"])
    return entry["sum_sq"] / entry["count"]


def load_stats(path: str | Path, tensors: dict | None = None, quantized=()) -> dict[str, torch.Tensor]:
    """{module: importance [in] float32} (mean square of the module's input per channel). With the model's
    `tensors` (name -> info with .shape) and the `quantized` modules, a file made from another model is refused."""
    stats, _ = read_stats(path)
    if tensors is not None:
        check_fit(path, stats, tensors, quantized)
    return {module: importance(entry) for module, entry in stats.items()}


def check_fit(path, stats: dict[str, dict], tensors: dict, quantized) -> None:
    """Every module of the file is one of the model's, and each module to quantize has its input width."""
    modules = {name.rpartition(".")[0] for name in tensors}
    for module in sorted(stats):
        if module not in modules:
            raise QtoolError(path, f"has statistics of module {module!r}, which the model does not have "
                                   "(made from another model?)")
    for module in sorted(set(quantized) & set(stats)):
        width, have = tensors[f"{module}.weight"].shape[1], stats[module]["sum_sq"].numel()
        if width != have:
            raise QtoolError(path, f"module {module!r} has {have} input channels in the statistics file but "
                                   f"{width} in the model (made from another model?)")


def expert_sources(path: str | Path) -> dict[str, dict]:
    """{expert module: {"expert", "tokens", "stats"}} recorded in a statistics file (empty for a dense model)."""
    import json
    _, meta = read_stats(path)
    return json.loads(meta.get("experts") or "{}")
