"""`qtool merge-lora`: merge PEFT LoRA adapters into a base checkpoint, PEFT-exact, one tensor at a time.

open base and adapters → plan (every adapter tensor lands on a base tensor, or nothing is written) → for each
base tensor in output order: copy it, or merge it in float32 and cast once (dequantize → merge → requantize
for a compressed-tensors base) → write with the base's names, shards and files → report.
"""
from __future__ import annotations

import time

import torch

from ..checkpoint import CheckpointWriter, open_checkpoint
from ..checkpoint.outputs import FOLDER, REPORT, guarded
from ..errors import QtoolError
from ..lora.adapter import Adapter, read_adapter
from ..lora.merge import all_finite, fused_merge_applies, merge_bias, merge_linear_cast, merge_weight, relative_norm
from ..lora.plan import ModuleWeight, TensorOp, plan_merge
from ..arch import FLOAT_DTYPES
from ..formats import compressed_tensors as ct
from ..formats.dense import dense_dtype
from ..progress import NullProgress
from ..quant.weight import quantize_weight
from ..runtime import threads_per_worker, workers_for
from .common import ordered_map, prefetch
from .arguments import checked


@checked
@guarded(inputs=("base", "adapters"), outputs={"out": FOLDER, "report_path": REPORT})
def merge_lora(base: str, adapters: list[str], out: str, weights: list[float] | None = None,
               dtype: str | torch.dtype | None = None, overwrite: bool = False, revision: str | None = None,
               progress=None, report_path: str | None = None) -> dict:
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
    q = _QuantizedBase.open(bck)
    plan = plan_merge(bck.tensors, bck.config, ads, weights, q.module_weights() if q else None)

    specs, by_module = _output_specs(bck, plan.ops, q, out_dtype)
    order = sorted(specs, key=lambda n: (_shard_of(bck, n), n))  # the writer's file order: nothing waits
    rows: dict[str, dict] = {}
    with CheckpointWriter(out, overwrite=overwrite) as w:
        shards, index = _layout(bck, specs)
        w.plan([(n, *specs[n]) for n in order], shards=shards, index=index)
        progress.start("merging", sum(i.nbytes for i in bck.tensors.values()))
        # Units of work in file order: a dense tensor, or a quantized module (all its stored parts come from one
        # requantization). Dense tensors are read ahead on a thread; units run side by side on workers.
        units, seen = [], set()
        for name in order:
            module = by_module.get(name)
            if module is None:
                units.append(("tensor", name))
            elif id(module) not in seen:
                units.append(("module", module))
                seen.add(id(module))
        plain = [key for kind, key in units if kind == "tensor"]
        reads = prefetch(bck.get, plain, {n: bck.tensors[n].nbytes for n in plain})

        def items():
            for kind, key in units:
                yield (kind, key, next(reads)[1] if kind == "tensor" else None)

        def work(kind, key, t):
            if kind == "module":
                parts = _merge_quantized(bck, q, plan.ops[key.name], key, rows)
                return list(parts.items()), sum(bck.tensors[n].nbytes for n in q.parts(key.name.rsplit(".", 1)[0]))
            op = plan.ops.get(key)
            dtype = specs[key][1]
            out = (t if t.dtype == dtype else t.to(dtype)) if op is None else _merge_plain(bck, op, t, dtype, rows, w)
            return ([] if out is None else [(key, out)]), bck.tensors[key].nbytes

        workers = workers_for(torch.device("cpu"))
        with threads_per_worker(workers):
            for outputs, nbytes in ordered_map(work, items(), workers):
                for n, t in outputs:
                    w.write(n, t)
                progress.advance(nbytes)
        extra = _copy_extra_files(w, bck, out_dtype)
    report = _report(out, base, adapters, ads, weights, bck, plan, rows, start)
    report["copied_files"] = extra
    if report_path:
        from ..report.render import write_json
        write_json(report, report_path)
    return report


# -- per tensor -------------------------------------------------------------------------------------------

def _merge_plain(bck, op: TensorOp, base_t: torch.Tensor, dtype: torch.dtype, rows: dict,
                 writer: CheckpointWriter) -> torch.Tensor | None:
    """One floating tensor: start from the base (or the adapter's full copy), add the LoRA terms, cast once.
    Returns the output tensor, or None when the fused kernel has already streamed it into the writer."""
    start = op.replace[0].ckpt.get(op.replace[1]) if op.replace else base_t
    if not start.dtype.is_floating_point:
        raise QtoolError(op.name, f"cannot merge into a {start.dtype} tensor")
    rel = None
    terms = [t.load() for t in op.terms] if op.role == "weight" else op.terms  # A, B read for this tensor only
    if op.role == "weight" and terms and not op.replace and fused_merge_applies(start, terms, dtype):
        with writer.sink(op.name) as sink:
            _, rel, finite = merge_linear_cast(start, terms, dtype, sink=sink)
            if not finite:
                raise QtoolError(op.name, "merged tensor holds NaN or Inf")
        rows[op.name] = {"delta_rel_norm": rel, "how": _how(op)}
        return None
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
    rows[op.name] = {"delta_rel_norm": rel, "how": _how(op)}
    return out


