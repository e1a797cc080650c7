"""The allocation around the solver: budgets in bits per weight and in bytes, fused groups, pinned modules, and the
errors for budgets nothing can meet."""
import itertools
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from qtool.alloc import costs
from qtool.alloc.allocate import DEFAULT_CANDIDATES, Target, Weight, allocate, parse_candidates
from qtool.alloc.measure import DEFAULT_SENSITIVITY, SENSITIVITIES, objective, output_energy, rtn_errors
from qtool.errors import QtoolError
from qtool.quant.spec import spec_text

BF16 = torch.bfloat16
CANDS = parse_candidates(DEFAULT_CANDIDATES, {"symmetric": True, "group_size": None, "method": "mse"})


def _model(layers=2):
    w = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj": Weight((256, 256), BF16), p + "self_attn.k_proj": Weight((128, 256), BF16),
                  p + "self_attn.v_proj": Weight((128, 256), BF16), p + "self_attn.o_proj": Weight((256, 256), BF16),
                  p + "mlp.gate_proj": Weight((512, 256), BF16), p + "mlp.up_proj": Weight((512, 256), BF16),
                  p + "mlp.down_proj": Weight((256, 512), BF16)})
    return w


def _errors(weights, seed=0):
    rng = random.Random(seed)
    out = {}
    for m, w in weights.items():
        s = rng.lognormvariate(0, 1) * w.numel
        out[m] = {spec: s * r * rng.uniform(0.9, 1.1) for spec, r in zip(CANDS, (1.0, 0.7, 0.85, 0.004))}
        out[m][None] = 0.0
    return out


def test_candidates_sorted_by_name_and_duplicates_refused():
    assert [spec_text(s) for s in CANDS] == ["int4:g128", "int4:g32", "int4:g64", "int8:channel"]
    with pytest.raises(QtoolError, match="same scheme"):
        parse_candidates(["int4", "int4:g128"], {"symmetric": True, "group_size": None, "method": "mse"})


@pytest.mark.parametrize("bits", ["4.3", "4.5", "5.0", "6"])
def test_bits_budget_is_met_fused_groups_share_and_the_choice_is_brute_forces(bits):
    weights, errors = _model(), _errors(_model())
    target = Target.of(bits)
    a = allocate(weights, {}, CANDS, errors, target)
    params = sum(w.numel for w in weights.values())
    stored = sum(costs.weight_bytes(w.shape, w.dtype, a.specs[m]) for m, w in weights.items())
    assert 8 * stored <= Fraction(bits) * params
    assert a.block["achieved_bits"] == float(Fraction(8 * stored, params)) <= float(bits)
    for i in range(2):
        assert len({a.specs[f"model.layers.{i}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")}) == 1
        assert a.specs[f"model.layers.{i}.mlp.gate_proj"] == a.specs[f"model.layers.{i}.mlp.up_proj"]
    # brute force over the 8 groups x 4 candidates (numpy over all 65536 choices; random errors leave no ties)
    groups = [["model.layers.0.mlp.down_proj"], ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
              ["model.layers.0.self_attn.o_proj"], [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]]
    groups += [[m.replace("layers.0", "layers.1") for m in g] for g in groups]
    combos = np.array(list(itertools.product(range(4), repeat=len(groups))))
    cost = sum(np.array([sum(costs.weight_bytes(weights[m].shape, BF16, s) for m in g) for s in CANDS])[combos[:, i]]
               for i, g in enumerate(groups))
    err = sum(np.array([sum(errors[m][s] for m in g) for s in CANDS])[combos[:, i]] for i, g in enumerate(groups))
    err[8 * cost > float(Fraction(bits) * params)] = np.inf
    best = combos[int(np.argmin(err))]
    assert a.specs == {m: CANDS[k] for g, k in zip(groups, best) for m in g}
    assert a.block["predicted_error"] == pytest.approx(float(err.min()), rel=1e-12)
    assert sorted(m for ms in a.block["by_spec"].values() for m in ms) == sorted(weights)


def test_pinned_modules_spend_their_share_and_report_their_scheme():
    weights = _model()
    errors = _errors(weights)
    pinned = {f"model.layers.0.mlp.{p}": None for p in ("gate_proj", "up_proj")}
    a = allocate(weights, pinned, CANDS, errors, Target.of(9.0))
    assert a.block["by_spec"]["dense"] == sorted(pinned)
    params = sum(w.numel for w in weights.values())
    stored = sum(costs.weight_bytes(w.shape, w.dtype, a.specs[m]) for m, w in weights.items())
    assert 8 * stored <= 9 * params and a.predicted["model.layers.0.mlp.up_proj"] == 0.0


def test_unreachable_bits_name_the_smallest_figure():
    weights = _model()
    with pytest.raises(QtoolError) as e:
        allocate(weights, {}, CANDS, _errors(weights), Target.of(4.1))
    assert e.value.path == "--target-bits 4.1"
    assert "smallest reachable average is 4.125 bits per weight" in e.value.problem
    allocate(weights, {}, CANDS, _errors(weights), Target.of(4.125))  # exactly that figure is reachable


