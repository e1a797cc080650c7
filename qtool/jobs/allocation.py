"""Mixed precision in the quantize job: `--scheme` rules, and a size budget turned into one QuantSpec per tensor.

options → measure → allocate → assign: the job's mixed-precision options checked (`Mixed.of`); the predicted error
of every candidate module under each SPEC it could get and its output energy, measured streaming (one tensor in
memory per worker: read, round to nearest with min-max scales per SPEC, weigh by the input statistics when there are
any); the exact allocation (qtool.alloc.allocate) minimising the run's sensitivity (qtool.alloc.measure.objective:
each fused group's relative error by default); the plan with each module's chosen spec. The job then quantizes with
its own method as in any other run, so only the chosen scheme of each module is quantized by that method.

Why rtn for the measurement: one cheap kernel pass per candidate keeps the whole allocation under one uniform
`mse` run's time, and the chosen modules' final error is never above the predicted one (mse is never worse than
rtn on a tensor; rtn runs reproduce it exactly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

from ..alloc import costs
from ..alloc.allocate import DEFAULT_CANDIDATES, Allocation, Target, Weight, allocate, parse_candidates
from ..alloc.measure import DEFAULT_SENSITIVITY, objective, output_energy, rtn_errors
from ..errors import ArgumentError, QtoolError
from ..plan import SchemeRule, TensorPlan, parse_rules, spec_defaults
from ..quant.spec import QuantSpec, spec_text
from .common import ordered_map, prefetch

KEPT_DENSE = ("kept dense by --scheme", "kept dense by the allocation")  # reasons of candidates left dense


@dataclass(frozen=True)
class Mixed:
    """A run's mixed-precision options: its `--scheme` rules, its budget (None: no allocation) and the candidates
    an allocation chooses from (sorted by SPEC name), and the sensitivity it minimises."""

    rules: tuple[SchemeRule, ...] = ()
    target: Target | None = None
    candidates: tuple[QuantSpec | None, ...] = ()
    sensitivity: str = DEFAULT_SENSITIVITY

    @classmethod
    def of(cls, spec: QuantSpec, schemes=(), target_bits=None, max_size=None, candidates=None,
           sensitivity=None) -> "Mixed":
        """Checked before any work: SPECs, GLOB=SPEC rules, one budget at most, candidates and a sensitivity only
        with a budget (the sensitivity's name is checked with the job's arguments)."""
        rules = tuple(parse_rules(schemes or (), spec))
        target = Target.of(target_bits, max_size)
        for option, value in (("--candidates", candidates), ("--sensitivity", sensitivity)):
            if value is not None and target is None:
                raise ArgumentError(option, "is for an allocation to a budget: give --target-bits or --max-size too")
        if isinstance(candidates, str):
            candidates = [c for c in candidates.split(",") if c.strip()]
        picked = parse_candidates(candidates or DEFAULT_CANDIDATES, spec_defaults(spec)) if target else ()
        return cls(rules, target, tuple(picked), sensitivity or DEFAULT_SENSITIVITY)

    @property
    def active(self) -> bool:
        """Whether modules may get different schemes (then every config group names its modules)."""
        return bool(self.rules) or self.target is not None

    def global_spec(self, spec: QuantSpec) -> QuantSpec | None:
        """The spec of a module no rule decides: the global one, or none yet when the allocation picks it."""
        return None if self.target is not None else spec


def decided(p: TensorPlan) -> bool:
    """Whether a rule or an allocation decides the tensor's scheme: every quantized one, and those they kept dense."""
    return p.quantize or p.reason.startswith(KEPT_DENSE)


def candidates_of(plans: dict[str, TensorPlan]) -> list[TensorPlan]:
    return [p for p in plans.values() if decided(p)]


def choose(ckpt, plans: dict[str, TensorPlan], mixed: Mixed, importance: dict, rt, progress,
           size_of: Callable[[dict], int]) -> tuple[dict[str, TensorPlan], Allocation]:
    """The plans with every candidate module's allocated spec, and the allocation (the report's block)."""
    cands = candidates_of(plans)
    weights = {p.module: Weight((p.shape[0], p.shape[1]), p.dtype) for p in cands}
    pinned = {p.module: p.spec for p in cands if p.spec is not None or not p.quantize}
    options = {p.module: [pinned[p.module]] if p.module in pinned else
               [s for s in mixed.candidates if costs.fits(p.shape, s)] for p in cands}
    errors, energies = measure(ckpt, cands, options, importance, rt, progress)
    chosen = allocate(weights, pinned, mixed.candidates, errors, mixed.target,
                      size_of=lambda specs: size_of(assign(plans, specs, mixed.target)),
                      objective=objective(errors, energies, mixed.sensitivity))
    chosen.block["sensitivity"] = mixed.sensitivity
    return assign(plans, chosen.specs, mixed.target), chosen


def measure(ckpt, cands: Sequence[TensorPlan], options: dict[str, list], importance: dict, rt,
            progress) -> tuple[dict[str, dict], dict[str, float]]:
    """(errors[module][spec]: the predicted error of each candidate module under each of its options, energies[module]:
    its output energy, the normaliser of the sensitivities), streaming."""
    todo = [p for p in cands if options[p.module] != [None]]
    errors = {p.module: {None: 0.0} for p in cands if options[p.module] == [None]}  # dense: nothing is lost
    energies = {}
    sizes = {p.name: ckpt.tensors[p.name].nbytes for p in todo}
    by_name = {p.name: p for p in todo}
    progress.start("measuring errors", total=sum(sizes.values()))

    def one(name, t):
        p = by_name[name]
        specs = options[p.module]
        w, imp = t.to(rt.device), importance.get(p.module)
        measured = rtn_errors(w, specs, imp)
        if not all(map(math.isfinite, measured)):
            raise QtoolError(name, "has NaN/Inf values; fix the source or pass --allow-nonfinite to keep it unquantized")
        return p, dict(zip(specs, measured)), output_energy(w, imp)

    for p, errs, energy in ordered_map(one, prefetch(ckpt.get, list(by_name), sizes), rt.workers):
        errors[p.module], energies[p.module] = errs, energy
        progress.advance(sizes[p.name], description=p.name)
    return errors, energies


def assign(plans: dict[str, TensorPlan], specs: dict[str, QuantSpec | None], target: Target) -> dict[str, TensorPlan]:
    """The plans with the allocated specs (a module allocated `dense` stays unquantized, saying why); the tensors
    no allocation decides (rules' dense ones, biases, norms, ...) as they were."""
    out = dict(plans)
    for p in candidates_of(plans):
        if p.reason.startswith(KEPT_DENSE[0]):
            continue
        if specs[p.module] is None:
            out[p.name] = replace(p, quantize=False, spec=None, reason=f"kept dense by the allocation ({target.option})")
        else:
            out[p.name] = replace(p, quantize=True, spec=specs[p.module])
    return out


def layer_facts(p: TensorPlan | None, allocation: Allocation | None, mixed: Mixed) -> dict:
    """What a mixed run's report row adds: the module's scheme, and its predicted error when allocated."""
    if p is None or not mixed.active or not decided(p):
        return {}
    facts = {"scheme": spec_text(p.spec if p.quantize else None)}
    if allocation is not None:
        facts["predicted_error"] = allocation.predicted[p.module]
    return facts
