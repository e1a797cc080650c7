"""The multiple-choice knapsack behind mixed precision, solved exactly: pick one option per group so that the summed
cost stays within the budget and the summed error is smallest.

Order of solutions (what "best" means, so that the answer is unique): smaller total error, then smaller total cost,
then the lexicographically smaller tuple of option indices (groups in the caller's order; callers sort groups and
options by name, so ties are broken by name). Errors are finite floats >= 0 and are summed exactly (as integers over
their common power-of-two denominator), so no rounding can reorder two solutions; costs are integers.

Method, and why it is exact:
1. Options another option of the same group matches or beats in both cost and error are dropped: swapping to the
   better one never makes a solution worse (and an exact tie goes to the smaller index).
2. The linear relaxation is solved greedily on each group's lower convex hull (steps in order of error saved per
   unit of cost); the step that no longer fits the budget gives the multiplier λ = p/q. Feasible solutions built
   around it (and improved by single-group moves) give an error U that bounds the optimum from above.
3. For any feasible x and any λ >= 0, q·err(x) >= Σ_g M_g − p·budget + Σ_g R_g(x_g), where M_g = min_k (q·e_gk + p·c_gk)
   and R_gk = q·e_gk + p·c_gk − M_g >= 0 (the Lagrangian bound, Σ_g c_g(x_g) <= budget). So every solution at least as
   good as U, the optimum and every solution tied with it included, has Σ_g R_g(x_g) <= GAP = q·U − (Σ M_g − p·budget):
   options with R_gk above GAP cannot be part of one and are dropped.
4. Dynamic programming over the groups keeps, after each group, the partial solutions that no other partial solution
   beats in both cost and error (the Pareto front; of exact ties the lexicographically first), and drops a partial
   solution whose error plus a lower bound on the groups still open (their linear relaxation within the budget
   left, in floats, compared with a relative margin of 1e-9) exceeds U. Any completion adds the same cost and error
   to two partial solutions, so one that was beaten can never finish ahead of the one that beat it, and a dropped
   one cannot finish within U: the best final state is the optimum. Groups whose options differ most in cost go
   first (fixing them makes the bound on the rest tight). Steps 1-3 and the bound only make the search small; tests
   check the answer against brute force and against a plain dynamic program over integer costs.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence


class Infeasible(ValueError):
    """Even the cheapest option of every group exceeds the budget; `smallest` is that cheapest total."""

    def __init__(self, smallest: int, budget: int):
        self.smallest, self.budget = smallest, budget
        super().__init__(f"the smallest reachable cost is {smallest}, above the budget {budget}")


@dataclass(frozen=True)
class Solution:
    """picks[g]: the chosen option of group g. error: the exact summed error (as a float); lower_bound: the
    Lagrangian bound of step 3 (<= error; equal when the relaxation is integral); states: partial solutions the
    search kept (a measure of the work step 4 did)."""

    picks: tuple[int, ...]
    cost: int
    error: float
    lower_bound: float
    states: int


def solve(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int) -> Solution:
    """The best solution (module docstring) of: one option k per group g, Σ costs[g][k] <= budget, least Σ errors."""
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("every group needs at least one option, with one cost and one error each")
    exact, den = _exact_errors(errors)
    smallest = sum(min(c) for c in costs)
    if smallest > budget:
        raise Infeasible(smallest, budget)
    options = [_undominated(c, e) for c, e in zip(costs, exact)]
    lam, upper = _relaxation(options, budget)
    if lam is None:  # every group at its least-error option fits: nothing to trade
        picks = tuple(opts[-1][2] for opts in options)
        return _solution(picks, costs, exact, den, sum(opts[-1][1] for opts in options), states=len(picks))
    p, q = lam.numerator, lam.denominator
    m = [min(q * e + p * c for c, e, _ in opts) for opts in options]
    bound_q = sum(m) - p * budget  # q times the Lagrangian lower bound
    gap = q * upper - bound_q
    reduced = [[(c, e, k, float(errors[g][k])) for c, e, k in opts if q * e + p * c - mg <= gap]
               for g, (opts, mg) in enumerate(zip(options, m))]
    picks, states = _search(reduced, budget, float(Fraction(upper, den)))
    return _solution(picks, costs, exact, den, Fraction(max(bound_q, 0), q), states)


def _exact_errors(errors: Sequence[Sequence[float]]) -> tuple[list[list[int]], int]:
    """(errors as integers over one common power-of-two denominator, that denominator): floats are dyadic
    rationals, so this is exact."""
    ratios = []
    for row in errors:
        for e in row:
            e = float(e)
            if not (e >= 0.0 and e != float("inf")):
                raise ValueError(f"errors must be finite and >= 0, not {e}")
            ratios.append(e.as_integer_ratio())
    den = max((d for _, d in ratios), default=1)
    it = iter(n * (den // d) for n, d in ratios)
    return [[next(it) for _ in row] for row in errors], den


def _undominated(costs: Sequence[int], errors: Sequence[int]) -> list[tuple[int, int, int]]:
    """(cost, error, index) of the options no other option of the group matches or beats in cost and error, by
    cost ascending (so error strictly descending)."""
    kept: list[tuple[int, int, int]] = []
    for c, e, k in sorted((int(c), e, k) for k, (c, e) in enumerate(zip(costs, errors))):
        if not kept or e < kept[-1][1]:
            kept.append((c, e, k))
    return kept


def _hull_steps(g: int, opts: list[tuple[int, int, int]]) -> list[tuple[Fraction, int, int, int]]:
    """The lower convex hull of one group's options as steps (error saved per unit cost, group, from, to)."""
    hull = [0]
    for i in range(1, len(opts)):
        while len(hull) >= 2:
            (c0, e0, _), (c1, e1, _) = opts[hull[-2]], opts[hull[-1]]
            c2, e2 = opts[i][0], opts[i][1]
            if (e0 - e1) * (c2 - c1) <= (e1 - e2) * (c1 - c0):  # the middle point is not below the chord
                hull.pop()
            else:
                break
        hull.append(i)
    return [(Fraction(opts[a][1] - opts[b][1], opts[b][0] - opts[a][0]), g, a, b) for a, b in zip(hull, hull[1:])]


