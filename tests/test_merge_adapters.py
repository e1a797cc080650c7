"""Several adapters (W + Σ wᵢ·sᵢ·Bᵢ@Aᵢ, checked in float64) and the refusals of merge-lora (no output left)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from .lora_helpers import make_adapter, read_folder, rewrite_adapter, save_base
from qtool.errors import QtoolError
from qtool.jobs.merge import merge_lora
from qtool.lora.config import pattern_key


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    base = save_base("llama", root / "base")
    a1 = make_adapter("llama", base, root / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3})
    a2 = make_adapter("llama", base, root / "a2", seed=2, r=8, lora_alpha=4, use_rslora=True,
                      target_modules=["q_proj", "down_proj"])
    dora = make_adapter("llama", base, root / "dora", seed=3, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    return root, base, a1, a2, dora


def expected(base_sd, adapters, weights):
    """The formula in float64, from the adapter files and their configs."""
    out = {k: v.double() for k, v in base_sd.items()}
    for folder, w in zip(adapters, weights):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        sd = read_folder(folder)
        for key, A in sd.items():
            if not key.endswith("lora_A.weight"):
                continue
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            B = sd[key.replace("lora_A", "lora_B")]
            rk = pattern_key(cfg["rank_pattern"], module)
            ak = pattern_key(cfg["alpha_pattern"], module)
            r = cfg["rank_pattern"][rk] if rk else cfg["r"]
            alpha = cfg["alpha_pattern"][ak] if ak else cfg["lora_alpha"]
            assert A.shape[0] == r
            s = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
            out[module + ".weight"] += w * s * (B.double() @ A.double())
    return out


def test_two_adapters_weighted(setup, tmp_path):
    _, base, a1, a2, _ = setup
    weights = [0.7, -0.3]
    report = merge_lora(str(base), [str(a1), str(a2)], str(tmp_path / "out"), weights=weights)
    got = read_folder(tmp_path / "out")
    want = expected(read_folder(base), [a1, a2], weights)
    for name, t in got.items():
        # float32 accumulation of a handful of rank-≤8 products: a few ulps of the largest term
        torch.testing.assert_close(t.double(), want[name], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert report["lora"]["weights"] == weights
    assert len(report["lora"]["adapters"]) == 2
    assert "model.layers.0.self_attn.q_proj.weight" in report["lora"]["merged_tensors"]
    row = next(r for r in report["layers"] if r["name"] == "model.layers.0.self_attn.q_proj.weight")
    assert "2 adapters" in row["reason"]


def test_weight_one_equals_single_merge(setup, tmp_path):
    _, base, a1, _, _ = setup
    merge_lora(str(base), [str(a1)], str(tmp_path / "o1"))
    merge_lora(str(base), [str(a1)], str(tmp_path / "o2"), weights=[1.0])
    a, b = read_folder(tmp_path / "o1"), read_folder(tmp_path / "o2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _refused(base, adapters, out, match, **kw):
    with pytest.raises(QtoolError, match=match):
        merge_lora(str(base), [str(a) for a in adapters], str(out), **kw)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder left behind


def test_no_prefix_adapter_is_an_error(setup, tmp_path):
    _, base, a1, _, _ = setup
    bad = rewrite_adapter(a1, tmp_path / "bad", rename=lambda k: k.removeprefix("base_model.model."))
    n = len(read_folder(a1))
    _refused(base, [bad], tmp_path / "out", rf"{n} of {n} adapter tensors match no base tensor \(first: model\.layers"
                                            r".*base_model\.model\.")


def test_bare_backbone_adapter_is_an_error(setup, tmp_path):
    _, base, a1, _, _ = setup
    bad = rewrite_adapter(a1, tmp_path / "bad", rename=lambda k: k.replace("base_model.model.model.", "base_model.model."))
    _refused(base, [bad], tmp_path / "out", r"match no base tensor .*base names start with 'model\.'")


def test_refusals(setup, tmp_path):
    root, base, a1, a2, dora = setup
    cases = [
        (dict(config={"peft_type": "IA3"}), "peft_type IA3"),
        (dict(config={"use_bdlora": {"target_modules_bd_a": ["q_proj"]}}), "use_bdlora is set"),
        (dict(config={"layer_replication": [[0, 1], [0, 2]]}), "layer_replication is set"),
        (dict(config={"target_parameters": ["mlp.experts.down_proj"]}), "target_parameters is set"),
        (dict(config={"init_lora_weights": "pissa"}), "rewrote the base weights"),
        (dict(config={"target_modules": ["k_proj"]}), "not selected by the adapter's target rules"),
        (dict(config={"r": 5, "rank_pattern": {}}), "lora rank is 4 but the config"),
        (dict(config={"use_dora": True}), "use_dora is set but"),
    ]
    for i, (kw, match) in enumerate(cases):
        bad = rewrite_adapter(a1, root / f"bad{i}", **kw)
        _refused(base, [bad], tmp_path / f"out{i}", match)


def test_nonfinite_and_shape_mismatch(setup, tmp_path):
    root, base, a1, _, _ = setup
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    B = read_folder(a1)[key].clone()
    B[0, 0] = float("nan")
    _refused(base, [rewrite_adapter(a1, root / "nan", tensors={key: B})], tmp_path / "o1", "NaN or Inf")
    A_key = key.replace("lora_B", "lora_A")
    wide = torch.randn(4, 48)
    _refused(base, [rewrite_adapter(a1, root / "wide", tensors={A_key: wide})], tmp_path / "o2",
             r"weight of shape \[32, 48\], but the base weight is \[32, 32\]")


def test_dora_combines_only_alone(setup, tmp_path):
    _, base, a1, _, dora = setup
    _refused(base, [a1, dora], tmp_path / "o1", "DoRA adapter merges only alone")
    _refused(base, [dora], tmp_path / "o2", "DoRA merge has no weighted form", weights=[0.5])


def test_weight_count_and_existing_output(setup, tmp_path):
    _, base, a1, a2, _ = setup
    _refused(base, [a1, a2], tmp_path / "o1", "2 adapters", weights=[1.0])
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(QtoolError, match="already exists"):
        merge_lora(str(base), [str(a1)], str(out))


def test_reports_give_the_scaling_each_module_merged_with(setup, tmp_path):
    """merge-lora reports lora.scaling (they lacked it), and with rank/alpha patterns it is the per-module scaling
    PEFT uses (the report's own copy of the formula ignored the patterns); inspect of the adapter says the same."""
    from qtool.jobs.inspect import inspect
    from .conftest import run_cli
    _, base, a1, a2, _ = setup
    report = merge_lora(str(base), [str(a1), str(a2)], str(tmp_path / "out"), weights=[1.0, 1.0])
    # a1: r=4 alpha=8, v_proj pattern r=2 alpha=3; a2: rsLoRA r=8 alpha=4, no pattern
    want_a1 = {f"model.layers.{i}.self_attn.{p}": (3 / 2 if p == "v_proj" else 8 / 4) for i in (0, 1)
               for p in ("q_proj", "v_proj")}
    assert report["lora"]["scaling"] == [want_a1, 4 / math.sqrt(8)]
    assert [a["scaling"] for a in report["lora"]["adapters"]] == [want_a1, 4 / math.sqrt(8)]
    assert inspect(str(a1))["lora"]["scaling"] == want_a1
    assert inspect(str(a2))["lora"]["scaling"] == 4 / math.sqrt(8)
    single = merge_lora(str(base), [str(a2)], str(tmp_path / "one"))
    assert single["lora"]["scaling"] == 4 / math.sqrt(8)
    r = run_cli("merge-lora", base, a1, "-o", tmp_path / "cli")
    assert r.exit_code == 0 and "scaling 1.5–2 by module" in r.stdout and "scaling -" not in r.stdout
