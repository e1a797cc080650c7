"""The mixed-precision solver against brute force (every combination, exact rational sums) on small instances, and
against a plain dynamic program over integer costs on larger ones. QTOOL_SOLVER_CASES raises the random count."""
import itertools
import os
import random
from fractions import Fraction

import pytest

from qtool.alloc.solver import Infeasible, solve

CASES = int(os.environ.get("QTOOL_SOLVER_CASES", "400"))


def brute(costs, errors, budget):
    """The order of solver.py's docstring, by enumeration: least error, then least cost, then smallest picks."""
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[g][k] for g, k in enumerate(picks))
        if cost > budget:
            continue
        key = (sum(Fraction(errors[g][k]) for g, k in enumerate(picks)), cost, picks)
        best = key if best is None or key < best else best
    return best


def instance(rng: random.Random, groups: int, options: int, ties: bool):
    costs, errors = [], []
    for _ in range(groups):
        k = rng.randint(1, options)
        costs.append([rng.randint(0, 12) if ties else rng.randint(1, 10_000) for _ in range(k)])
        pool = [0.0, 0.25, 0.5, 1.0, 3.0]  # equal errors and equal sums: ties the order must break
        errors.append([rng.choice(pool) if ties else rng.random() * 10 ** rng.randint(-3, 3) for _ in range(k)])
    lo = sum(min(c) for c in costs)
    hi = sum(max(c) for c in costs)
    return costs, errors, rng.randint(lo, hi) if rng.random() < 0.9 else rng.choice([lo, hi])


@pytest.mark.parametrize("ties", [False, True])
def test_equals_brute_force_on_small_instances(ties):
    rng = random.Random(1234 + ties)
    for case in range(CASES):
        groups = 8 if case % 20 == 0 else rng.randint(1, 6)
        costs, errors, budget = instance(rng, groups, 4, ties)
        want = brute(costs, errors, budget)
        got = solve(costs, errors, budget)
        assert (Fraction(got.error), got.cost, got.picks) == (float(want[0]), want[1], want[2]), (costs, errors, budget)
        assert got.cost <= budget
        assert got.lower_bound <= got.error * (1 + 1e-12)


def test_exact_sums_decide_where_floats_would_tie():
    # 1 + 1e-17 rounds to 1.0 in floats: a float sum would call these equal and pick by cost
    costs = [[1, 2], [1, 1]]
    errors = [[1.0, 1.0 - 2 ** -52], [2 ** -60, 0.0]]
    got = solve(costs, errors, 3)
    assert got.picks == brute(costs, errors, 3)[2] == (1, 1)


def dp_over_costs(costs, errors, budget):
    """An independent exact method for integer costs: best (exact error, cost) for every spent budget."""
    best = {0: (Fraction(0), ())}
    for c_row, e_row in zip(costs, errors):
        grown = {}
        for spent, (err, picks) in best.items():
            for k, (c, e) in enumerate(zip(c_row, e_row)):
                s = spent + c
                if s > budget:
                    continue
                cand = (err + Fraction(e), picks + (k,))
                if s not in grown or cand < grown[s]:
                    grown[s] = cand
        best = grown
    return min((err, spent, picks) for spent, (err, picks) in best.items())


def test_equals_a_dynamic_program_on_larger_instances():
    rng = random.Random(7)
    for _ in range(4):
        costs = [[rng.randint(1, 30) for _ in range(4)] for _ in range(30)]
        errors = [[rng.random() for _ in range(4)] for _ in range(30)]
        budget = rng.randint(sum(min(c) for c in costs), sum(max(c) for c in costs))
        err, spent, picks = dp_over_costs(costs, errors, budget)
        got = solve(costs, errors, budget)
        assert (got.error, got.cost, got.picks) == (float(err), spent, picks)


def test_model_sized_instance_is_fast_and_within_budget():
    # 7B-like: 4 group shapes × 32 layers, 4 schemes (int4 g128/g64/g32, int8), bytes as costs
    import time
    rng = random.Random(3)
    shapes = [(6144, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
    bits = [4 + 16 / 128, 4 + 16 / 64, 4 + 16 / 32, 8 + 16 / 4096]
    costs, errors = [], []
    for layer in range(32):
        for out, inp in shapes:
            costs.append([int(out * inp * b / 8) for b in bits])
            scale = rng.lognormvariate(0, 1) * out * inp
            errors.append([scale * r * rng.uniform(0.9, 1.1) for r in (1.0, 0.85, 0.7, 0.004)])
    total = sum(out * inp for out, inp in shapes) * 32
    t = time.perf_counter()
    for target in (4.3, 4.5, 5.0, 6.0):
        got = solve(costs, errors, int(target * total / 8))
        assert got.cost <= target * total / 8
        assert got.lower_bound <= got.error
    assert time.perf_counter() - t < 5


def test_infeasible_names_the_smallest_cost():
    with pytest.raises(Infeasible) as e:
        solve([[5, 7], [3, 4]], [[1.0, 0.0], [1.0, 0.0]], 7)
    assert e.value.smallest == 8 and e.value.budget == 7


def test_bad_errors_are_refused():
    with pytest.raises(ValueError):
        solve([[1]], [[float("nan")]], 1)
    with pytest.raises(ValueError):
        solve([[1]], [[-1.0]], 1)
