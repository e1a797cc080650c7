"""Mixed precision's planning: the SPEC grammar, `--scheme` rules (first match wins, unset parts from the global
options), fused groups (q/k/v, gate/up, an MoE layer's experts) and the rules that would split them."""
import pytest

from qtool import arch
from qtool.errors import QtoolError
from qtool.plan import parse_rules, plan_quantization, spec_defaults
from qtool.quant.spec import QuantSpec, parse_spec, spec_text

from .conftest import llama_config, llama_state


@pytest.mark.parametrize("text, kw, want", [
    ("int4", {}, QuantSpec(4, True, 128)),
    ("int8", {}, QuantSpec(8, True, -1)),
    ("int4:g64:asym", {}, QuantSpec(4, False, 64)),
    ("INT8:channel", {}, QuantSpec(8, True, -1)),
    ("int8:asym:g32", {}, QuantSpec(8, False, 32)),
    ("int4:tensor", {}, QuantSpec(4, True, 0)),
    ("int4", {"symmetric": False, "group_size": 32, "method": "rtn"}, QuantSpec(4, False, 32, "rtn")),
    ("int4:sym", {"symmetric": False}, QuantSpec(4, True, 128)),
    ("int8", {"group_size": 64}, QuantSpec(8, True, 64)),
    ("dense", {}, None),
])
def test_spec_grammar(text, kw, want):
    assert parse_spec(text, **kw) == want


@pytest.mark.parametrize("text", ["int3", "int4:g16", "int4:g64:g32", "int4:sym:asym", "fp8", "int4:", "", "dense:g32"])
def test_spec_grammar_refuses(text):
    with pytest.raises(ValueError, match="is not a SPEC"):
        parse_spec(text)


def test_spec_text_round_trips():
    for spec in (QuantSpec(4, True, 128), QuantSpec(8, False, -1), QuantSpec(4, False, 0), None):
        assert parse_spec(spec_text(spec)) == spec
    assert spec_text(QuantSpec(8, True, -1)) == "int8:channel" and spec_text(QuantSpec(4, False, 64)) == "int4:g64:asym"


def test_unset_group_size_follows_the_global_option_only_when_it_was_set():
    assert spec_defaults(QuantSpec(4, True, 128))["group_size"] is None  # the int4 default: int8 gets channel
    assert spec_defaults(QuantSpec(4, True, 64))["group_size"] == 64


class _Info:
    def __init__(self, name, t):
        self.name, self.shape, self.dtype = name, tuple(t.shape), t.dtype


def _plan(rules, spec=QuantSpec(4, True, 128, "mse"), **kw):
    """Plans of the tiny Llama's tensors (spec None: unmatched modules are left to an allocation)."""
    tensors = [_Info(n, t) for n, t in llama_state().items()]
    rules = parse_rules(rules, spec or QuantSpec())
    return {p.name: p for p in plan_quantization(tensors, spec, llama_config(), rules=rules, **kw)}


def test_first_matching_rule_wins_and_unmatched_get_the_global_scheme():
    plans = _plan(["model.layers.0.*=int8", "*.down_proj=int4:g32", "*=int4:g64"])
    assert plans["model.layers.0.mlp.down_proj.weight"].spec == QuantSpec(8, True, -1, "mse")
    assert plans["model.layers.1.mlp.down_proj.weight"].spec == QuantSpec(4, True, 32, "mse")
    assert plans["model.layers.1.self_attn.q_proj.weight"].spec == QuantSpec(4, True, 64, "mse")
    assert not plans["lm_head.weight"].quantize  # rules do not make candidates


def test_dense_rule_keeps_a_module_dense_and_names_the_rule():
    plans = _plan(["*.o_proj=dense"])
    p = plans["model.layers.1.self_attn.o_proj.weight"]
    assert not p.quantize and p.linear and p.reason == "kept dense by --scheme '*.o_proj=dense'"
    assert plans["model.layers.1.mlp.up_proj.weight"].spec == QuantSpec(4, True, 128, "mse")


