"""Choose a scheme for every quantization candidate to meet a size budget at the least summed predicted error.

Modules a serving engine fuses (qtool.arch.fused_groups) form one group and get one scheme; each group chooses one
candidate that fits all its members' widths; modules pinned by `--scheme` rules keep their scheme and spend their
share of the budget first. The choice is the exact optimum of the multiple-choice knapsack (qtool.alloc.solver).

Budgets: `--target-bits B` is the average of codes + scales + zero points over every candidate weight (8·bytes ≤
B·parameters, in integers); `--max-size SIZE` is the whole output checkpoint, every file. For the size the solver
counts, per module, its tensors' bytes and a fixed allowance for its header, index and config entries; the rest of
the checkpoint is measured exactly for the cheapest choice (the caller's `size_of` lays the output out without
writing it), and a choice whose exact size still exceeds SIZE (entries longer than allowed for) is solved again
with the budget cut by the excess, so the output never exceeds SIZE.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterable, Mapping, Sequence

import torch

from .. import arch
from ..errors import ArgumentError, QtoolError
from ..quant.spec import QuantSpec, parse_spec, spec_text
from . import costs
from .solver import Infeasible, Solution, solve

DEFAULT_CANDIDATES = ("int4:g128", "int4:g64", "int4:g32", "int8:channel")
ENTRY_BYTES = 120  # allowance per stored tensor for its header and index entries, beyond twice its name
SIZE_ROUNDS = 32  # re-solves with a cut budget before falling back to the cheapest choice


@dataclass(frozen=True)
class Target:
    """`--target-bits` (bits, exact as written) or `--max-size` (size, bytes)."""

    bits: Fraction | None = None
    size: int | None = None

    @classmethod
    def of(cls, target_bits=None, max_size: int | None = None) -> "Target | None":
        if target_bits is not None and max_size is not None:
            raise ArgumentError("--target-bits", "give --target-bits or --max-size, not both")
        if target_bits is not None:
            bits = Fraction(str(target_bits))
            if bits <= 0:
                raise ArgumentError("--target-bits", f"must be above 0, not {target_bits}")
            return cls(bits=bits)
        if max_size is not None:
            if max_size <= 0:
                raise ArgumentError("--max-size", f"must be above 0, not {max_size}")
            return cls(size=int(max_size))
        return None

    @property
    def option(self) -> str:
        return f"--target-bits {float(self.bits):g}" if self.bits is not None else f"--max-size {self.size}"


@dataclass(frozen=True)
class Weight:
    """A candidate weight: its [out, in] shape and dtype."""

    shape: tuple[int, int]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def parse_candidates(texts: Iterable[str], defaults: dict) -> list[QuantSpec | None]:
    """`--candidates` as specs (completed from `defaults`, plan.spec_defaults), sorted by their SPEC names (so
    ties go by name); two SPECs that name one scheme are refused."""
    seen: dict[QuantSpec | None, str] = {}
    for text in texts:
        try:
            spec = parse_spec(text, **defaults)
        except ValueError as e:
            raise ArgumentError("--candidates", str(e)) from None
        if spec in seen:
            raise ArgumentError("--candidates", f"{seen[spec]!r} and {text!r} are the same scheme ({spec_text(spec)})")
        seen[spec] = text
    if not seen:
        raise ArgumentError("--candidates", "lists no SPEC")
    return sorted(seen, key=spec_text)


@dataclass
class Allocation:
    """The outcome: every candidate module's scheme and predicted error, and the report's `allocation` block."""

    specs: dict[str, QuantSpec | None]
    predicted: dict[str, float]
    block: dict


def allocate(weights: Mapping[str, Weight], pinned: Mapping[str, QuantSpec | None],
             candidates: Sequence[QuantSpec | None], errors: Mapping[str, Mapping[QuantSpec | None, float]],
             target: Target, size_of: Callable[[dict], int] | None = None,
             objective: Mapping[str, Mapping[QuantSpec | None, float]] | None = None) -> Allocation:
    """The best schemes for `weights` (every candidate module, by name) within `target`. pinned: modules whose
    scheme a rule fixed; errors[module][spec]: predicted errors (each free module under every candidate that fits
    it, each pinned one under its scheme), what the report gives; objective (same keys, default `errors`): what the
    choice minimises (qtool.alloc.measure.objective); size_of({module: spec}) the exact output bytes (for
    --max-size)."""
    objective = errors if objective is None else objective
    groups = arch.fused_groups(m for m in weights if m not in pinned)
    options, group_costs, group_errors = [], [], []
    for g in groups:
        fitting = [s for s in candidates if all(costs.fits(weights[m].shape, s) for m in g.members)]
        if not fitting:
            raise QtoolError(g.name, f"no candidate fits its input width(s) "
                                     f"{sorted({weights[m].shape[1] for m in g.members})}; add one to --candidates "
                                     f"(e.g. int8:channel) or --exclude it")
        options.append(fitting)
        group_costs.append([sum(_cost(weights[m], s, target, m) for m in g.members) for s in fitting])
        group_errors.append([sum(objective[m][s] for m in g.members) for s in fitting])

    def assign(picks) -> dict:
        chosen = dict(pinned)
        for g, opts, k in zip(groups, options, picks):
            chosen.update({m: opts[k] for m in g.members})
        return chosen

    if target.bits is not None:
        solution = _within_bits(weights, pinned, group_costs, group_errors, target)
    else:
        solution = _within_size(group_costs, group_errors, target, lambda picks: size_of(assign(picks)))
    specs = assign(solution.picks)
    predicted = {m: errors[m][specs[m]] for m in weights}
    block = _block(weights, specs, predicted, candidates, target, solution, len(groups),
                   pinned_error=sum(objective[m][specs[m]] for m in pinned))
    return Allocation(specs, predicted, block)


def _cost(w: Weight, spec: QuantSpec | None, target: Target, module: str) -> int:
    if target.bits is not None:
        return costs.weight_bytes(w.shape, w.dtype, spec)
    tensors = costs.parts(w.shape, w.dtype, spec)
    names = sum(2 * len(module) + len(local) + 1 + ENTRY_BYTES for local, _, _ in tensors)
    return costs.stored_bytes(w.shape, w.dtype, spec) + names + len(module) + 10  # + its line in a config group


def _within_bits(weights, pinned, group_costs, group_errors, target: Target) -> Solution:
    params = sum(w.numel for w in weights.values())
    fixed = sum(costs.weight_bytes(weights[m].shape, weights[m].dtype, s) for m, s in pinned.items())
    budget = math.floor(target.bits * params / 8) - fixed
    try:
        return solve(group_costs, group_errors, budget)
    except Infeasible as e:
        least = Fraction(8 * (e.smallest + fixed), params)
        raise QtoolError(target.option, f"cannot be met: the smallest reachable average is "
                                        f"{math.ceil(least * 10**4) / 10**4:g} bits per weight (every module at its "
                                        f"cheapest candidate{', rules as given' if pinned else ''})") from None


def _within_size(group_costs, group_errors, target: Target, exact_size: Callable) -> Solution:
    cheapest = tuple(min(range(len(c)), key=lambda k: (c[k], e[k], k)) for c, e in zip(group_costs, group_errors))
    least = exact_size(cheapest)
    if least > target.size:
        raise QtoolError(target.option, f"cannot be met: the smallest reachable checkpoint is {least} bytes (every "
                                        f"module at its cheapest candidate)")
    base = least - sum(c[k] for c, k in zip(group_costs, cheapest))
    budget = target.size - base
    for _ in range(SIZE_ROUNDS):
        solution = solve(group_costs, group_errors, budget)
        over = exact_size(solution.picks) - target.size
        if over <= 0:
            return solution
        budget -= over
    return solve(group_costs, group_errors, sum(c[k] for c, k in zip(group_costs, cheapest)))


def _block(weights, specs, predicted, candidates, target: Target, solution: Solution, groups: int,
           pinned_error: float) -> dict:
    """The report's `allocation` block (the caller fills `achieved_bytes` once the output exists)."""
    params = sum(w.numel for w in weights.values())
    stored = sum(costs.weight_bytes(w.shape, w.dtype, specs[m]) for m, w in weights.items())
    by_spec: dict[str, list[str]] = {}
    for m in sorted(specs):
        by_spec.setdefault(spec_text(specs[m]), []).append(m)
    return {
        "target": float(target.bits) if target.bits is not None else target.size,
        "target_kind": "bits_per_weight" if target.bits is not None else "bytes",
        "achieved_bits": float(Fraction(8 * stored, params)),
        "achieved_bytes": None,
        "predicted_error": sum(predicted.values()),
        "by_spec": dict(sorted(by_spec.items())),
        "candidates": [spec_text(s) for s in candidates],
        "solver": {"groups": groups, "states": solution.states,  # the bound is on the minimised objective
                   "objective": solution.error + pinned_error, "lower_bound": solution.lower_bound + pinned_error},
    }
