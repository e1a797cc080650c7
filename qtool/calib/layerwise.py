"""Calibration entry points: statistics of the original model, and layer-wise calibrated quantization.

quantize_layerwise walks the model block by block (see `.walk`): for each block it loads the weights, runs every
sample with hooks accumulating per-channel statistics and XᵀX on the device, quantizes the block's planned
linears (gptq with their Hessian, mse with their mean squared input, rtn min-max), loads the dequantized weights
back and runs the samples again, so the next block sees the inputs the quantized model will give it. It is a
generator: the quantize job writes each weight it yields while the walk goes on (no callback into the writer).
Peak memory: one block, its Hessians, and the activations of all samples.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Generator, Iterator

import torch

from .. import distributed
from ..arch import module_of
from ..errors import QtoolError
from ..progress import NullProgress
from ..quant import awq
from ..quant.gptq import error_ratio, output_errors, residual
from ..quant.weight import QuantizedWeight, quantize_weight
from ..report.schema import ExpertRow, ExpertSource
from ..runtime import exact_matmul, resolve_device
from . import parallel
from .data import load_calibration
from .model import build_architecture
from .moe import MoeCalib


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


def _experts_summary(experts: dict[str, ExpertSource]) -> list[ExpertRow]:
    """One row per expert weight: its module, expert index, routed tokens and where its statistics came from."""
    return [ExpertRow(module=module_of(n), **info) for n, info in sorted(experts.items())]


def collect_stats(ckpt, calib, *, samples: int = 128, seq_len: int = 512, device="auto", progress=None,
                  moe: MoeCalib | None = None, group=distributed.SINGLE) -> tuple[dict, dict]:
    """Per linear module {"sum_sq", "absmax", "count"} (CPU) of the original model on the calibration data; info
    has "experts": one row per MoE expert weight ({"module", "expert", "tokens", "stats"}). Under torchrun
    (`group`) each process walks its share of the windows and rank 0 alone gets the sums (the others' dict is
    empty)."""
    from .walk import LayerWalk
    progress = progress or NullProgress()
    device = resolve_device(device)
    t0 = time.perf_counter()
    arch = build_architecture(ckpt)  # a clear error for a model the walk cannot handle, before any data is read
    ids = _samples(ckpt, calib, samples, seq_len)
    out: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    with exact_matmul(device):
        walk = LayerWalk(ckpt, parallel.share(group, ids), device, moe, arch, group=group)
        progress.start("calibrating", len(walk.layers))
        for block in walk.blocks():
            got = walk.collect(block, walk.targets(block), keep=True)
            for name, st in got.stats.items() if group.root else ():
                out[module_of(name)] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                                        for k, v in st.as_dict().items()}
            experts.update(got.experts)
            progress.advance(1, description=block.path)
    info = {"layers": len(walk.layers), "modules": len(out), "samples": len(ids), "tokens": _tokens(ids),
            "seq_len": seq_len, "device": str(device), "seconds": time.perf_counter() - t0,
            "experts": _experts_summary(experts), "processes": group.world}
    return out, info


@dataclass(frozen=True)
class Calibrated:
    """One planned weight as the walk quantized it: the weight, and what the report says of it (`extra`: how it was
    quantized, whether calibration data reached it, its output error on that data for rtn and for its method).
    With activation-aware scaling the walk also yields every dense tensor of its blocks: `weight` None, `tensor` its
    value to store (changed where scales were folded into it; extra["folded"] then says how much)."""

    name: str
    weight: QuantizedWeight | None
    extra: dict
    tensor: torch.Tensor | None = None


def block_tensors(ckpt) -> set[str]:
    """The tensors that fill the walked blocks (under activation-aware scaling the walk yields every one of them)."""
    arch = build_architecture(ckpt)
    return {n for e in arch.layout.entries_under(arch.blocks_path) for n in e.names}


def quantize_layerwise(ckpt, plans, calib, *, samples: int = 128, seq_len: int = 512, damp: float = 0.01,
                       device="auto", progress=None, moe: MoeCalib | None = None, awq_grid: int = 20,
                       fold_only: bool = False, group=distributed.SINGLE) -> Generator[Calibrated, None, dict]:
    """Quantize every planned weight (each with its plan's spec) on calibration data, block by block, yielding each
    as it is done: a block's weights in name order, then the weights outside the walked blocks. An MoE expert
    weight's `extra["expert"]` says how many tokens the router sent it and where its statistics came from. Under
    torchrun (`group`) each process walks its share of the windows, each weight is quantized by the owner of its
    statistics (qtool.calib.parallel) and broadcast, and rank 0 alone yields.

    calib: calibration data (text / JSONL / safetensors token ids) or a list of id tensors. moe: how experts get
    their statistics (`--moe-calib`). Plans with method awq / awq+gptq first scale each block (qtool.calib.awq,
    `awq_grid` values of α); the walk then also yields the blocks' dense tensors. fold_only (AWQ plans): nothing is
    quantized; every tensor of the walked blocks is yielded dense, as folding left it (the folded model, whose outputs
    are the source's up to float rounding). The generator's value
    (StopIteration.value) is {"samples", "tokens", "device", "seconds", "layers", "method", "damp", "processes",
    "calibrated", "uncalibrated", "experts"} and, with scaling, "awq" ({"grid", "mappings", "skipped", "folded"}).
    """
    progress = progress or NullProgress()
    device = resolve_device(device)
    t0 = time.perf_counter()
    todo = _todo(ckpt, plans)
    methods = ", ".join(sorted({p.spec.method for p in todo.values()}))
    arch = build_architecture(ckpt)  # a clear error for a model the walk cannot handle, before any data is read
    from .walk import LayerWalk
    ids = _samples(ckpt, calib, samples, seq_len)
    done: list[Calibrated] = []
    log = AwqLog(awq_grid, _trial_rank(group, ids)) if any(p.spec.awq for p in todo.values()) else None
    with exact_matmul(device):
        walk = LayerWalk(ckpt, parallel.share(group, ids), device, moe, arch, group=group)
        progress.start(f"quantizing ({methods})", len(walk.layers))
        for block in walk.blocks():
            for item in _block(ckpt, walk, block, todo, damp, device, log, fold_only, group):
                done.append(item)
                yield item
            progress.advance(1, description=block.path)
    for name in [n for n in layer_order(ckpt) if n in todo and not fold_only]:
        plan = todo.pop(name)
        if group.root:
            done.append(_plain(ckpt, plan, device, "outside the walked blocks: no calibration statistics"))
            yield done[-1]
    weights = [c for c in done if c.weight is not None]
    info = {"samples": len(ids), "tokens": _tokens(ids), "device": str(device), "seconds": time.perf_counter() - t0,
            "layers": len(walk.layers), "method": methods, "damp": damp,
            "processes": group.world,
            "calibrated": sum(1 for c in weights if c.extra["calibrated"]),
            "uncalibrated": [c.name for c in weights if not c.extra["calibrated"]],
            "experts": _experts_summary({c.name: c.extra["expert"] for c in weights if "expert" in c.extra})}
    return {**info, "awq": log.part()} if log is not None else info


def _tokens(ids) -> int:
    """Calibration tokens of the whole run (every process reads every window, then walks its share)."""
    return sum(int(s.numel()) for s in ids)


def _todo(ckpt, plans) -> dict:
    todo = {p.name: p for p in plans if p.quantize}
    if not todo:
        conv1d = any("Conv1D" in p.reason for p in plans)
        raise QtoolError(ckpt.path, "nothing to quantize: no tensor is planned for quantization" +
                         (" (GPT-2 Conv1D weights are not quantized by default; --include them to quantize "
                          "them without calibration)" if conv1d else ""))
    return todo


def _trial_rank(group, ids: list) -> int:
    """The process holding the shortest window, the sample one process tries AWQ's folds on (the first of the
    shortest, as qtool.calib.awq.view_of picks it)."""
    return group.holder(min(range(len(ids)), key=lambda i: ids[i].numel()), len(ids)) if group.parallel else 0


class AwqLog:
    """What activation-aware scaling did, block by block, for the report; `trial`: the process that checks the
    candidate folds under torchrun."""

    def __init__(self, grid: int, trial: int = 0):
        self.grid, self.trial, self.mappings, self.skipped, self.folded = grid, trial, [], [], []

    def add(self, block, scaled) -> None:
        self.mappings += [{"block": block.path, **m} for m in scaled.mappings]
        self.skipped += [{"block": block.path, **s} for s in scaled.skipped]
        self.folded += [{"tensor": n, **f} for n, f in sorted(scaled.folded.items())]

    def part(self) -> dict:
        return {"grid": self.grid, "mappings": self.mappings, "skipped": self.skipped, "folded": self.folded}


def _block(ckpt, walk, block, todo: dict, damp: float, device, log: AwqLog | None, fold_only: bool,
           group) -> Iterator[Calibrated]:
    """The planned weights of one block: statistics of every sample's inputs to its nn.Linear modules and MoE
    experts, (with AWQ: the block's scales searched and folded), each weight quantized with them, the dequantized
    weights loaded back, then the samples run again for the next block's inputs (a block with nothing to calibrate
    runs once). Under torchrun each weight is quantized by its statistics' owner, all owners side by side, then
    broadcast in name order."""
    from .walk import calibratable
    targets = walk.targets(block)
    block_todo = sorted(n for n in block.tensors if n in todo)
    usable = calibratable(targets)
    names = [n for n in block_todo if n in usable]
    if log is not None and names:  # whole input groups, quantized or not: a fold must scale every reader
        names = sorted(set(names) | {n for n, t in usable.items() if isinstance(t, torch.nn.Linear)})
    # walk.collect reduces the statistics across a torchrun run's processes onto their owners (LayerWalk.reduce),
    # before any weight of the block is quantized or scaled.
    got = walk.collect(block, names, hessian=True) if names else None
    scaled, values = _scaled(walk, block, got, todo, block_todo, usable, log)
    if fold_only:
        yield from _folded_only(ckpt, walk, block, todo, block_todo, scaled)
        return
    owner = {n: got.owners.get(id(got.stats[n]), 0) for n in names}
    scales = scaled.scales if scaled is not None else {}
    mine = [n for n in names if n in todo and owner[n] == group.rank]
    factors = _Factors([(got.stats[n], scales.get(n)) for n in mine if todo[n].spec.weight_method == "gptq"],
                       damp, device)
    searched = scaled.errors if scaled is not None else {}
    owned = {n: _calibrated(ckpt, todo[n], got.stats[n], damp, device, values.get(n), scales.get(n), factors,
                            got.energy.get(n), searched.get(n)) for n in mine}
    w_hats = {}
    for name in block_todo:
        plan = todo.pop(name)
        if name not in usable:
            if group.root:
                yield _plain(ckpt, plan, device, _uncalibrated_note(name, targets))
            continue
        item = group.broadcast_object(owned.pop(name, None), src=owner[name])
        w_hats[name] = item.weight.dequantize(torch.float32).to(device)
        if name in got.experts:
            item.extra["expert"] = got.experts[name]
        if scaled is not None and name in scaled.folded:
            item.extra["awq"] = scaled.folded[name]
        if group.root:
            yield item
    del got
    if log is not None:
        if group.root:
            yield from _dense(ckpt, block, todo, block_todo, scaled)
        w_hats.update({n: v for n, v in (scaled.values.items() if scaled else ()) if n not in w_hats})
    if w_hats:
        walk.update(block, w_hats)  # through the checkpoint's conversion: an expert lands in its fused slice
    del w_hats
    walk.run(block, keep=True)


def _scaled(walk, block, got, todo: dict, block_todo: list[str], usable: dict, log: AwqLog | None):
    """With AWQ: the block's searched scales, folded (qtool.calib.awq), and the changed tensors' values (under
    torchrun each mapping searched by its statistics' owner, the same scales folded on every process)."""
    if log is None or got is None:
        return None, {}
    from .awq import Spread, scale_walked_block
    specs = {n: todo[n].spec for n in block_todo if n in usable}
    scaled, values = scale_walked_block(walk, block, got.stats, got.groups, specs, log.grid,
                                        Spread(walk.group, log.trial, got.owners))
    log.add(block, scaled)
    return scaled, values


def _folded_only(ckpt, walk, block, todo: dict, block_todo: list[str], scaled) -> Iterator[Calibrated]:
    """The folded model itself, unquantized: every tensor of the block as folding left it (rank 0 yields)."""
    if walk.group.root:
        yield from _dense(ckpt, block, todo, [], scaled)
    for name in block_todo:
        todo.pop(name)
    walk.update(block, scaled.values if scaled is not None else {})
    walk.run(block, keep=True)


def _dense(ckpt, block, todo: dict, quantized: list[str], scaled) -> Iterator[Calibrated]:
    """Every dense tensor of the block, as folding left it (the source's value where nothing was folded)."""
    for name in sorted(set(block.tensors) - set(quantized)):
        value = scaled.values.get(name) if scaled is not None else None
        tensor = ckpt.get(name) if value is None else value.to("cpu", ckpt.tensors[name].dtype)
        folded = scaled.folded.get(name) if scaled is not None else None
        yield Calibrated(name, None, {"folded": folded} if folded else {}, tensor)


def _uncalibrated_note(name: str, targets: dict) -> str:
    if name in targets:
        return "GPT-2 Conv1D weight: quantized in its stored [in, out] layout without calibration"
    return "not an nn.Linear or expert weight: quantized without calibration"


class _Factors:
    """GPTQ's factorization of each input record (with AWQ: of its scaled inputs), computed when the first weight
    reading it needs it and dropped after the last (q/k/v share one, gate/up one: same H, same act-order)."""

    def __init__(self, uses: list, damp: float, device):
        self.damp, self.device = damp, device
        self._left = Counter(self._key(st, s) for st, s in uses)
        self._made: dict[tuple, object] = {}

    @staticmethod
    def _key(st, s) -> tuple:
        return id(st), None if s is None else id(s)

    def take(self, st, s, h: torch.Tensor, name: str):
        from ..quant.gptq import factorize
        key = self._key(st, s)
        f = self._made.pop(key, None) or factorize(h, self.damp, True, name, self.device)
        self._left[key] -= 1
        if self._left[key]:
            self._made[key] = f
        return f


def _calibrated(ckpt, plan, st, damp: float, device, w=None, s=None, factors: _Factors | None = None,
                energy=None, searched: float | None = None) -> Calibrated:
    """One weight quantized with its inputs' statistics (gptq: Hessian; mse: mean square) and its output error on
    the calibration data measured for rtn and for the method. With activation-aware scaling, `w` is its value after
    folding and `s` its column scales: it is quantized with the statistics of the scaled inputs X·diag(1/s) (its
    `after` error is that of the scaled layer's outputs, `before` rtn's on the unscaled layer). `energy`: ‖XWᵀ‖² as
    the forward computed it (LinearTaps), the errors' denominator without a product with H; `searched`: with awq,
    the scaled weight's output error as the scale search measured it for the mse quantizer used here."""
    w0 = ckpt.get(plan.name).to(device)
    w = w0 if w is None else w
    h, imp = st.hessian, st.importance()
    if s is not None:
        h, imp = awq.scaled_hessian(h, s), imp / s.square()
    spec = plan.spec.with_method(plan.spec.weight_method)
    rtn = None if spec.method == "rtn" else quantize_weight(w0, spec.with_method("rtn")).dequantize(torch.float32)
    den = float(energy) if energy is not None and s is None else None
    measure = ()
    if spec.method == "gptq" and s is None:
        # gptq measures rtn's error (and tr(W H Wᵀ) unless the forward gave it) with its own factor of H, and its
        # own error from its scaled errors
        measure = (w.float() - rtn,) if den is not None else (w, w.float() - rtn)
    factor = factors.take(st, s, h, plan.name) if factors is not None and spec.method == "gptq" else None
    qw = quantize_weight(w, spec, hessian=h, importance=imp, damp=damp, name=plan.name, measure=measure,
                         factor=factor)
    w_hat = qw.dequantize(torch.float32)
    if measure and qw.residual is not None:
        *given, rtn_num = qw.residual["quadratic"]
        den = den if den is not None else given[0]
        before, after = error_ratio(rtn_num, den), error_ratio(residual(w, w_hat, qw.residual), den)
    elif rtn is None:
        before = after = output_errors(w, [w_hat], h, den=den)[0]
    elif s is None:
        before, after = output_errors(w, [rtn, w_hat], h, den=den)  # tr(W H Wᵀ) at most once for both
    else:
        # rtn's error on the unscaled layer, whose outputs' energy the forward measured before any fold; the scaled
        # layer computes the same outputs (X diag(1/s) · (W diag(s))ᵀ), so that energy is its denominator too
        den = None if energy is None else float(energy)
        before = output_errors(w0, [rtn], st.hessian, den=den)[0]
        if searched is not None and den is not None and spec.method == "mse":
            after = error_ratio(searched, den)  # against the original layer, as the search measured it
        else:
            after = output_errors(w, [w_hat], h, den=den)[0]
    extra = {**qw.info, "calibrated": True, "output_error_before": before, "output_error_after": after}
    return Calibrated(plan.name, qw.cpu(), extra)


def _plain(ckpt, plan, device, note: str) -> Calibrated:
    """A planned weight no calibration data reached: mse (unweighted) for mse/gptq, min-max for rtn."""
    method = "rtn" if plan.spec.method == "rtn" else "mse"
    qw = quantize_weight(ckpt.get(plan.name).to(device), plan.spec.with_method(method))
    extra = {**qw.info, "calibrated": False, "output_error_before": None, "output_error_after": None, "note": note}
    return Calibrated(plan.name, qw.cpu(), extra)