@pytest.mark.parametrize("rule, group", [
    ("*.q_proj=int8", "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"),
    ("*.k_proj=dense", "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"),
    ("*.up_proj=int4:g64", "model.layers.0.mlp.{gate_proj,up_proj}"),
])
def test_a_rule_splitting_a_fused_group_is_refused(rule, group):
    with pytest.raises(QtoolError) as e:
        _plan([rule])
    assert e.value.path == f"--scheme {rule!r}"
    assert group in e.value.problem and "splits the fused group" in e.value.problem


def test_rules_that_agree_on_a_group_are_fine():
    plans = _plan(["*.q_proj=int8", "*.k_proj=int8:channel", "*.v_proj=int8", "*.gate_proj=int4:g128"])
    assert plans["model.layers.0.self_attn.k_proj.weight"].spec.bits == 8
    # gate_proj pinned to the global scheme itself: up_proj (global) agrees
    assert plans["model.layers.0.mlp.up_proj.weight"].spec == plans["model.layers.0.mlp.gate_proj.weight"].spec


def test_with_allocation_a_group_is_pinned_whole_or_not_at_all():
    with pytest.raises(QtoolError, match="splits the fused group"):
        _plan(["*.gate_proj=int4:g128"], spec=None)
    plans = _plan(["*.gate_proj=int8", "*.up_proj=int8"], spec=None)
    assert plans["model.layers.0.mlp.up_proj.weight"].spec.bits == 8
    left = plans["model.layers.0.self_attn.q_proj.weight"]
    assert left.quantize and left.spec is None


def test_a_rule_matching_nothing_is_refused():
    with pytest.raises(QtoolError, match="matches no tensor that is quantized"):
        _plan(["*.c_attn=int8"])
    with pytest.raises(QtoolError, match="not GLOB=SPEC"):
        parse_rules(["int8"], QuantSpec())
    with pytest.raises(QtoolError, match="is not a SPEC"):
        parse_rules(["*=int5"], QuantSpec())


def test_fused_groups():
    mods = ["m.layers.0.self_attn.q_proj", "m.layers.0.self_attn.k_proj", "m.layers.0.self_attn.v_proj",
            "m.layers.0.self_attn.o_proj", "m.layers.0.mlp.gate_proj", "m.layers.0.mlp.up_proj",
            "m.layers.0.mlp.down_proj", "m.layers.1.block_sparse_moe.experts.0.w1",
            "m.layers.1.block_sparse_moe.experts.0.w2", "m.layers.1.block_sparse_moe.experts.10.w3",
            "m.layers.1.mlp.shared_expert.gate_proj", "m.layers.1.mlp.shared_expert.up_proj",
            "e.layer.0.attention.self.query", "e.layer.0.attention.self.key", "e.layer.0.attention.self.value",
            "m.layers.2.self_attn.q_a_proj", "m.layers.2.self_attn.kv_a_proj_with_mqa", "m.layers.2.self_attn.q_b_proj"]
    groups = {g.name: g.members for g in arch.fused_groups(mods)}
    assert groups["m.layers.0.self_attn.{q_proj,k_proj,v_proj}"] == tuple(mods[:3])
    assert groups["m.layers.0.mlp.{gate_proj,up_proj}"] == tuple(mods[4:6])
    assert groups["m.layers.1.block_sparse_moe.experts.*"] == tuple(sorted(mods[7:10]))
    assert groups["m.layers.1.mlp.shared_expert.{gate_proj,up_proj}"] == tuple(mods[10:12])
    assert groups["e.layer.0.attention.self.{query,key,value}"] == tuple(mods[12:15])
    assert groups["m.layers.2.self_attn.{q_a_proj,kv_a_proj_with_mqa}"] == tuple(mods[15:17])
    assert groups["m.layers.0.self_attn.o_proj"] == (mods[3],)
    assert sorted(m for ms in groups.values() for m in ms) == sorted(mods)
    assert list(groups) == sorted(groups)
