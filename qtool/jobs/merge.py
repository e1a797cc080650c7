"""`qtool merge-lora`: merge PEFT LoRA adapters into a base checkpoint, PEFT-exact, one tensor at a time.

open base and adapters → plan (every adapter tensor lands on a base tensor, or nothing is written) → units of work
in the output's file order (a base tensor, or a quantized module whose stored parts come from one requantization)
→ workers copy or merge each (in float32, cast once; dequantize → merge → requantize for a compressed-tensors base)
and return what they made → one loop writes it with the base's names, shards and files → report.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch

from .. import runtime
from ..arch import FLOAT_DTYPES
from ..checkpoint import CheckpointWriter, TensorInfo, open_checkpoint
from ..checkpoint.outputs import FOLDER, REPORT, guarded
from ..checkpoint.writer import TensorSink
from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..formats.dense import DenseView, dense_dtype, with_dtype
from ..lora.adapter import read_adapter
from ..lora.merge import all_finite, fused_merge_applies, merge_bias, merge_linear_cast, merge_weight, relative_norm
from ..lora.plan import ModuleWeight, TensorOp, plan_merge
from ..progress import NullProgress
from ..quant.core import error_stats
from ..quant.weight import quantize_weight
from ..report.errors import json_safe, summary_part
from ..report.lora import merge_part
from ..report.render import write_json
from ..report.schema import Layer, Report, assemble, timing_part
from ..report.size import Listing, checkpoint_format, listing, parameter_count, size_part
from .common import copy_side_files, ordered_map, prefetch
from .arguments import checked


@checked
@guarded(inputs=("base", "adapters"), outputs={"out": FOLDER, "report_path": REPORT})
def merge_lora(base: str, adapters: list[str], out: str, weights: list[float] | None = None,
               dtype: str | torch.dtype | None = None, overwrite: bool = False, revision: str | None = None,
               progress=None, report_path: str | None = None) -> Report:
    """Merge `adapters` (PEFT folders or hub ids) into `base` and write the result to `out`.

    weights: one per adapter (default 1.0 each): W + Σ wᵢ·sᵢ·Bᵢ@Aᵢ. dtype: output dtype of the floating
    tensors (default: each tensor's own). Returns the report (design §7) with a `lora` block and, per merged
    tensor, `delta_rel_norm` = ‖W'−W‖/‖W‖ and, for a quantized base, the requantization `error`.
    """
    start = time.perf_counter()
    progress = progress or NullProgress()
    out_dtype = dense_dtype(dtype)
    if not adapters:
        raise QtoolError("merge-lora", "no adapter given")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    bck = open_checkpoint(base, revision)
    ads = [read_adapter(open_checkpoint(a), a) for a in adapters]
    view = _quantized_base(bck)
    plan = plan_merge(bck.tensors, bck.config, ads, weights, _module_weights(view) if view else None)
    layout = _Layout.of(bck, plan.ops, view, out_dtype)
    config = with_dtype(bck.config, out_dtype) if out_dtype is not None and bck.config is not None else None
    with runtime.session("cpu") as rt, CheckpointWriter(out, overwrite=overwrite) as writer:
        files = writer.plan(layout.outputs(), shards=layout.shards, index=layout.index)
        progress.start("merging", sum(i.nbytes for i in bck.tensors.values()))
        merged: dict[str, dict] = {}
        for done in ordered_map(functools.partial(_work, bck, view), _units(bck, plan, layout, writer), rt.workers):
            for name, t in done.tensors:
                writer.write(name, t)
            merged.update(done.rows)
            progress.advance(done.nbytes)
        copied = copy_side_files(bck, writer, {"config.json": config} if config is not None else None)
    written = layout.listing(out, config if config is not None else bck.config, len(files), view)
    report = _report(base, out, adapters, ads, weights, bck, plan, written, merged, start, copied)
    if report_path:
        write_json(report, report_path)
    return report


# -- quantized bases --------------------------------------------------------------------------------------

def _quantized_base(bck) -> DenseView | None:
    """The dense view of a compressed-tensors base (None for a dense one; other quantization methods are refused)."""
    method = ct.quant_method(bck.config)
    if method is None:
        return None
    if method != ct.QUANT_METHOD:
        raise QtoolError(bck.root / "config.json", f"quantization method {method!r}: "
                                                   "merging into it is not implemented (compressed-tensors only)")
    return DenseView(bck)


def _module_weights(view: DenseView) -> dict[str, ModuleWeight]:
    """Where each packed module's weight lives, for the plan: its packed tensor and its logical [out, in] shape."""
    return {m: ModuleWeight(f"{m}.{ct.PACKED}", tuple(view.shape(w)), quantized=True) for w, m in view.packed.items()}


def _requantize(view: DenseView, module: str, merged: torch.Tensor):
    """(stored parts with the base's names, shapes and dtypes; the dequantized result, for the error; the method).

    The merged float32 weight is first rounded to the scales' dtype (the dtype the base was quantized from), then
    quantized as `qtool quantize` would quantize that weight, with the module's scheme and the recorded method if it is
    data-free, else mse (gptq needs calibration data: mse is the best data-free requantization)."""
    names = view.stored[module]
    method = view.scheme.method if view.scheme.method in ("rtn", "mse") else "mse"
    spec = view.spec(f"{module}.weight").with_method(method)
    qw = quantize_weight(merged.to(view.ckpt.tensors[f"{module}.{ct.SCALE}"].dtype), spec)
    stored = ct.PackedModule.from_weight(qw).named(module)
    if sorted(stored) != sorted(names):
        raise QtoolError(module, f"requantized parts {sorted(stored)} differ from the base's {sorted(names)}")
    for n in names:
        t, info = stored[n], view.ckpt.tensors[n]
        if tuple(t.shape) != tuple(info.shape) or t.dtype != info.dtype:
            raise QtoolError(n, f"requantized part is {list(t.shape)} {t.dtype}, base has {list(info.shape)} {info.dtype}")
    return stored, qw.dequantize(torch.float32), method


# -- layout -----------------------------------------------------------------------------------------------

@dataclass
class _Layout:
    """The output: every tensor's (shape, dtype) in the writer's file order, the quantized modules whose stored
    parts are produced together, and the base's shard files and index when they can be mirrored."""

    specs: dict[str, tuple]
    order: list[str]
    modules: dict[str, ModuleWeight]  # stored part name → its module's weight (quantized base)
    shards: dict[str, str] | None
    index: bool | None

    @classmethod
    def of(cls, bck, ops: dict[str, TensorOp], view: DenseView | None, out_dtype) -> "_Layout":
        modules = {}
        if view is not None:
            weights = _module_weights(view)
            for name, op in ops.items():
                if op.quantized:
                    module = name.rsplit(".", 1)[0]
                    modules.update({n: weights[module] for n in view.stored[module]})
        quantized = {n for names in (view.stored.values() if view else ()) for n in names}
        specs = {}
        for name, info in bck.tensors.items():
            cast = out_dtype is not None and info.dtype in FLOAT_DTYPES and name not in quantized
            specs[name] = (tuple(info.shape), out_dtype if cast else info.dtype)
        order = sorted(specs, key=lambda n: (bck.shard_of(n), n))  # the writer's file order: nothing waits
        shards, index = _mirror(bck, specs)
        return cls(specs, order, modules, shards, index)

    def outputs(self) -> list[tuple]:
        return [(n, *self.specs[n]) for n in self.order]

    def listing(self, out, config: dict | None, files: int, view: DenseView | None) -> Listing:
        """What was written, for the report (nothing is read back)."""
        tensors = {n: TensorInfo(n, s, d, Path(out), math.prod(s) * d.itemsize) for n, (s, d) in self.specs.items()}
        scheme = view.scheme if view is not None else None
        shapes = {m: tuple(view.shape(w)) for w, m in view.packed.items()} if view is not None else {}
        return Listing(tensors, config, checkpoint_format("safetensors", files, scheme), scheme, shapes)


def _mirror(bck, specs: dict):
    """The base's shard files (safetensors names) and index; .bin bases are re-cut into safetensors."""
    if not all(f.suffix == ".safetensors" for f in bck.files):
        return None, None
    has_index = bck.is_folder and any(p.name.endswith(".safetensors.index.json") for p in bck.root.iterdir())
    return {n: bck.shard_of(n) for n in specs}, (len(bck.files) > 1 or has_index)


# -- units of work ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Unit:
    """One unit of work: a base tensor (`op` None: copied) or a quantized module (`module`), with its output dtype;
    a LoRA'd dense weight also gets the sink the fused kernel streams its row blocks into while they are in cache."""

    name: str
    op: TensorOp | None
    dtype: torch.dtype
    module: ModuleWeight | None = None
    sink: TensorSink | None = None


@dataclass
class _Done:
    """What a worker made: finished tensors to write, the report rows of what it merged, the base bytes it covered."""

    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    rows: dict[str, dict] = field(default_factory=dict)
    nbytes: int = 0


def _units(bck, plan, layout: _Layout, writer: CheckpointWriter) -> Iterator[tuple[_Unit, torch.Tensor | None]]:
    """(unit, its base tensor read ahead on a thread, or None for a quantized module) in file order."""
    units, seen = [], set()
    for name in layout.order:
        module = layout.modules.get(name)
        if module is None:
            units.append(_Unit(name, plan.ops.get(name), layout.specs[name][1]))
        elif module.name not in seen:
            units.append(_Unit(module.name, plan.ops[module.name], torch.float32, module))
            seen.add(module.name)
    plain = [u.name for u in units if u.module is None]
    reads = prefetch(bck.get, plain, {n: bck.tensors[n].nbytes for n in plain})
    for u in units:
        if u.module is not None:
            yield u, None
            continue
        if u.op is not None and u.op.role == "weight" and u.op.terms and not u.op.replace:
            u = replace(u, sink=writer.sink(u.name))
        yield u, next(reads)[1]


def _work(bck, view: DenseView | None, unit: _Unit, t: torch.Tensor | None) -> _Done:
    """One unit, on a worker thread."""
    if unit.module is not None:
        module = unit.name.rsplit(".", 1)[0]
        parts, row = _merge_quantized(view, module, unit.op)
        return _Done(list(parts.items()), {f"{module}.weight": row}, sum(bck.tensors[n].nbytes for n in view.stored[module]))
    nbytes = bck.tensors[unit.name].nbytes
    if unit.op is None:
        return _Done([(unit.name, t if t.dtype == unit.dtype else t.to(unit.dtype))], {}, nbytes)
    out, row = _merge_plain(unit, t)
    return _Done([] if out is None else [(unit.name, out)], {unit.name: row}, nbytes)


def _merge_plain(unit: _Unit, base_t: torch.Tensor) -> tuple[torch.Tensor | None, dict]:
    """One floating tensor: start from the base (or the adapter's full copy), add the LoRA terms, cast once. Returns
    the output tensor, or None when the fused kernel has streamed it into the unit's sink; and its report row."""
    op, dtype = unit.op, unit.dtype
    start = op.replace[0].ckpt.get(op.replace[1]) if op.replace else base_t
    if not start.dtype.is_floating_point:
        raise QtoolError(op.name, f"cannot merge into a {start.dtype} tensor")
    rel = None
    terms = [t.load() for t in op.terms] if op.role == "weight" else op.terms  # A, B read for this tensor only
    if unit.sink is not None and fused_merge_applies(start, terms, dtype):
        with unit.sink as sink:
            _, rel, finite = merge_linear_cast(start, terms, dtype, sink=sink)
            if not finite:
                raise QtoolError(op.name, "merged tensor holds NaN or Inf")
        return None, {"delta_rel_norm": rel, "how": _how(op)}
    if op.role == "weight" and terms:
        merged, rel = merge_weight(start, terms, inplace=True)
    elif op.role == "bias" and op.terms:
        merged = merge_bias(start, op.terms)
    else:
        merged = start.float()
    if rel is None or op.replace:  # measured against the base, not the adapter's copy
        rel = relative_norm(merged - base_t.float(), base_t)
    out = merged.to(dtype, copy=True)  # merged may be a reused scratch buffer: the writer gets its own tensor
    if not all_finite(out):  # checked as stored: a float32 sum may still overflow a 16-bit output
        raise QtoolError(op.name, "merged tensor holds NaN or Inf")
    return out, {"delta_rel_norm": rel, "how": _how(op)}


def _merge_quantized(view: DenseView, module: str, op: TensorOp) -> tuple[dict, dict]:
    """Dequantize → merge in float32 → requantize with the base's scheme; the stored parts and the report row."""
    merged, rel = merge_weight(view.module(f"{module}.weight").dequantize(torch.float32), [t.load() for t in op.terms],
                               inplace=True)
    if not all_finite(merged):
        raise QtoolError(f"{module}.weight", "merged tensor holds NaN or Inf")
    parts, w_hat, method = _requantize(view, module, merged)
    how = f"{_how(op)}, requantized with {method}"
    return parts, {"delta_rel_norm": rel, "how": how, "error": error_stats(merged, w_hat)}


def _how(op: TensorOp) -> str:
    what = []
    if op.replace:
        what.append("replaced by the adapter's copy")
    if op.terms:
        dora = any(t.magnitude is not None for t in op.terms)
        n = len(op.terms)
        kind = "lora_bias" if op.role == "bias" else ("DoRA" if dora else "LoRA")
        what.append(f"{kind} merged" + (f" ({n} adapters)" if n > 1 else ""))
    return ", ".join(what)


# -- report -----------------------------------------------------------------------------------------------

def _report(base, out, sources, ads, weights, bck, plan, written: Listing, merged: dict, start: float,
            copied: list[str]) -> Report:
    size = size_part(written)
    layers = [_layer(row, merged.get(row["name"])) for row in size["layers"]]
    lora = merge_part(sources, ads, weights, plan, parameter_count(listing(bck)))
    return assemble("merge", base, size, layers=layers, lora=lora, summary=summary_part(layers),
                    timing=timing_part(start, sum(i.nbytes for i in bck.tensors.values())), output=str(out),
                    copied_files=copied)


def _layer(row: Layer, merged: dict | None) -> Layer:
    """A written tensor's row; a merged one says how, how much it changed, and (quantized base) its requant error."""
    if merged is None:
        return row
    out = {**row, "reason": merged["how"] + (f"; {row['reason']}" if row.get("reason") else ""), "merged": True,
           "delta_rel_norm": json_safe(merged["delta_rel_norm"])}
    if "error" in merged:
        out["error"] = merged["error"]
    return out
