"""`qtool quantize`: open → plan → one stream of quantized parts → one write loop → report.

The parts come from one generator either way: without calibration data, tensors stream from the source (a reader
thread fetches the next ones while workers quantize) in the source's order; with it, the dense tensors come first,
then the layer walk (qtool.calib.layerwise) yields each weight as its block is done. The write loop hands every part
to the writer, whose thread puts the bytes on disk, and keeps what the report says of it. The report is built from
the plan, the parts' results and what was written, without reading the output back.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from .. import distributed, runtime
from ..checkpoint import CheckpointWriter, TensorInfo, open_checkpoint
from ..checkpoint.writer import json_bytes, planned_bytes
from ..checkpoint.outputs import FOLDER, REPORT, guarded
from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..plan import TensorPlan, ignore_list, keep_nonfinite, plan_quantization
from ..progress import NullProgress
from ..quant.core import scale_dtype_for
from ..quant.spec import QuantSpec
from ..quant.weight import QuantizedWeight, quantize_weight
from ..report.errors import gate_part, summary_part
from ..report.render import write_json
from ..report.schema import Report, assemble, timing_part
from ..report.size import Listing, describe_scheme, listing, size_part
from .allocation import Mixed, choose, layer_facts
from .arguments import checked
from .common import Discard, copy_side_files, folder_bytes, ordered_map, prefetch
from .evaluate import attach as attach_eval


@dataclass
class Part:
    """What the write loop gets for one source tensor: the tensors to store by output name (a packed module's parts,
    or the tensor itself), its error against the source and, from the layer walk, what the report adds."""

    name: str
    tensors: dict[str, torch.Tensor]
    error: dict | None = None
    extra: dict = field(default_factory=dict)
    nbytes: int = 0  # source bytes, for the progress bar


@dataclass
class Calibration:
    """What --calib brought: per-module importance from a statistics file (feeds mse) with what the file says of
    each MoE expert module (its report row's `expert`), or data for the layer walk."""

    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: dict[str, dict] = field(default_factory=dict)
    data: object = None
    path: object = None
    walked: dict = field(default_factory=dict)  # the layer walk's summary, once it has run


@dataclass(frozen=True)
class Options:
    calib_samples: int = 128
    seq_len: int = 512
    damp: float = 0.01
    moe: object = None  # calib.moe.MoeCalib: how MoE experts get their statistics
    awq_grid: int = 20  # α values of the activation-aware scale search (--method awq, awq+gptq)


@checked
@guarded(inputs=("source", "calib"), outputs={"out": FOLDER, "report_path": REPORT})
def quantize(source, out, spec: QuantSpec | None = None, *, include=(), exclude=(), schemes=(), target_bits=None,
             max_size=None, candidates=None, sensitivity=None, calib=None, calib_samples=128, seq_len=512, damp=0.01,
             device="auto", moe_calib="routed", moe_min_tokens=None, awq_grid=20, report_path=None, max_rel_error=None,
             allow_nonfinite=False, max_shard_bytes=None, overwrite=False, revision=None, progress=None,
             eval_options=None) -> Report:
    """Quantize SOURCE into OUT (compressed-tensors pack-quantized); returns the report (design §7).

    schemes: `GLOB=SPEC` rules (first match wins); target_bits / max_size: a budget the schemes of the modules no
    rule decides are allocated to, from `candidates` (SPECs, a list or one comma-separated string), minimising
    `sensitivity` ("group", the default: each fused group's predicted error over its output energy; "relative":
    each module's; "proxy": the predicted errors as they are; qtool.alloc.measure).
    eval_options (jobs.evaluate.EvalOptions): evaluate OUT against SOURCE afterwards, under report["eval"]."""
    start = time.perf_counter()
    spec = spec or QuantSpec()
    progress = progress or NullProgress()
    mixed = Mixed.of(spec, schemes, target_bits, max_size, candidates, sensitivity)
    ckpt = _open(source, revision)
    dev = runtime.resolve_device(device)
    plans = {p.name: p for p in plan_quantization(ckpt.tensors.values(), mixed.global_spec(spec), ckpt.config,
                                                  include, exclude, source, rules=mixed.rules)}
    calibration = _calibration(calib, spec, source, ckpt, plans)
    if allow_nonfinite:
        plans = {p.name: p for p in keep_nonfinite(list(plans.values()), ckpt.get)}
    options = Options(calib_samples, seq_len, damp, _moe(moe_calib, moe_min_tokens)
                      if calibration.data is not None else None, awq_grid)
    if mixed.target is not None:
        calibration = _sensitivities(ckpt, calibration, options, dev, progress)
    order = _order(ckpt, plans, calibration)
    plans, allocation = _allocate(ckpt, plans, order, mixed, spec, calibration, dev, max_shard_bytes, progress)
    scheme = _scheme(plans, spec, mixed, ckpt)
    config = {**(ckpt.config or {}), "quantization_config": scheme.to_config()}
    with runtime.session(dev, parallel=calibration.data is None) as rt:
        # under torchrun every process computes its share; rank 0 alone writes OUT and the report
        with (CheckpointWriter(out, overwrite=overwrite) if rt.group.root else Discard()) as writer:
            outputs = _outputs(plans, order)
            writer.plan(outputs, max_shard_bytes=max_shard_bytes)
            parts = _parts(ckpt, plans, order, calibration, rt, options, progress)
            results = _write(writer, parts, ckpt, progress)
            writer.write_json("config.json", config)
            copied = copy_side_files(ckpt, writer, {"config.json": None})
        report = None
        if rt.group.root:
            written = Listing({n: TensorInfo(n, tuple(s), d, Path(out), math.prod(s) * d.itemsize)
                               for n, s, d in outputs}, config, scheme.describe("safetensors"),
                              replace(scheme, method=spec.method), {p.module: p.shape for p in plans.values() if p.quantize})
            report = _report(source, out, ckpt, plans, written, results, max_rel_error, start, copied, mixed,
                             allocation, calibration.walked, rt.group)
        if eval_options is not None:  # every process evaluates its share of the windows, once OUT is in place
            rt.group.barrier()
            attach_eval(report, out, source, eval_options, revision=revision, progress=progress)
        if rt.group.root and report_path is not None:
            write_json(report, report_path)
        return rt.group.broadcast_object(report, src=0)  # every process returns the report (and its gate)


# -- open and plan ------------------------------------------------------------------------------------------

def _open(source, revision):
    ckpt = open_checkpoint(source, revision)
    if ct.quant_method(ckpt.config):
        raise QtoolError(ckpt.root / "config.json", "is already quantized; run `qtool dequantize` first")
    if ckpt.adapter_config is not None:
        raise QtoolError(source, "is a LoRA adapter; merge it first with `qtool merge-lora`")
    return ckpt


def _calibration(calib, spec: QuantSpec, source, ckpt, plans: dict[str, TensorPlan]) -> Calibration:
    if calib is None:
        if spec.method == "gptq" or spec.awq:
            raise QtoolError(source, f"--method {spec.method} needs calibration data: pass --calib DATA")
        return Calibration()
    from ..calib.data import is_stats_file
    if is_stats_file(calib):
        if spec.method != "mse":
            raise QtoolError(calib, f"a statistics file feeds --method mse only; --method {spec.method} needs calibration data")
        from ..calib.stats import expert_sources, load_stats  # load_stats refuses a file made from another model
        quantized = [p.module for p in plans.values() if p.quantize]
        return Calibration(importance=load_stats(calib, ckpt.tensors, quantized), experts=expert_sources(calib),
                           path=calib)
    if spec.method == "rtn":
        raise QtoolError(calib, "--method rtn uses no calibration data; use --method mse or gptq")
    return Calibration(data=calib)


def _moe(mode: str, min_tokens: int | None):
    from ..calib.moe import MoeCalib  # qtool.calib is imported only when the walk runs
    return MoeCalib.of(mode, min_tokens)


def _order(ckpt, plans: dict[str, TensorPlan], calibration: Calibration) -> list[str]:
    """The order parts reach the writer: the source's; with calibration data, dense tensors first (straight from the
    source), then the quantized weights in the order the layer walk gives them."""
    if calibration.data is None:
        return list(ckpt.tensors)
    from ..calib.layerwise import layer_order
    return [n for n in ckpt.tensors if not plans[n].quantize] + [n for n in layer_order(ckpt) if plans[n].quantize]


def _scheme(plans: dict[str, TensorPlan], spec: QuantSpec, mixed: Mixed, ckpt) -> ct.Scheme:
    """The quantization_config to write: one group of the run's spec targeting Linear, or, for a mixed run, one
    group per distinct spec naming its modules; `ignore`: plan.ignore_list."""
    specs = {p.module: p.spec for p in plans.values() if p.quantize}
    return ct.Scheme.of(specs if mixed.active and specs else spec,
                        ignore_list(plans.values(), ckpt.tensors, ckpt.config))


def _allocate(ckpt, plans: dict[str, TensorPlan], order: list[str], mixed: Mixed, spec: QuantSpec,
              calibration: Calibration, dev, max_shard_bytes, progress):
    """(plans with the allocated specs, the allocation), or the plans as they are when there is no budget."""
    if mixed.target is None:
        return plans, None
    size_of = functools.partial(_output_bytes, ckpt, order=order, mixed=mixed, spec=spec,
                                max_shard_bytes=max_shard_bytes)
    with runtime.session(dev) as rt:
        return choose(ckpt, plans, mixed, calibration.importance, rt, progress, size_of)


def _sensitivities(ckpt, calibration: Calibration, options: Options, dev, progress) -> Calibration:
    """An allocation weighs errors by input statistics: from a statistics file as given; from calibration data by
    one pass of the original model (qtool.calib.layerwise.collect_stats), and then every calibrated method walks
    the layers with the data again, mse included: the allocation needs every module's statistics before the first
    block is quantized, and each block is best quantized with the inputs the already-quantized blocks give it (as a
    uniform calibrated run does; streaming mse with the original model's statistics lost 0.45 % KLD at g128)."""
    if calibration.data is None:
        return calibration
    from ..calib.layerwise import collect_stats
    from ..calib.stats import importance
    stats, _ = collect_stats(ckpt, calibration.data, samples=options.calib_samples, seq_len=options.seq_len,
                             device=dev, progress=progress, moe=options.moe)
    weights = {m: importance(entry) for m, entry in stats.items()}
    return Calibration(importance=weights, data=calibration.data, path=calibration.path)


def _output_bytes(ckpt, plans: dict[str, TensorPlan], *, order: list[str], mixed: Mixed, spec: QuantSpec,
                  max_shard_bytes) -> int:
    """Every byte OUT would hold with these plans, exactly (weights, index, config.json, copied side files), from
    the layout alone: what --max-size is checked against."""
    config = {**(ckpt.config or {}), "quantization_config": _scheme(plans, spec, mixed, ckpt).to_config()}
    side = sum(p.stat().st_size for p in ckpt.extra_files() if p.relative_to(ckpt.root).as_posix() != "config.json")
    return planned_bytes(_outputs(plans, order), max_shard_bytes) + len(json_bytes(config)) + side


def _outputs(plans: dict[str, TensorPlan], order: list[str]) -> list[tuple]:
    """(name, shape, dtype) of every output tensor, in the order they are written."""
    out = []
    for name in order:
        p = plans[name]
        if p.quantize:
            parts = ct.layout(p.shape, p.spec, scale_dtype_for(p.dtype))
            out += [(f"{p.module}.{local}", shape, dtype) for local, (shape, dtype) in parts.items()]
        else:
            out.append((p.name, p.shape, p.dtype))
    return out


# -- the stream of parts ------------------------------------------------------------------------------------

def _parts(ckpt, plans: dict[str, TensorPlan], order: list[str], calibration: Calibration, rt, options: Options,
           progress) -> Iterator[Part]:
    """Every source tensor's part, in `order`."""
    sizes = {n: i.nbytes for n, i in ckpt.tensors.items()}
    if calibration.data is None:
        progress.start("quantizing", total=sum(sizes[n] for n in order))
        transform = functools.partial(_streamed_part, plans, calibration, rt.device)
        if rt.group.parallel:
            yield from _shared_parts(ckpt, plans, order, sizes, transform, rt)
            return
        yield from ordered_map(transform, prefetch(ckpt.get, order, sizes), rt.workers)
        return
    from ..calib.layerwise import block_tensors, quantize_layerwise
    # activation-aware scaling folds into the blocks' norms and linears: the walk yields every tensor of its blocks
    walked = block_tensors(ckpt) if any(p.spec.awq for p in plans.values() if p.quantize) else set()
    # rank 0 alone writes the dense tensors
    dense = [n for n in order if not plans[n].quantize and n not in walked] if rt.group.root else []
    for name, t in prefetch(ckpt.get, dense, sizes):
        yield Part(name, {name: t})
    walk = quantize_layerwise(ckpt, list(plans.values()), calibration.data, samples=options.calib_samples,
                              seq_len=options.seq_len, damp=options.damp, device=rt.device, progress=progress,
                              moe=options.moe, awq_grid=options.awq_grid,
                              group=rt.group)
    for item in _keeping_summary(walk, calibration.walked):
        if item.weight is None:
            yield Part(item.name, {item.name: item.tensor}, extra=item.extra)
        else:
            yield _packed_part(plans[item.name], item.weight, item.extra)


def _keeping_summary(walk, into: dict):
    """The walk's items, then its summary (the generator's value) into `into`."""
    into.update((yield from walk))


def _shared_parts(ckpt, plans: dict[str, TensorPlan], order: list[str], sizes: dict, transform, rt) -> Iterator[Part]:
    """Data-free quantization over a torchrun run's processes: each quantized tensor has an owner (balanced by
    size, distributed.owners), which quantizes its own in order and sends each to rank 0; rank 0 reads the dense
    tensors itself and yields every part in `order` (the same bytes as one process). The others yield nothing."""
    g = rt.group
    quantized = [n for n in order if plans[n].quantize]
    owner = dict(zip(quantized, distributed.owners([sizes[n] for n in quantized], g.world)))
    mine = ordered_map(transform, prefetch(ckpt.get, [n for n in quantized if owner[n] == g.rank], sizes), rt.workers)
    for name in order:
        if not plans[name].quantize:
            if g.root:
                yield Part(name, {name: ckpt.get(name)}, nbytes=sizes[name])
            continue
        part = g.to_root(next(mine) if owner[name] == g.rank else None, src=owner[name])
        if g.root:
            yield part


def _streamed_part(plans: dict[str, TensorPlan], calibration: Calibration, device, name: str,
                   t: torch.Tensor) -> Part:
    """One source tensor → its part (runs on a worker thread): quantized by its plan's spec (weighted by a
    statistics file's importance when there is one), or as it is."""
    p = plans[name]
    if not p.quantize:
        return Part(name, {name: t}, nbytes=t.numel() * t.element_size())
    qw = quantize_weight(t.to(device), p.spec, importance=calibration.importance.get(p.module)).cpu()
    extra = {"expert": calibration.experts[p.module]} if p.module in calibration.experts else {}
    return _packed_part(p, qw, extra, t.numel() * t.element_size())


def _packed_part(p: TensorPlan, qw: QuantizedWeight, extra: dict, nbytes: int = 0) -> Part:
    return Part(p.name, ct.PackedModule.from_weight(qw).named(p.module), qw.error, extra, nbytes)


# -- writing ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Result:
    error: dict | None
    extra: dict


def _write(writer: CheckpointWriter, parts: Iterator[Part], ckpt, progress) -> dict[str, Result]:
    """The one write loop: every part's tensors to the writer; what the report needs is kept, the tensors are not."""
    results = {}
    for part in parts:
        if part.error is not None:
            _check_finite(part.name, part.error, ckpt)
        for name, t in part.tensors.items():
            writer.write(name, t)
        results[part.name] = Result(part.error, part.extra)
        progress.advance(part.nbytes, description=part.name)
    return results


def _check_finite(name: str, err: dict, ckpt) -> None:
    # NaN/Inf in a weight poison its norm: only then pay for a full scan, to count them
    if all(map(math.isfinite, (err["rel_error"], err["mse"]))):
        return
    w = ckpt.get(name)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise QtoolError(name, f"has {bad} NaN/Inf values; fix the source or pass --allow-nonfinite to keep it unquantized")


# -- report -------------------------------------------------------------------------------------------------

def _report(source, out, ckpt, plans: dict[str, TensorPlan], written: Listing, results: dict[str, Result],
            max_rel_error, start: float, copied: list[str], mixed: Mixed, allocation,
            walked: dict, group=distributed.SINGLE) -> Report:
    size = size_part(written, estimates_of=listing(ckpt))  # the estimates are about the source model
    layers = [_layer(row, plans.get(row["name"]), results.get(row["name"]))
              | layer_facts(plans.get(row["name"]), allocation, mixed) for row in size["layers"]]
    extra = {"awq": walked["awq"]} if "awq" in walked else {}
    if allocation is not None:
        extra["allocation"] = {**allocation.block, "achieved_bytes": folder_bytes(out)}
    return assemble("quantize", source, size, layers=layers, summary=summary_part(layers),
                    gate=gate_part(layers, max_rel_error),
                    timing=timing_part(start, sum(i.nbytes for i in ckpt.tensors.values()), group.world),
                    output=str(out), copied_files=copied, **extra)


def _layer(row: dict, p: TensorPlan | None, result: Result | None) -> dict:
    """A written tensor's row: why it is (not) quantized, by which method (a calibrated run says per weight), its
    error against the source, and what the layer walk adds."""
    extra = result.extra if result is not None else {}
    reason = row["reason"]
    if p is not None:
        reason = f"{describe_scheme(p.spec)}, {extra.get('method') or p.spec.method}" if p.quantize else p.reason
    return {**row, "reason": reason, "error": result.error if result is not None else None, **extra}
