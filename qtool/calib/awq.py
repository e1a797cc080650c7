"""Activation-aware scaling of one block (AWQ): which mappings fold exactly, their searched scales, the folded tensors.

A mapping is a group of linears reading one tensor (found by the walk, qtool.calib.collect) and the operation that
produced it: a norm inside the block (its weight, and bias, take 1/s), or, for a group whose input no module produced
(o_proj after attention, down_proj after act(gate)·up), the previous linear that arch.fold_predecessor names (its
output rows take 1/s). A candidate is kept only if folding random scales into a float32 copy of the block leaves the
block's output unchanged on a calibration sample: a norm whose output also feeds a residual (post-LN encoders) or a
router, a GQA value projection narrower than o_proj's input, a non-linear step between the two linears, all fail that
check and are reported as skipped with the reason. The norm's parameterisation (w, or Gemma's 1 + w) is the offset that
passes it. Nothing here knows an architecture by name except arch.fold_predecessor's structural pairs.

Under torchrun (`Spread`) every process scales the same block: one checks the candidates, each mapping's statistics'
owner searches it, and every process folds what they broadcast.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .. import arch, distributed
from ..quant import awq
from ..quant.spec import QuantSpec

# A fold is exact when it moves the block's output by no more than float32 rounding: 1e-4 of what the block adds to
# its input (its branches; a wrong fold changes those by O(1)) plus 1e-6 of the output (rounding of the residual).
EXACT_BRANCH, EXACT_OUTPUT = 1e-4, 1e-6
NORM_OFFSETS = (0.0, 1.0)  # g(w) = w (LayerNorm, RMSNorm), g(w) = 1 + w (Gemma's RMSNorm)


@dataclass(frozen=True)
class Mapping:
    """Linears (`members`, checkpoint weight names) reading the output of `feeder` (a module path in the block)."""

    feeder: str
    kind: str                  # "norm" or "linear"
    members: tuple[str, ...]
    offset: float = 0.0        # a norm's g(w) = w + offset


@dataclass
class Scaled:
    """What AWQ did to one block: the new values of every checkpoint tensor it changed, each quantized member's
    column scales, and the report's rows."""

    values: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)  # member → its mapped output's squared error as the grid
    # measured it with the mse quantizer (awq then uses the same, so its report needs no product with H)
    mappings: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    folded: dict[str, dict] = field(default_factory=dict)   # tensor → {"relative_change", "by" (s | 1/s), "mapping", "alpha"}


class BlockView:
    """A loaded block seen through checkpoint names: module paths inside it, and the checkpoint tensor behind a
    module parameter. `call(module, convert)` runs one calibration sample (block input `hidden`; convert maps its
    arguments, e.g. to float32) through a module shaped like the block."""

    def __init__(self, module: nn.Module, linears: dict[str, nn.Module], params: dict[str, str], call: Callable,
                 hidden: torch.Tensor):
        self.module = module
        self.linears = linears   # checkpoint weight name → its nn.Linear
        self.params = params     # "path.in.block.weight" → checkpoint tensor name
        self.call = call
        self.hidden = hidden     # the block input of the sample `call` runs
        self._paths = {id(m): p for p, m in module.named_modules()}

    def path(self, name: str) -> str:
        return self._paths[id(self.linears[name])]

    def tensor(self, param_path: str) -> str | None:
        return self.params.get(param_path)


def candidates(view: BlockView, groups) -> tuple[list[Mapping], list[dict]]:
    """The mappings the walk's groups suggest, each checked to fold exactly; and the skipped ones with why."""
    found, skipped = [], []
    trial = _Trial(view)
    for g in groups:
        members = tuple(n for n in g.members if n in view.linears)
        if not members:
            continue
        m, why = _candidate(view, g.feeder, members)
        if m is not None and (missing := _unstored(view, m)):
            m, why = None, f"{missing} is not one checkpoint tensor (stored split or fused): nothing to fold into"
        if m is not None:
            m, why = trial.exact(m)
        if m is None:
            skipped.append({"members": [arch.module_of(n) for n in members], "reason": why})
        else:
            found.append(m)
    return found, skipped


def _candidate(view: BlockView, feeder: str | None, members: tuple[str, ...]):
    width = view.linears[members[0]].in_features
    if feeder is None:
        if len(members) != 1 or (prev := arch.fold_predecessor(view.path(members[0]))) is None:
            return None, ("no foldable predecessor: the input is not the output of a module inside the block "
                          "(the block's own input, or computed in its forward) and no previous linear feeds it")
        try:
            mod = view.module.get_submodule(prev)
        except AttributeError:
            return None, f"no foldable predecessor: the block has no {prev}"
        if not isinstance(mod, nn.Linear) or mod.out_features != width:
            outs = getattr(mod, "out_features", "?")
            return None, (f"{prev} gives {outs} channels, {view.path(members[0])} reads {width}: no per-channel "
                          "fold (as where grouped-query attention repeats value heads)")
        return Mapping(prev, "linear", members), None
    mod = view.module.get_submodule(feeder)
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.Linear) and mod.out_features == width:
        return Mapping(feeder, "linear", members), None
    if isinstance(w, torch.Tensor) and w.ndim == 1 and w.numel() == width:
        return Mapping(feeder, "norm", members), None
    return None, f"no foldable predecessor: {feeder} ({type(mod).__name__}) has no per-channel weight of width {width}"