def _merge_quantized(bck, q: "_QuantizedBase", op: TensorOp, mw: ModuleWeight, rows: dict) -> dict:
    """Dequantize → merge in float32 → requantize with the base's scheme; returns the stored parts."""
    from ..quant.core import error_stats
    module = mw.name.rsplit(".", 1)[0]
    merged, rel = merge_weight(q.dequantize(module), [t.load() for t in op.terms], inplace=True)
    if not all_finite(merged):
        raise QtoolError(f"{module}.weight", "merged tensor holds NaN or Inf")
    parts, W_hat = q.requantize(module, merged)
    how = f"{_how(op)}, requantized with {q.spec(module).method}"
    rows[f"{module}.weight"] = {"delta_rel_norm": rel, "how": how, "error": error_stats(merged, W_hat)}
    return parts


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


# -- layout -----------------------------------------------------------------------------------------------

def _output_specs(bck, ops: dict, q, out_dtype):
    """Output name -> (shape, dtype): the base's, with floating tensors cast when --dtype asks; and, for a
    quantized base, stored part name -> the module's ModuleWeight (its parts are produced together)."""
    specs, by_module = {}, {}
    quantized_parts = set()
    if q is not None:
        for module_weight_name, op in ops.items():
            if op.quantized:
                module = module_weight_name.rsplit(".", 1)[0]
                for n in q.parts(module):
                    by_module[n] = q.weights[module]
                    quantized_parts.add(n)
    for name, info in bck.tensors.items():
        dt = info.dtype
        if out_dtype is not None and dt in FLOAT_DTYPES and not (q is not None and q.is_param(name)):
            dt = out_dtype
        specs[name] = (tuple(info.shape), dt)
    return specs, by_module


def _shard_of(bck, name: str) -> str:
    return bck.shard_of(name) if name in bck.tensors else ""


def _layout(bck, specs: dict):
    """Mirror the base's shard files (safetensors names) and index; .bin bases are re-cut into safetensors."""
    files = bck.files
    if not all(f.suffix == ".safetensors" for f in files):
        return None, None
    shards = {n: bck.shard_of(n) for n in specs}
    has_index = bck.is_folder and any(p.name.endswith(".safetensors.index.json") for p in bck.root.iterdir())
    return shards, (len(files) > 1 or has_index)


def _copy_extra_files(w, bck, out_dtype) -> list[str]:
    """config, tokenizer and other files beside the weights; config.json's dtype follows --dtype."""
    copied = []
    for p in bck.extra_files():
        rel = str(p.relative_to(bck.root))
        if rel == "config.json" and out_dtype is not None and bck.config is not None:
            cfg = dict(bck.config)
            name = str(out_dtype).removeprefix("torch.")
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = name
            w.write_json(rel, cfg)
        else:
            w.copy_file(p, rel)
        copied.append(rel)
    return copied


# -- quantized bases --------------------------------------------------------------------------------------

