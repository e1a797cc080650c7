"""`qtool quantize`: open → plan → quantize each linear weight → pack → write, the report as a by-product.

Tensors stream one at a time: a reader thread fetches the next tensor while this one is quantized, and the
writer's thread puts finished bytes on disk. With calibration data the walk goes layer by layer instead
(qtool.calib.layerwise), writing each layer's tensors as soon as they are quantized.
"""
from __future__ import annotations

import math
import time

import torch

from ..checkpoint import CheckpointWriter, open_checkpoint
from ..checkpoint.outputs import FOLDER, REPORT, guarded
from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..plan import ignore_list, keep_nonfinite, plan_quantization
from ..progress import NullProgress
from ..quant.core import dequantize, error_stats, scale_dtype_for
from ..quant.pack import pack_int32
from ..quant.weight import QuantizedWeight, quantize_weight
from ..quant.spec import QuantSpec
from ..report.errors import gate, summarize
from ..report.render import write_json
from ..report.size import describe_scheme, size_report
from ..runtime import resolve_device, threads_per_worker, workers_for
from .common import copy_side_files, ordered_map, prefetch, timing


def _check_finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QtoolError(name, f"has {bad} NaN/Inf values; fix the source or pass --allow-nonfinite to keep it unquantized")


def _output_specs(plan: TensorPlan, spec: QuantSpec) -> list[tuple]:
    if plan.quantize:
        return [(f"{plan.module}.{local}", shape, dtype)
                for local, (shape, dtype) in ct.layout(plan.shape, spec, scale_dtype_for(plan.dtype)).items()]
    return [(plan.name, plan.shape, plan.dtype)]