def test_size_budget_counts_what_does_not_add_up_and_never_exceeds():
    weights, errors = _model(), _errors(_model())
    fixed = 123_456

    def size_of(chosen):  # a layout whose headers grow faster than the allowance: the budget must be re-cut
        tensors = sum(costs.stored_bytes(weights[m].shape, BF16, s) for m, s in chosen.items())
        return fixed + tensors + 700 * sum(s is not None and not s.symmetric or 0 for s in chosen.values()) \
            + 50 * len({s for s in chosen.values()})
    least = size_of({m: CANDS[0] for m in weights})
    for size in (least, least + 20_000, least + 60_000, least + 10**6):
        a = allocate(weights, {}, CANDS, errors, Target.of(max_size=size), size_of=size_of)
        assert size_of(a.specs) <= size
    with pytest.raises(QtoolError, match=f"smallest reachable checkpoint is {least} bytes"):
        allocate(weights, {}, CANDS, errors, Target.of(max_size=least - 1), size_of=size_of)


def test_a_group_no_candidate_fits_is_named():
    weights = {"m.odd": Weight((64, 48), BF16)}
    with pytest.raises(QtoolError) as e:
        allocate(weights, {}, CANDS[:3], {"m.odd": {}}, Target.of(5))
    assert e.value.path == "m.odd" and "[48]" in e.value.problem
    a = allocate(weights, {}, CANDS, {"m.odd": {CANDS[3]: 1.0}}, Target.of(9))
    assert a.specs["m.odd"] == CANDS[3]


def test_targets():
    assert Target.of(None, None) is None
    with pytest.raises(QtoolError, match="not both"):
        Target.of(4.5, 10)
    with pytest.raises(QtoolError, match="above 0"):
        Target.of("-1")
    assert Target.of("4.3").bits == Fraction(43, 10) and math.isclose(float(Target.of(4.3).bits), 4.3)


def _measured(tensors, importance=None):
    """errors and output energies of real weights, as the quantize job measures them (rtn per candidate)."""
    errors = {m: dict(zip(CANDS, rtn_errors(w, CANDS, None if importance is None else importance[m])))
              for m, w in tensors.items()}
    return errors, {m: output_energy(w, None if importance is None else importance[m]) for m, w in tensors.items()}


def test_output_energy_is_the_normaliser_computed_directly():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(600, 96, generator=g).to(BF16)  # more rows than one chunk
    imp = torch.rand(96, generator=g) * 5
    direct = float((w.double().square().sum(0) * imp.double()).sum())
    assert output_energy(w, imp) == pytest.approx(direct, rel=1e-6)
    assert output_energy(w) == pytest.approx(float(w.double().square().sum()), rel=1e-6)
    w32 = w.float()
    assert output_energy(w32) == output_energy(w32) and torch.equal(w32, w.float())  # a float32 weight is left as it is
    errors = {"a": {CANDS[0]: 3.0, None: 0.0}, "zero": {CANDS[0]: 0.0}}
    assert objective(errors, {"a": 6.0, "zero": 0.0}, "relative") == {"a": {CANDS[0]: 0.5, None: 0.0},
                                                                      "zero": {CANDS[0]: 0.0}}
    assert objective(errors, {"a": 6.0}, "proxy") == errors
    with pytest.raises(ValueError, match="not one of"):
        objective(errors, {}, "output")


def test_group_sensitivity_is_each_fused_groups_relative_error():
    """group: a fused group's members sum to the group's predicted error over its summed energy (counted once,
    whatever its members); a module alone is its own relative error."""
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    errors = {m: {CANDS[0]: e, None: 0.0} for m, e in zip(qkv + ["model.layers.0.self_attn.o_proj"], (1, 2, 3, 4.0))}
    energies = dict(zip(errors, (10.0, 20.0, 30.0, 8.0)))
    got = objective(errors, energies, "group")
    assert sum(got[m][CANDS[0]] for m in qkv) == pytest.approx(6 / 60)
    assert got["model.layers.0.self_attn.o_proj"][CANDS[0]] == 0.5 == objective(errors, energies, "relative")[
        "model.layers.0.self_attn.o_proj"][CANDS[0]]
    assert sum(objective(errors, energies, "relative")[m][CANDS[0]] for m in qkv) == pytest.approx(0.3)  # 3 × 0.1
    assert DEFAULT_SENSITIVITY == "group"


@pytest.mark.parametrize("calibrated", [False, True])
def test_relative_errors_ignore_a_modules_scale_the_proxy_does_not(calibrated):
    """A module multiplied by 128 (exact in floating point: its errors grow 128², its energy too) keeps its schemes
    under `relative` and `group`; the proxy's absolute errors hand it the bits."""
    weights = _model()
    g = torch.Generator().manual_seed(5)
    tensors = {m: (torch.randn(w.shape, generator=g) * torch.rand(w.shape[1], generator=g).pow(3).mul(4).add(0.2))
               for m, w in weights.items()}
    importance = {m: torch.rand(w.shape[1], generator=g).pow(2) * 3 for m, w in weights.items()} if calibrated else None
    weights = {m: Weight(w.shape, torch.float32) for m, w in weights.items()}
    big = "model.layers.1.self_attn.o_proj"
    scaled = {**tensors, big: tensors[big] * 128}
    target = Target.of(4.6)
    chosen = {}
    for label, ts in (("as is", tensors), ("scaled", scaled)):
        errors, energies = _measured(ts, importance)
        for kind in SENSITIVITIES:
            chosen[label, kind] = allocate(weights, {}, CANDS, errors, target,
                                           objective=objective(errors, energies, kind)).specs
    assert chosen["as is", "relative"] == chosen["scaled", "relative"]
    assert chosen["as is", "group"] == chosen["scaled", "group"]
    assert chosen["scaled", "proxy"][big] == CANDS[3] != chosen["as is", "proxy"][big]
    assert chosen["as is", "proxy"] != chosen["scaled", "proxy"]