def _unstored(view: BlockView, m: Mapping) -> str | None:
    """The first parameter a fold of m would change that no single checkpoint tensor holds, if any."""
    paths = [f"{view.path(n)}.weight" for n in m.members] + [f"{m.feeder}.weight"]
    if getattr(view.module.get_submodule(m.feeder), "bias", None) is not None:
        paths.append(f"{m.feeder}.bias")
    return next((p for p in paths if view.tensor(p) is None), None)


def _to32(x):
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to32(v) for v in x)
    if isinstance(x, dict):
        return {k: _to32(v) for k, v in x.items()}
    return x


class _Trial:
    """A float32 copy of the block and its output on one sample, to try folds on."""

    def __init__(self, view: BlockView):
        self.view = view
        self.block = copy.deepcopy(view.module).float()
        with torch.no_grad():
            self.want = view.call(self.block, _to32)
            branch = float((self.want - view.hidden.to(self.want.device, torch.float32)).norm())
            self.tolerance = EXACT_BRANCH * branch + EXACT_OUTPUT * float(self.want.norm())
        self.originals = {n: p.detach().clone() for n, p in self.block.named_parameters()}

    @torch.no_grad()
    def exact(self, m: Mapping):
        """m if folding random scales into the copy leaves its output unchanged (a norm: with the first
        parameterisation that does), else None and why."""
        width = self.view.linears[m.members[0]].in_features
        s = torch.exp(torch.rand(width, generator=torch.Generator().manual_seed(0)) - 0.5).to(self.want.device)
        for offset in (NORM_OFFSETS if m.kind == "norm" else (0.0,)):
            trial = Mapping(m.feeder, m.kind, m.members, offset)
            for name, value in fold(_Params(self.block, self.view), trial, s).items():
                self.block.get_parameter(name).copy_(value)
            got = self.view.call(self.block, _to32)
            for n, p in self.block.named_parameters():
                p.copy_(self.originals[n])
            if float((got - self.want).norm()) <= self.tolerance:
                return trial, None
        return None, (f"folding into {m.feeder} changes the block's output: its output also feeds something other "
                      f"than {', '.join(self.view.path(n) for n in m.members)} (a residual, a router) or it is not "
                      "a per-channel scale")


class _Params:
    """Read access to a block's parameters by path (a copy of the block, or the checkpoint's current values)."""

    def __init__(self, block: nn.Module, view: BlockView, values: dict | None = None):
        self.block, self.view, self.values = block, view, values

    def has_bias(self, module: str) -> bool:
        return getattr(self.block.get_submodule(module), "bias", None) is not None

    def get(self, path: str) -> torch.Tensor:
        if self.values is not None:
            return self.values[self.view.tensor(path)]
        return self.block.get_parameter(path).detach()