@guarded(inputs=("source", "calib"), outputs={"out": FOLDER, "report_path": REPORT})
def quantize(source, out, spec: QuantSpec | None = None, *, include=(), exclude=(), calib=None, calib_samples=128,
             seq_len=512, damp=0.01, device="auto", moe_calib="routed", moe_min_tokens=None, report_path=None,
             max_rel_error=None, allow_nonfinite=False, max_shard_bytes=None, overwrite=False, revision=None,
             progress=None) -> dict:
    """Quantize SOURCE into OUT (compressed-tensors pack-quantized); returns the report (design §7)."""
    start = time.perf_counter()
    spec = spec or QuantSpec()
    progress = progress or NullProgress()
    ckpt = open_checkpoint(source, revision)
    if ct.quant_method(ckpt.config):
        raise QtoolError(ckpt.root / "config.json", "is already quantized; run `qtool dequantize` first")
    if ckpt.adapter_config is not None:
        raise QtoolError(source, "is a LoRA adapter; merge it first with `qtool merge-lora`")
    dev = resolve_device(device)
    plans = {p.name: p for p in plan_quantization(ckpt.tensors.values(), spec, ckpt.config, include, exclude)}

    importance, calib_data = {}, None
    extras: dict[str, dict] = {}
    if calib is not None:
        from ..calib.data import is_stats_file
        from ..calib.stats import load_stats
        if is_stats_file(calib):
            if spec.method != "mse":
                raise QtoolError(calib, f"a statistics file feeds --method mse only; --method {spec.method} needs calibration data")
            importance = load_stats(calib, ckpt.tensors, [p.module for p in plans.values() if p.quantize])
            from ..calib.stats import expert_sources
            extras.update({f"{m}.weight": {"expert": e} for m, e in expert_sources(calib).items()})
        elif spec.method == "rtn":
            raise QtoolError(calib, "--method rtn uses no calibration data; use --method mse or gptq")
        else:
            calib_data = calib
    elif spec.method == "gptq":
        raise QtoolError(source, "--method gptq needs calibration data: pass --calib DATA")

    errors: dict[str, dict] = {}

    def check(name, w, err):
        if not all(map(math.isfinite, (err["rel_error"], err["mse"]))):
            _check_finite(name, w)  # NaN/Inf in w poison its norm: only then pay for a full scan, to count them

    def encode(name, w, q, scale, zp) -> tuple[dict, dict]:
        """The stored parts of one quantized weight (from its int8 codes) and its error against the source."""
        p = plans[name]
        err = error_stats(w, dequantize(q, scale, zp, spec, dtype=w.dtype))
        check(name, w, err)
        qw = QuantizedWeight(pack_int32(q.cpu(), spec.bits), scale.cpu(), None if zp is None else zp.cpu(), spec,
                             p.shape, err, {})
        return ct.PackedModule.from_weight(qw).named(p.module), err

    def emit(writer, name, w, q, scale, zp, extra=None):
        parts, errors[name] = encode(name, w, q, scale, zp)
        if extra:
            extras[name] = extra
        for k, v in parts.items():
            writer.write(k, v)

    def transform(name, t):
        """One source tensor → its output tensors (runs on a worker thread)."""
        p = plans[name]
        if not p.quantize:
            return name, {name: t}, None
        w = t.to(dev)
        qw = quantize_weight(w, spec, importance=importance.get(p.module)).cpu()
        check(name, w, qw.error)
        parts = ct.PackedModule.from_weight(qw).named(p.module)
        return name, parts, qw.error

    if allow_nonfinite:
        plans = {p.name: p for p in keep_nonfinite(list(plans.values()), ckpt.get)}

    if calib_data is not None:
        # Dense tensors first, straight from the source; then quantized weights in the order the walk emits them.
        from ..calib.layerwise import layer_order
        order = [n for n in ckpt.tensors if not plans[n].quantize] + [n for n in layer_order(ckpt) if plans[n].quantize]
    else:
        order = list(ckpt.tensors)
    with CheckpointWriter(out, overwrite=overwrite) as writer:
        writer.plan([s for name in order for s in _output_specs(plans[name], spec)], max_shard_bytes=max_shard_bytes)
        if calib_data is not None:
            from ..calib.layerwise import quantize_layerwise
            from ..calib.moe import MoeCalib

            dense = [n for n in order if not plans[n].quantize]
            for name, t in prefetch(ckpt.get, dense, {n: ckpt.tensors[n].nbytes for n in dense}):
                writer.write(name, t)
            quantize_layerwise(ckpt, list(plans.values()), spec, calib_data, samples=calib_samples, seq_len=seq_len,
                               damp=damp, device=dev, progress=progress, moe=MoeCalib.of(moe_calib, moe_min_tokens),
                               emit=lambda name, w, q, scale, zp, extra=None: emit(writer, name, w, q, scale, zp, extra))
        else:
            progress.start("quantizing", total=sum(ckpt.tensors[n].nbytes for n in order))
            workers = workers_for(dev)
            reads = prefetch(ckpt.get, order, {n: i.nbytes for n, i in ckpt.tensors.items()})
            with threads_per_worker(workers):
                for name, parts, err in ordered_map(transform, reads, workers):
                    if err is not None:
                        errors[name] = err
                    for k, v in parts.items():
                        writer.write(k, v)
                    progress.advance(ckpt.tensors[name].nbytes, description=name)
        ignore = ignore_list(plans.values())
        config = dict(ckpt.config or {})
        config["quantization_config"] = ct.Scheme.of(spec, ignore).to_config()
        writer.write_json("config.json", config)
        copied = copy_side_files(ckpt, writer)

    report = size_report(open_checkpoint(out), source=str(source))
    report["estimates"] = size_report(ckpt)["estimates"]  # what the source would weigh: about the model, not this file
    for row in report["layers"]:
        p = plans.get(row["name"])
        if p is not None:
            # A calibrated run says per weight which method ran (one outside the walked layers gets mse, no data).
            method = extras.get(row["name"], {}).get("method") or spec.method
            row["reason"] = f"{describe_scheme(spec)}, {method}" if p.quantize else p.reason
        row["error"] = errors.get(row["name"])
        if row["name"] in extras:
            row.update(extras[row["name"]])
    report["quantization"]["method"] = spec.method
    report["summary"] = summarize(report["layers"])
    report["gate"] = gate(report["layers"], max_rel_error)
    report["timing"] = timing(start, sum(i.nbytes for i in ckpt.tensors.values()))
    report["output"] = str(out)
    report["copied_files"] = copied
    if report_path is not None:
        write_json(report, report_path)
    return report