def _relaxation(options: list[list[tuple[int, int, int]]], budget: int) -> tuple[Fraction | None, int]:
    """(λ of the first hull step that does not fit, error of a good feasible solution), λ None when all fit.

    Greedy on the hull steps gives λ and two feasible solutions, improved by single-group moves: the steps before
    the critical one (plus any later ones that fit), and the critical one taken with the least efficient steps
    undone until the budget holds. The better bounds the optimum from above."""
    steps = sorted((s for g, opts in enumerate(options) for s in _hull_steps(g, opts)),
                   key=lambda s: (-s[0], s[1], s[2]))
    at = [0] * len(options)  # each group's current option (index into its undominated list)
    left = budget - sum(opts[0][0] for opts in options)
    lam, taken = None, []
    for step in steps:
        _, g, a, b = step
        dc = options[g][b][0] - options[g][a][0]
        if at[g] != a:
            continue  # an earlier step of this group did not fit
        if dc <= left:
            at[g], left = b, left - dc
            taken.append(step)
        elif lam is None:
            lam, critical = step[0], step
    if lam is None:
        return None, 0
    first = _polish(options, list(at), budget)
    second = [0] * len(options)
    for _, g, a, b in sorted(taken + [critical], key=lambda s: (-s[0], s[1], s[2])):
        second[g] = b
    while sum(options[g][i][0] for g, i in enumerate(second)) > budget:
        g = min((g for g, i in enumerate(second) if i > 0),
                key=lambda g: _slope(options[g], second[g] - 1, second[g]))
        second[g] -= 1  # hull points are consecutive undominated options only where the hull has them all
    return lam, min(first, _polish(options, second, budget))


def _slope(opts, a: int, b: int) -> Fraction:
    return Fraction(opts[a][1] - opts[b][1], opts[b][0] - opts[a][0])


def _polish(options, at: list[int], budget: int) -> int:
    """Error of `at` after single-group moves that fit and lower the error, best first, until none is left."""
    left = budget - sum(options[g][i][0] for g, i in enumerate(at))
    while True:
        best = None
        for g, opts in enumerate(options):
            c0, e0, _ = opts[at[g]]
            for j, (c, e, _) in enumerate(opts):
                if e < e0 and c - c0 <= left and (best is None or e0 - e > best[0]):
                    best = (e0 - e, g, j, c - c0)
        if best is None:
            return sum(options[g][i][1] for g, i in enumerate(at))
        _, g, j, dc = best
        at[g], left = j, left - dc