class _QuantizedBase:
    """A compressed-tensors base: its packed modules (stored part names, logical shapes) and each one's scheme."""

    def __init__(self, bck, scheme: ct.Scheme):
        self.bck, self.scheme = bck, scheme
        self._parts = {m: [f"{m}.{p}" for p in parts] for m, parts in ct.packed_modules(bck.tensors).items()}
        self.weights: dict[str, ModuleWeight] = {}
        for module in self._parts:
            shape = tuple(int(d) for d in bck.get(f"{module}.{ct.SHAPE}").tolist())
            self.weights[module] = ModuleWeight(f"{module}.{ct.PACKED}", shape, quantized=True)

    @classmethod
    def open(cls, bck) -> "_QuantizedBase | None":
        method = ct.quant_method(bck.config)
        if method is None:
            return None
        if method != ct.QUANT_METHOD:
            raise QtoolError(bck.root / "config.json", f"quantization method {method!r}: "
                                                       "merging into it is not implemented (compressed-tensors only)")
        return cls(bck, ct.detect(bck.config, bck.root / "config.json"))

    def module_weights(self) -> dict[str, ModuleWeight]:
        return self.weights

    def parts(self, module: str) -> list[str]:
        return self._parts.get(module, [])

    def is_param(self, name: str) -> bool:
        split = ct.split_name(name)
        return split is not None and split[0] in self._parts

    def spec(self, module: str):
        """The module's scheme, requantized by the recorded method if it is data-free, else by mse (gptq needs
        calibration data: mse is the best data-free requantization)."""
        spec = self.scheme.spec_for(module)
        if spec is None:
            raise QtoolError(module, "stores packed weights but no config group of quantization_config targets it")
        return spec.with_method(self.scheme.method if self.scheme.method in ("rtn", "mse") else "mse")

    def module(self, module: str) -> ct.PackedModule:
        local = {n.rpartition(".")[2]: self.bck.get(n) for n in self.parts(module)}
        return ct.PackedModule.from_parts(local, self.spec(module), name=module)

    def dequantize(self, module: str) -> torch.Tensor:
        return self.module(module).dequantize(torch.float32)

    def requantize(self, module: str, merged: torch.Tensor):
        """Stored parts with the base's names, shapes and dtypes, and the dequantized result (for the error).

        The merged float32 weight is first rounded to the scales' dtype (the dtype the base was quantized
        from), then quantized as `qtool quantize` would quantize that weight: same bits, symmetry, grouping.
        """
        names = self.parts(module)
        scale_dtype = self.bck.tensors[f"{module}.{ct.SCALE}"].dtype
        qw = quantize_weight(merged.to(scale_dtype), self.spec(module))
        stored = ct.PackedModule.from_weight(qw).named(module)
        if sorted(stored) != sorted(names):
            raise QtoolError(module, f"requantized parts {sorted(stored)} differ from the base's {sorted(names)}")
        for n in names:
            t, info = stored[n], self.bck.tensors[n]
            if tuple(t.shape) != tuple(info.shape) or t.dtype != info.dtype:
                raise QtoolError(n, f"requantized part is {list(t.shape)} {t.dtype}, base has "
                                    f"{list(info.shape)} {info.dtype}")
        return stored, qw.dequantize(torch.float32)


# -- report -----------------------------------------------------------------------------------------------

def _report(out, base, adapters, ads: list[Adapter], weights, bck, plan, rows: dict, start: float) -> dict:
    from ..report.errors import json_safe, summarize
    from ..report.size import size_report
    report = size_report(open_checkpoint(out), source=str(base))
    for row in report["layers"]:
        r = rows.get(row["name"])
        if r is None:
            continue
        row["reason"] = r["how"] + (f"; {row['reason']}" if row.get("reason") else "")
        row["merged"] = True
        row["delta_rel_norm"] = json_safe(r["delta_rel_norm"])
        if "error" in r:
            row["error"] = r["error"]
    base_params = size_report(bck)["parameters"]
    adapter_params = [sum(i.numel for i in a.ckpt.tensors.values()) for a in ads]
    ranks = sorted({rk for entries in plan.modules.values() for _, rk, _ in entries})
    per_adapter = [{
        "source": str(src), "weight": wt, "rank": a.settings.r, "alpha": a.settings.lora_alpha,
        "use_rslora": a.settings.use_rslora, "use_dora": a.settings.use_dora, "lora_bias": a.settings.lora_bias,
        "bias": a.settings.bias, "rank_pattern": a.settings.rank_pattern, "alpha_pattern": a.settings.alpha_pattern,
        "modules": len(a.modules), "replaced_tensors": sorted(a.full), "parameters": p,
    } for src, a, wt, p in zip(adapters, ads, weights, adapter_params)]
    one = len(ads) == 1
    report["lora"] = {
        "rank": (ads[0].settings.r if one else [a.settings.r for a in ads]),
        "ranks_used": ranks,
        "alpha": (ads[0].settings.lora_alpha if one else [a.settings.lora_alpha for a in ads]),
        "targets": sorted({m.rsplit(".", 1)[-1] for m in plan.modules}),
        "parameters": sum(adapter_params),
        "base_parameters": base_params,
        "fraction_of_base": sum(adapter_params) / base_params if base_params else None,
        "weights": weights,
        "merged_tensors": sorted(n for n, op in plan.ops.items() if op.terms),
        "adapters": per_adapter,
    }
    report["summary"] = summarize(report["layers"])
    elapsed = time.perf_counter() - start
    total = sum(i.nbytes for i in bck.tensors.values())
    report["timing"] = {"seconds": elapsed, "input_gb_per_s": total / 1e9 / elapsed if elapsed else None}
    return report

