"""Mixture-of-experts calibration: per-expert statistics from the routed tokens (checked against each expert run on
exactly its routed tokens), the all-tokens fallback for an expert the router starves, `--moe-calib all`, routers
kept dense, the Hub's per-expert names in the output, and what transformers cannot load."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qtool.calib.layerwise import collect_stats
from qtool.calib.moe import MoeCalib
from qtool.calib.stats import read_stats
from qtool.calib.walk import LayerWalk
from qtool.checkpoint import open_checkpoint

from .arch_models import VOCAB, reference_expert_stats, save, tiny_model
from .conftest import run_cli
from .test_arch_matrix import load_all

PREFIX = "model.layers.{}.block_sparse_moe.experts"


def starved_mixtral(folder):
    """Mixtral with top-1 routing whose router row 3 is the mean of rows 0 and 1: its logit never exceeds both,
    so expert 3 of every layer receives no token at all."""
    model = tiny_model("mixtral", num_experts_per_tok=1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[3] = (w[0] + w[1]) / 2
    save(model, folder)
    return model


def _ids(n=6, length=24, seed=3):
    return list(torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed)))


def _check(got: dict, ref: dict, names):
    for name in names:
        assert got[name]["count"] == ref[name]["count"], name
        torch.testing.assert_close(got[name]["sum_sq"], ref[name]["sum_sq"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[name]["absmax"], ref[name]["absmax"], rtol=1e-5, atol=1e-6)


def test_starved_expert_falls_back_to_all_tokens(tmp_path):
    model = starved_mixtral(tmp_path / "m")
    ckpt = open_checkpoint(tmp_path / "m")
    ids = _ids()
    got, info = collect_stats(ckpt, ids, samples=6, seq_len=24, device="cpu", moe=MoeCalib("routed", 1))
    rows = {r["module"]: r for r in info["experts"]}
    starved = {PREFIX.format(i) + ".3" for i in range(2)}
    assert {m.rsplit(".", 1)[0] for m, r in rows.items() if r["tokens"] == 0} == starved
    assert all((r["stats"] == "all") == (m.rsplit(".", 1)[0] in starved) for m, r in rows.items())
    sd = {n: ckpt.get(n) for n in ckpt.tensors if ".experts." in n}
    ref, routed = reference_expert_stats(model, "mixtral", sd, ids, all_tokens=starved)
    assert all(int(c[3]) == 0 and int(c.sum()) == 6 * 24 for c in routed.values())
    _check(got, ref, rows)  # the starved experts' statistics are those of every token, the others their own
    for s in starved:
        assert got[f"{s}.w1"]["count"] == got[f"{s}.w2"]["count"] == 6 * 24


def test_starved_expert_is_quantized_with_data_and_reported(tmp_path):
    starved_mixtral(tmp_path / "m")
    save_file({"input_ids": torch.stack(_ids())}, tmp_path / "ids.safetensors")
    r = run_cli("quantize", tmp_path / "m", "-o", tmp_path / "q", "--method", "gptq", "--group-size", "32",
                "--calib", tmp_path / "ids.safetensors", "--report", tmp_path / "r.json", "--quiet")
    assert r.exit_code == 0, r.stderr
    rows = {l["name"]: l for l in json.loads((tmp_path / "r.json").read_text())["layers"]}
    experts = {n: l for n, l in rows.items() if ".experts." in n}
    assert len(experts) == 2 * 4 * 3 and all(l["quantized"] and l["calibrated"] for l in experts.values())
    for n, l in experts.items():
        e = int(n.split(".experts.")[1].split(".")[0])
        assert l["expert"]["expert"] == e
        assert (l["expert"]["stats"] == "all") == (e == 3 or l["expert"]["tokens"] < 32), n  # default threshold 32
        assert l["output_error_after"] < l["output_error_before"], n
    assert {l["expert"]["tokens"] for n, l in experts.items() if ".experts.3." in n} == {0}
    out = load_all(tmp_path / "q")
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight_packed" in out  # the Hub's per-expert names
    assert out["model.layers.1.block_sparse_moe.gate.weight"].dtype == torch.float32  # router dense
    ignore = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["lm_head", "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"]


def test_moe_calib_all_takes_every_token_for_every_expert(tmp_path):
    model = tiny_model("qwen3_moe")
    save(model, tmp_path / "m")
    save_file({"input_ids": torch.stack(_ids())}, tmp_path / "ids.safetensors")
    r = run_cli("calibrate", tmp_path / "m", "--calib", tmp_path / "ids.safetensors", "-o", tmp_path / "s.safetensors",
                "--moe-calib", "all")
    assert r.exit_code == 0, r.stderr
    assert "8 MoE experts: 0 from their routed tokens, 8 from all tokens" in r.stdout
    got, meta = read_stats(tmp_path / "s.safetensors")
    experts = json.loads(meta["experts"])
    assert len(experts) == 24 and {e["stats"] for e in experts.values()} == {"all"}
    ckpt = open_checkpoint(tmp_path / "m")
    sd = {n: ckpt.get(n) for n in ckpt.tensors if ".experts." in n}
    everyone = {m.rsplit(".", 1)[0] for m in experts}
    ref, routed = reference_expert_stats(model, "qwen3_moe", sd, _ids(), all_tokens=everyone)
    _check(got, ref, experts)
    for m, e in experts.items():  # the report still gives each expert's routed token count
        layer, idx = int(m.split(".")[2]), int(m.split(".experts.")[1].split(".")[0])
        assert e["tokens"] == int(routed[f"model.layers.{layer}.mlp.experts"][idx])
    # quantizing with the file: each expert weight's report row says what the file says of it
    r = run_cli("quantize", tmp_path / "m", "-o", tmp_path / "q", "--method", "mse", "--group-size", "32",
                "--calib", tmp_path / "s.safetensors", "--report", tmp_path / "r.json", "--quiet")
    assert r.exit_code == 0, r.stderr
    rows = {l["name"]: l for l in json.loads((tmp_path / "r.json").read_text())["layers"]}
    assert {n[: -len(".weight")]: l["expert"] for n, l in rows.items() if "expert" in l} == experts


def test_threshold_sends_thin_experts_to_all_tokens(tmp_path):
    save(tiny_model("olmoe"), tmp_path / "m")
    ckpt = open_checkpoint(tmp_path / "m")
    ids = _ids()
    _, low = collect_stats(ckpt, ids, samples=6, seq_len=24, device="cpu", moe=MoeCalib("routed", 1))
    cut = sorted(r["tokens"] for r in low["experts"])[len(low["experts"]) // 2]
    got, high = collect_stats(ckpt, ids, samples=6, seq_len=24, device="cpu", moe=MoeCalib("routed", cut))
    for a, b in zip(low["experts"], high["experts"]):
        assert a["tokens"] == b["tokens"] and b["stats"] == ("all" if b["tokens"] < cut else "routed")
        assert got[b["module"]]["count"] == (6 * 24 if b["tokens"] < cut else b["tokens"])


def test_update_writes_an_expert_weight_into_its_slice_of_the_fused_parameter(tmp_path):
    save(tiny_model("mixtral"), tmp_path / "m")
    walk = LayerWalk(open_checkpoint(tmp_path / "m"), _ids(2, 8), torch.device("cpu"))
    blocks = walk.blocks()  # kept: a dropped generator frees its block
    block = next(blocks)
    p = PREFIX.format(0)
    new = {f"{p}.2.w1.weight": torch.randn(128, 64), f"{p}.2.w3.weight": torch.randn(128, 64),
           f"{p}.1.w2.weight": torch.randn(64, 128)}
    experts = walk.model.model.layers[0].mlp.experts
    before = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    walk.update(block, new)
    assert torch.equal(experts.gate_up_proj[2], torch.cat([new[f"{p}.2.w1.weight"], new[f"{p}.2.w3.weight"]]))
    assert torch.equal(experts.down_proj[1], new[f"{p}.1.w2.weight"])
    assert torch.equal(experts.gate_up_proj[[0, 1, 3]], before[0][[0, 1, 3]])
    assert torch.equal(experts.down_proj[[0, 2, 3]], before[1][[0, 2, 3]])


def test_routers_cannot_be_included(tmp_path):
    save(tiny_model("qwen2_moe"), tmp_path / "m")
    for glob in ("*.mlp.gate", "*shared_expert_gate"):
        r = run_cli("quantize", tmp_path / "m", "-o", tmp_path / "q", "--group-size", "32", "--include", glob)
        assert r.exit_code == 1 and "is an MoE router" in r.stderr and not (tmp_path / "q").exists()


def test_bad_moe_options(tmp_path):
    save(tiny_model("olmoe"), tmp_path / "m")
    r = run_cli("calibrate", tmp_path / "m", "--calib", "x", "-o", tmp_path / "s", "--moe-calib", "some")
    assert r.exit_code == 2 and "'some' is not one of 'routed', 'all'" in r.stderr
    r = run_cli("calibrate", tmp_path / "m", "--calib", "x", "-o", tmp_path / "s", "--moe-min-tokens", "0")
    assert r.exit_code == 2
    # the Python API refuses the same values before any work, in its own terms
    from qtool.errors import ArgumentError
    from qtool.jobs.calibrate import calibrate
    from qtool.jobs.quantize import quantize
    with pytest.raises(ArgumentError, match=r"moe_calib: 'some' is not one of 'routed', 'all'"):
        quantize(tmp_path / "m", tmp_path / "q", calib="x", moe_calib="some")
    with pytest.raises(ArgumentError, match=r"moe_min_tokens: must be an integer of at least 1, not 0"):
        calibrate(tmp_path / "m", "x", tmp_path / "s", moe_min_tokens=0)
    assert not (tmp_path / "q").exists() and not (tmp_path / "s").exists()


def test_transformers_cannot_load_asymmetric_experts(tmp_path):
    """transformers 5.24 decompresses MoE experts through a stand-in module without a zero point: an asymmetric
    MoE checkpoint (qtool's or llm-compressor's) does not load there; vLLM and qtool.load do. README lists it."""
    import transformers as tf
    from transformers.utils.quantization_config import CompressedTensorsConfig
    save(tiny_model("mixtral"), tmp_path / "m")
    r = run_cli("quantize", tmp_path / "m", "-o", tmp_path / "q", "--group-size", "32", "--asymmetric", "--method", "rtn",
                "--quiet")
    assert r.exit_code == 0, r.stderr
    with pytest.raises(RuntimeError, match="issues during automatic conversion of the weights"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=CompressedTensorsConfig(dequantize=True))