def _search(reduced, budget: int, upper: float) -> tuple[tuple[int, ...], int]:
    """Step 4: the best picks over the options left, and the number of partial solutions kept. reduced[g]: (cost,
    exact error, index, float error); upper: a float at least the optimum's error. Groups whose options differ most
    in cost go first: once they are fixed, the bound on the rest is tight and few partial solutions survive."""
    order = sorted(range(len(reduced)), key=lambda g: (min(o[0] for o in reduced[g]) - max(o[0] for o in reduced[g]), g))
    groups = [reduced[g] for g in order]
    bound = _SuffixBound(groups)
    limit = upper * (1 + 1e-9) + 1e-300  # float bounds are only used with this margin: never prune the optimum
    fronts = [[(0, 0, 0.0, -1, -1)]]  # (cost, exact error, float error, parent index in the previous front, option)
    for level, opts in enumerate(groups):
        grown = []
        for i, (c0, e0, f0, _, _) in enumerate(fronts[-1]):
            for c, e, k, f in opts:
                rest = bound.least(level + 1, budget - c0 - c)
                if rest is not None and f0 + f + rest <= limit:
                    grown.append((c0 + c, e0 + e, f0 + f, i, k))
        fronts.append(grown)
        fronts[-1] = _pareto(grown, lambda i: _picks(fronts, order, i))
    last = fronts[-1]
    best = min(range(len(last)), key=lambda i: (last[i][1], last[i][0], _picks(fronts, order, i)))
    return _picks(fronts, order, best), sum(len(f) for f in fronts)


def _picks(fronts, order, i: int) -> tuple[int, ...]:
    """The options of state i of the last front, for the groups decided so far, in the caller's group order."""
    chosen = {}
    for level in range(len(fronts) - 1, 0, -1):
        _, _, _, parent, k = fronts[level][i]
        chosen[order[level - 1]] = k
        i = parent
    return tuple(chosen[g] for g in sorted(chosen))


def _pareto(states: list[tuple], picks) -> list[tuple]:
    """The states no other state matches or beats in (cost, exact error); of states equal in both, the one whose
    picks (picks(i): the caller's order) are lexicographically first."""
    order = sorted(range(len(states)), key=lambda i: (states[i][0], states[i][1]))
    keep, best = [], None
    for n, i in enumerate(order):
        cost, err = states[i][0], states[i][1]
        if keep and (states[keep[-1]][0], states[keep[-1]][1]) == (cost, err):
            if picks(i) < picks(keep[-1]):  # an exact tie (rare): the name order decides
                keep[-1] = i
        elif best is None or err < best:
            keep.append(i)
            best = err
    return [states[i] for i in keep]


class _SuffixBound:
    """least(g, b): a lower bound (the linear relaxation, in floats) on the error of groups g.. within budget b, or
    None when not even their cheapest options fit; from each suffix's hull steps sorted by efficiency."""

    def __init__(self, reduced):
        import numpy as np
        self.np = np
        n = len(reduced)
        self.base_cost, self.base_err = [0] * (n + 1), [0.0] * (n + 1)
        self.tables = [None] * (n + 1)
        steps = np.zeros((0, 3))  # (slope, cost, error saved) of the suffix, most efficient first
        for g in range(n, -1, -1):
            if g < n:
                opts = sorted((c, f) for c, _, _, f in reduced[g])
                self.base_cost[g] = self.base_cost[g + 1] + opts[0][0]
                self.base_err[g] = self.base_err[g + 1] + opts[0][1]
                mine = np.array(_float_steps(opts)).reshape(-1, 3)
                steps = np.concatenate([steps, mine])
                steps = steps[np.argsort(-steps[:, 0], kind="stable")]
            cum_c = np.concatenate([[0.0], np.cumsum(steps[:, 1])])
            cum_e = np.concatenate([[0.0], np.cumsum(steps[:, 2])])
            self.tables[g] = (cum_c, cum_e, np.concatenate([steps[:, 0], [0.0]]))

    def least(self, g: int, budget: int) -> float | None:
        left = budget - self.base_cost[g]
        if left < 0:
            return None
        cum_c, cum_e, slope = self.tables[g]
        i = int(self.np.searchsorted(cum_c, left, side="right")) - 1
        return max(self.base_err[g] - cum_e[i] - slope[i] * (left - cum_c[i]), 0.0)


def _float_steps(opts: list[tuple[int, float]]) -> list[tuple[float, float, float]]:
    """The lower convex hull of (cost, error) points by cost as (slope, cost step, error saved) steps."""
    pts = []
    for c, f in opts:
        if pts and f >= pts[-1][1]:
            continue  # not below a cheaper point: off the lower hull
        while len(pts) >= 2 and (pts[-2][1] - pts[-1][1]) * (c - pts[-1][0]) <= (pts[-1][1] - f) * (pts[-1][0] - pts[-2][0]):
            pts.pop()
        pts.append((c, f))
    return [((a[1] - b[1]) / (b[0] - a[0]), b[0] - a[0], a[1] - b[1]) for a, b in zip(pts, pts[1:]) if b[0] > a[0]]


def _solution(picks, costs, exact, den: int, exact_lb, states: int) -> Solution:
    total = sum(exact[g][k] for g, k in enumerate(picks))
    return Solution(tuple(picks), sum(costs[g][k] for g, k in enumerate(picks)), float(Fraction(total, den)),
                    float(Fraction(exact_lb) / den), states)