def fold(params: _Params, m: Mapping, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """{parameter path in the block: new value} for folding s into mapping m (members' columns × s, feeder ÷ s)."""
    out = {}
    for n in m.members:
        path = f"{params.view.path(n)}.weight"
        out[path] = awq.scale_columns(params.get(path), s)
    w, b = f"{m.feeder}.weight", f"{m.feeder}.bias"
    if m.kind == "norm":
        out[w] = awq.fold_into_norm(params.get(w), s, m.offset)
    else:
        out[w] = awq.fold_into_rows(params.get(w), s)
    if params.has_bias(m.feeder):
        out[b] = awq.fold_into_rows(params.get(b), s)
    return out


@dataclass(frozen=True)
class Spread:
    """Who decides what in a torchrun run (every process scales the same block, each holding its share of the
    windows): `trial`, the process holding the sample one process would try folds on, checks the candidates; each
    mapping's search runs on its statistics' owner (`owners`: id(InputStats) → rank), which alone holds their sums
    over every window. Each broadcasts its outcome, so every process folds the same scales."""

    group: distributed.Group = distributed.SINGLE
    trial: int = 0
    owners: dict = field(default_factory=dict)

    def on(self, src: int, compute: Callable):
        """compute() run on process src, its value on every process (one process: compute())."""
        if not self.group.parallel:
            return compute()
        return self.group.broadcast_object(compute() if self.group.rank == src else None, src=src)


def _search(members: list, st, n_grid: int, cpu: bool) -> awq.Searched:
    """One mapping's search on its input statistics; with `cpu`, its scales on the CPU (to broadcast them: a
    pickled CUDA tensor would name this process's device)."""
    count = max(st.count, 1)
    res = awq.search(members, st.hessian, st.sum_abs / count, st.sum_sq / count, n_grid)
    return replace(res, scales=res.scales.cpu()) if cpu else res


def _ahead(view: BlockView, found: list[Mapping]) -> bool:
    """Whether no mapping's member is the feeder of an earlier one (so no fold changes what a later search reads:
    a fold scales its own members' columns and its feeder's rows)."""
    feeders = set()
    for m in found:
        if any(view.path(n) in feeders for n in m.members):
            return False
        feeders.add(m.feeder)
    return True


def scale_block(view: BlockView, groups, stats: dict, values: dict[str, torch.Tensor], quantizer: Callable,
                n_grid: int, spread: Spread = Spread()) -> Scaled:
    """Search and fold every exact mapping of the block in the order its linears run.

    stats: checkpoint weight name → InputStats (with sum_abs and hessian); values: checkpoint name → current tensor
    of every tensor of the block (updated in place as mappings fold); quantizer(name) → that weight's quantizer for
    the search (quant.awq.mse_quantizer of its spec, or kept_dense for a linear left unquantized)."""
    found, skipped = spread.on(spread.trial, lambda: candidates(view, groups))
    out = Scaled(skipped=skipped)
    params = _Params(view.module, view, values)
    owner = [spread.owners.get(id(stats[m.members[0]]), 0) for m in found]

    def search(k: int) -> awq.Searched:
        members = [(values[n], quantizer(n)) for n in found[k].members]
        return _search(members, stats[found[k].members[0]], n_grid, spread.group.parallel)
    # unless an earlier fold changes a later mapping's member, every search can run first: under torchrun each owner
    # then runs its searches side by side with the other owners' (the same values, so the same results)
    early = {k: search(k) for k in range(len(found)) if owner[k] == spread.group.rank} if _ahead(view, found) else {}
    for k, m in enumerate(found):
        st = stats[m.members[0]]
        res = spread.on(owner[k], lambda: early.pop(k) if k in early else search(k))
        res = replace(res, scales=res.scales.to(st.sum_sq.device))
        label = f"{m.feeder} → {', '.join(view.path(n) for n in m.members)}"
        member_paths = tuple(f"{view.path(n)}." for n in m.members)
        # α = 0 is s = 1: nothing to fold (and (w + 1)/1 − 1 would not even give w back bit for bit)
        for path, value in (fold(params, m, res.scales).items() if res.alpha > 0 else ()):
            name = view.tensor(path)
            change = awq.relative_change(values[name], value)
            if change == 0:  # e.g. a zero bias: unchanged, not reported
                continue
            out.folded[name] = {"relative_change": change, "by": "s" if path.startswith(member_paths) else "1/s",
                                "mapping": label, "alpha": res.alpha}
            values[name] = out.values[name] = value
        for k, n in enumerate(m.members if res.alpha > 0 else ()):
            out.scales[n] = res.scales
            if res.parts:
                out.errors[n] = res.parts[k]
        out.mappings.append({"feeder": m.feeder, "kind": m.kind, "offset": m.offset,
                             "members": [arch.module_of(n) for n in m.members], "alpha": res.alpha,
                             "error_ratio": res.gain, "error_unscaled": res.errors[0], "error": min(res.errors)})
    return out


def view_of(walk, block) -> BlockView:
    """The BlockView of a loaded block of a LayerWalk: its nn.Linear targets, its parameters' checkpoint names
    (tensors that fill one model parameter whole), and a call on the shortest calibration sample."""
    prefix = block.path + "."
    params = {}
    for name in block.tensors:
        entry = walk.layout.entry_of[name]
        slot = walk.layout.slot(name)
        if len(entry.targets) == 1 and slot.index is None and slot.target.startswith(prefix):
            params[slot.target[len(prefix):]] = name
    i = min(range(len(walk.inputs)), key=lambda j: walk.inputs[j].ids.numel())
    sample = walk.inputs[i]
    args, kwargs, by_name = sample.calls[block.index]

    def call(module, conv):
        h = conv(sample.hidden.to(walk.device))
        a, kw = conv(args), conv(kwargs)
        out = module(*a, hidden_states=h, **kw) if by_name else module(h, *a, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    linears = {n: m for n, m in walk.targets(block).items() if isinstance(m, nn.Linear)}
    return BlockView(block.module, linears, params, call, sample.hidden)


def scale_walked_block(walk, block, stats: dict, groups, specs: dict[str, QuantSpec], n_grid: int,
                       spread: Spread = Spread()) -> tuple[Scaled, dict]:
    """AWQ on a loaded block of a LayerWalk: (what it did, the current value of every tensor of the block that fills
    one model parameter, on the walk's device). specs: the quantized weights' schemes (others stay dense)."""
    view = view_of(walk, block)
    values = {name: walk.ckpt.get(name).to(walk.device) for name in view.params.values()}

    def quantizer(name):
        return awq.mse_quantizer(specs[name]) if name in specs else awq.kept_dense
    return scale_block(view, groups, stats, values, quantizer, n_grid, spread), values
