"""Calibration entry points: statistics of the original model, and layer-wise calibrated quantization.

quantize_layerwise walks the model block by block (see `.walk`): for each block it loads the weights, runs every
sample with hooks accumulating per-channel statistics and XᵀX on the device, quantizes the block's planned
linears (gptq with their Hessian, mse with their mean squared input, rtn min-max), loads the dequantized weights
back and runs the samples again, so the next block sees the inputs the quantized model will give it.
Peak memory: one block, its Hessians, and the activations of all samples.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..arch import module_of
from ..errors import QtoolError
from ..progress import NullProgress
from ..quant.gptq import output_error
from ..quant.spec import QuantSpec
from ..quant.weight import quantize_weight
from ..runtime import exact_matmul, resolve_device
from .data import is_stats_file, load_calibration
from .model import build_architecture
from .moe import MoeCalib
from .stats import expert_sources, load_stats


def layer_order(ckpt) -> list[str]:
    """Tensor names in the order the walk visits them (block 0, block 1, ...), every other tensor after."""
    try:
        arch = build_architecture(ckpt)
    except QtoolError:
        return list(ckpt.tensors)
    walked = [n for i in range(len(arch.blocks))
              for n in sorted(n for e in arch.layout.entries_under(f"{arch.blocks_path}.{i}") for n in e.names)]
    seen = set(walked)
    return walked + [n for n in ckpt.tensors if n not in seen]


def _samples(ckpt, calib, samples: int, seq_len: int) -> list[torch.Tensor]:
    if isinstance(calib, (list, tuple)):
        return [torch.as_tensor(c, dtype=torch.long).reshape(-1)[:seq_len] for c in calib[:samples]]
    return load_calibration(calib, ckpt.root if ckpt.is_folder else None, samples=samples, seq_len=seq_len)


def _experts_summary(experts: dict[str, dict]) -> list[dict]:
    """One row per expert weight: its module, expert index, routed tokens and where its statistics came from."""
    return [{"module": module_of(n), **info} for n, info in sorted(experts.items())]


def collect_stats(ckpt, calib, *, samples: int = 128, seq_len: int = 512, device="auto", progress=None,
                  moe: MoeCalib | None = None) -> tuple[dict, dict]:
    """Per linear module {"sum_sq", "absmax", "count"} (CPU) of the original model on the calibration data."""
    from .walk import LayerWalk
    progress = progress or NullProgress()
    device = resolve_device(device)
    t0 = time.perf_counter()
    arch = build_architecture(ckpt)  # a clear error for a model the walk cannot handle, before any data is read
    ids = _samples(ckpt, calib, samples, seq_len)
    out: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    with exact_matmul(device):
        walk = LayerWalk(ckpt, ids, device, moe, arch)
        progress.start("calibrating", len(walk.layers))
        for block in walk.blocks():
            got = walk.collect(block, walk.targets(block), keep=True)
            for name, st in got.stats.items():
                out[module_of(name)] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                        for k, v in st.as_dict().items()}
            experts.update(got.experts)
            progress.advance(1, description=block.path)
    info = {"layers": len(walk.layers), "modules": len(out), "samples": len(ids), "tokens": walk.tokens,
            "seq_len": seq_len, "device": str(device), "seconds": time.perf_counter() - t0,
            "experts": _experts_summary(experts)}
    return out, info


def _plain(ckpt, plan, spec: QuantSpec, device, importance=None, note: str = ""):
    """Quantize one weight with no Hessian: mse (weighted when importance exists) for mse/gptq, min-max for rtn."""
    w = ckpt.get(plan.name)
    method = "rtn" if spec.method == "rtn" else "mse"
    imp = None if importance is None else importance.to(device)
    qw = quantize_weight(w.to(device), spec.with_method(method), importance=imp).cpu()
    extra = {**qw.info, "calibrated": importance is not None, "output_error_before": None, "output_error_after": None}
    if note:
        extra["note"] = note
    return w, qw.codes(), qw.scale, qw.zero_point, extra


def _calibrated(ckpt, name, st, spec: QuantSpec, damp: float, device):
    """(original weight, q, scale, zp, extra, dequantized weight) of one weight with its input statistics."""
    w_orig = ckpt.get(name)
    w = w_orig.to(device)
    h = st.hessian
    qw = quantize_weight(w, spec, hessian=h, importance=st.importance(), damp=damp, name=name)
    w_hat = qw.dequantize(torch.float32)
    if spec.method == "rtn":
        before = after = output_error(w, w_hat, h)
    else:
        before = output_error(w, quantize_weight(w, spec.with_method("rtn")).dequantize(torch.float32), h)
        after = output_error(w, w_hat, h)
    extra = {**qw.info, "calibrated": True, "output_error_before": before, "output_error_after": after}
    qw = qw.cpu()
    return w_orig, qw.codes(), qw.scale, qw.zero_point, extra, w_hat


def _uncalibrated_note(name: str, targets: dict) -> str:
    if name in targets:
        return "GPT-2 Conv1D weight: quantized in its stored [in, out] layout without calibration"
    return "not an nn.Linear or expert weight: quantized without calibration"


def quantize_layerwise(ckpt, plans, spec: QuantSpec, calib, *, samples: int = 128, seq_len: int = 512,
                       damp: float = 0.01, device="auto", emit, progress=None, moe: MoeCalib | None = None) -> dict:
    """Quantize every planned weight with calibration; call emit(name, w, q, scale, zp, extra) for each.

    calib: calibration data (text / JSONL / safetensors token ids, or a list of id tensors) or a statistics file
    from `qtool calibrate` (then no model runs: mse uses its importance, rtn ignores it, gptq is refused).
    Returns {"samples", "tokens", "device", "seconds", "layers", "method", "damp", "calibrated", "uncalibrated",
    "experts"}.
    """
    progress = progress or NullProgress()
    device = resolve_device(device)
    t0 = time.perf_counter()
    todo = {p.name: p for p in plans if p.quantize}
    if not todo:
        conv1d = any("Conv1D" in p.reason for p in plans)
        raise QtoolError(ckpt.path, "nothing to quantize: no tensor is planned for quantization" +
                         (" (GPT-2 Conv1D weights are not quantized by default; --include them to quantize "
                          "them without calibration)" if conv1d else ""))
    if not isinstance(calib, (list, tuple)) and is_stats_file(calib):
        return _from_stats_file(ckpt, todo, spec, Path(calib), device, emit, progress, t0)
    arch = build_architecture(ckpt)  # a clear error for a model the walk cannot handle, before any data is read
    from .walk import LayerWalk, dense_targets
    ids = _samples(ckpt, calib, samples, seq_len)
    calibrated, uncalibrated, experts = [], [], {}
    with exact_matmul(device):
        walk = LayerWalk(ckpt, ids, device, moe, arch)
        progress.start(f"quantizing ({spec.method})", len(walk.layers))
        for block in walk.blocks():
            targets = walk.targets(block)
            block_todo = sorted(n for n in block.tensors if n in todo)
            usable = {**dense_targets(targets), **{n: t for n, t in targets.items() if not isinstance(t, torch.nn.Module)}}
            names = [n for n in block_todo if n in usable]
            got = walk.collect(block, names, hessian=True) if names else None
            w_hats = {}
            for name in block_todo:
                if name not in usable:
                    emit(name, *_plain(ckpt, todo.pop(name), spec, device, note=_uncalibrated_note(name, targets)))
                    uncalibrated.append(name)
                    continue
                *parts, extra, w_hats[name] = _calibrated(ckpt, name, got.stats.pop(name), spec, damp, device)
                if name in got.experts:
                    extra["expert"] = got.experts[name]
                    experts[name] = got.experts[name]
                emit(name, *parts, extra)
                calibrated.append(name)
                todo.pop(name)
            if w_hats:
                walk.update(block, w_hats)
                del got, w_hats
                walk.run(block, keep=True)
            progress.advance(1, description=block.path)
    for name in [n for n in layer_order(ckpt) if n in todo]:
        emit(name, *_plain(ckpt, todo.pop(name), spec, device, note="outside the walked blocks: no calibration statistics"))
        uncalibrated.append(name)
    return {"samples": len(ids), "tokens": walk.tokens, "device": str(device), "seconds": time.perf_counter() - t0,
            "layers": len(walk.layers), "method": spec.method, "damp": damp, "calibrated": len(calibrated),
            "uncalibrated": uncalibrated, "experts": _experts_summary(experts)}


def _from_stats_file(ckpt, todo: dict, spec: QuantSpec, path: Path, device, emit, progress, t0) -> dict:
    if spec.method == "gptq":
        raise QtoolError(path, "gptq needs calibration data (text, JSONL or token ids), not a statistics file")
    imp, sources = load_stats(path), expert_sources(path)
    progress.start(f"quantizing ({spec.method}, statistics file)", len(todo))
    calibrated, uncalibrated = [], []
    order = [n for n in layer_order(ckpt) if n in todo]
    for name in order:
        module = module_of(name)
        importance = imp.get(module) if spec.method == "mse" else None
        if importance is not None and importance.shape[0] != ckpt.tensors[name].shape[1]:
            raise QtoolError(path, f"statistics for {module!r} cover {importance.shape[0]} inputs, the weight has "
                                   f"{ckpt.tensors[name].shape[1]}: the file belongs to another model")
        note = "" if importance is not None or spec.method != "mse" else "no statistics for this module in the file"
        *parts, extra = _plain(ckpt, todo[name], spec, device, importance, note)
        if module in sources:
            extra["expert"] = sources[module]
        emit(name, *parts, extra)
        (calibrated if importance is not None else uncalibrated).append(name)
        progress.advance(1, description=module)
    return {"samples": None, "tokens": None, "device": str(device), "seconds": time.perf_counter() - t0,
            "layers": 0, "method": spec.method, "damp": None, "calibrated": len(calibrated),
            "uncalibrated": uncalibrated, "stats_file": str(path)}
