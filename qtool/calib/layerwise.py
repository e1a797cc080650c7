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

from ..errors import QtoolError
from ..arch import is_conv1d_module, module_of
from ..progress import NullProgress
from ..quant.spec import QuantSpec
from ..quant.gptq import output_error
from ..quant.weight import quantize_weight
from ..runtime import exact_matmul, resolve_device
from .collect import Hooks
from .data import is_stats_file, load_calibration
from .model import layer_prefix, model_type
from .stats import load_stats


def layer_order(ckpt) -> list[str]:
    """Tensor names in the order the walk visits them (block 0, block 1, ...), every other tensor after."""
    try:
        _, layers = layer_prefix(ckpt)
    except QtoolError:
        return list(ckpt.tensors)
    walked = [n for names in layers.values() for n in sorted(names)]
    seen = set(walked)
    return walked + [n for n in ckpt.tensors if n not in seen]


def _samples(ckpt, calib, samples: int, seq_len: int) -> list[torch.Tensor]:
    if isinstance(calib, (list, tuple)):
        return [torch.as_tensor(c, dtype=torch.long).reshape(-1)[:seq_len] for c in calib[:samples]]
    return load_calibration(calib, ckpt.root if ckpt.is_folder else None, samples=samples, seq_len=seq_len)


def collect_stats(ckpt, calib, *, samples: int = 128, seq_len: int = 512, device="auto", progress=None) -> tuple[dict, dict]:
    """Per linear module {"sum_sq", "absmax", "count"} (CPU) of the original model on the calibration data."""
    from .walk import LayerWalk
    progress = progress or NullProgress()
    device = resolve_device(device)
    t0 = time.perf_counter()
    ids = _samples(ckpt, calib, samples, seq_len)
    out: dict[str, dict] = {}
    with exact_matmul(device):
        walk = LayerWalk(ckpt, ids, device)
        progress.start("calibrating", len(walk.layers))
        for i, prefix, layer in walk.blocks():
            linears = walk.linears(prefix, layer)
            with Hooks(linears, device) as stats:
                walk.run(layer, keep=True)
            for name, st in stats.items():
                out[name] = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.as_dict().items()}
            progress.advance(1, description=prefix.rstrip("."))
    info = {"layers": len(walk.layers), "modules": len(out), "samples": len(ids), "tokens": walk.tokens,
            "seq_len": seq_len, "device": str(device), "seconds": time.perf_counter() - t0}
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


def quantize_layerwise(ckpt, plans, spec: QuantSpec, calib, *, samples: int = 128, seq_len: int = 512,
                       damp: float = 0.01, device="auto", emit, progress=None) -> dict:
    """Quantize every planned weight with calibration; call emit(name, w, q, scale, zp, extra) for each.

    calib: calibration data (text / JSONL / safetensors token ids, or a list of id tensors) or a statistics file
    from `qtool calibrate` (then no model runs: mse uses its importance, rtn ignores it, gptq is refused).
    Returns {"samples", "tokens", "device", "seconds", "layers", "method", "damp", "calibrated", "uncalibrated"}.
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
    model_type(ckpt)  # a clear error for an architecture the walk cannot handle, before any data is read
    from .walk import LayerWalk
    ids = _samples(ckpt, calib, samples, seq_len)
    calibrated, uncalibrated = [], []
    with exact_matmul(device):
        walk = LayerWalk(ckpt, ids, device)
        progress.start(f"quantizing ({spec.method})", len(walk.layers))
        for i, prefix, layer in walk.blocks():
            linears = walk.linears(prefix, layer)
            # every planned tensor of this block, in layer_order's (sorted) order; nn.Linear ones get calibrated
            block_todo = sorted(n for n in todo if n.startswith(prefix))
            targets = {module_of(n): linears[module_of(n)] for n in block_todo
                       if module_of(n) in linears and n.endswith(".weight") and not is_conv1d_module(linears[module_of(n)])}
            with Hooks(targets, device, hessian_for=set(targets)) as stats:
                walk.run(layer, keep=not targets)
            for name in block_todo:
                module = module_of(name)
                if module not in targets:
                    note = ("GPT-2 Conv1D weight: quantized in its stored [in, out] layout without calibration"
                            if module in linears else "not an nn.Linear weight: quantized without calibration")
                    emit(name, *_plain(ckpt, todo.pop(name), spec, device, note=note))
                    uncalibrated.append(name)
                    continue
                mod = targets[module]
                st = stats.pop(module)
                w_orig = ckpt.get(name)
                w = w_orig.to(device)
                h = st.hessian
                qw = quantize_weight(w, spec, hessian=h, importance=st.importance(), damp=damp, name=name)
                w_hat = qw.dequantize(torch.float32)
                if spec.method == "rtn":
                    before = after = output_error(w, w_hat, h)
                else:
                    rtn = quantize_weight(w, spec.with_method("rtn"))
                    before = output_error(w, rtn.dequantize(torch.float32), h)
                    after = output_error(w, w_hat, h)
                mod.weight.data = w_hat.to(mod.weight.dtype)
                del h, st
                extra = {**qw.info, "calibrated": True, "output_error_before": before, "output_error_after": after}
                qw = qw.cpu()
                emit(name, w_orig, qw.codes(), qw.scale, qw.zero_point, extra)
                calibrated.append(name)
                todo.pop(name)
            if targets:
                walk.run(layer, keep=True)
            progress.advance(1, description=prefix.rstrip("."))
    for name in [n for n in layer_order(ckpt) if n in todo]:
        emit(name, *_plain(ckpt, todo.pop(name), spec, device, note="outside the walked blocks: no calibration statistics"))
        uncalibrated.append(name)
    return {"samples": len(ids), "tokens": walk.tokens, "device": str(device), "seconds": time.perf_counter() - t0,
            "layers": len(walk.layers), "method": spec.method, "damp": damp, "calibrated": len(calibrated),
            "uncalibrated": uncalibrated}


def _from_stats_file(ckpt, todo: dict, spec: QuantSpec, path: Path, device, emit, progress, t0) -> dict:
    if spec.method == "gptq":
        raise QtoolError(path, "gptq needs calibration data (text, JSONL or token ids), not a statistics file")
    imp = load_stats(path)
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
        emit(name, *_plain(ckpt, todo[name], spec, device, importance, note))
        (calibrated if importance is not None else uncalibrated).append(name)
        progress.advance(1, description=module)
    return {"samples": None, "tokens": None, "device": str(device), "seconds": time.perf_counter() - t0,
            "layers": 0, "method": spec.method, "damp": None, "calibrated": len(calibrated),
            "uncalibrated": uncalibrated, "stats_file": str(path)}
