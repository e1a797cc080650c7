"""Layer-by-layer walk: statistics equal a full forward pass; GPTQ beats RTN on output error; clear errors."""
from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from safetensors.torch import save_file

from qtool.calib.layerwise import collect_stats, layer_order, quantize_layerwise
from qtool.checkpoint import open_checkpoint
from qtool.errors import QtoolError
from qtool.plan import TensorPlan, plan_quantization
from qtool.quant.core import dequantize
from qtool.quant.spec import QuantSpec
from qtool.quant.weight import quantize_weight

from .conftest import run_cli
from .test_calib_helpers import reference_stats, samples, save_tiny

# The walk runs the same modules on the same inputs with the same arguments as the full model, one block at a
# time; only the order of float32 sums across samples could differ, so 1e-5 relative is a generous bound.
RTOL, ATOL = 1e-5, 1e-6


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "bert"])
def test_layerwise_stats_equal_full_forward(tmp_path, kind):
    model = save_tiny(kind, tmp_path)
    ids = samples()
    ckpt = open_checkpoint(tmp_path)
    got, info = collect_stats(ckpt, ids, samples=len(ids), seq_len=64, device="cpu")
    ref = reference_stats(model, ids)
    walked = {n for n in ref if ".layers." in n or ".h." in n or ".layer." in n}
    assert set(got) == walked and len(walked) == {"llama": 14, "qwen2": 14, "gpt2": 8, "bert": 12}[kind]
    assert info["tokens"] == sum(len(s) for s in ids)
    for name in walked:
        assert got[name]["count"] == ref[name]["count"] == info["tokens"]
        torch.testing.assert_close(got[name]["sum_sq"], ref[name]["sum_sq"], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(got[name]["absmax"], ref[name]["absmax"], rtol=RTOL, atol=ATOL)


def walk_all(walk) -> tuple[dict, dict]:
    """Everything quantize_layerwise yields, by name in yield order, and the summary it returns."""
    items = {}
    while True:
        try:
            item = next(walk)
        except StopIteration as stop:
            return items, stop.value
        items[item.name] = item


def _quantize(ckpt, ids, method, **kw):
    spec = QuantSpec(bits=4, symmetric=True, group_size=32, method=method)
    plans = plan_quantization(ckpt.tensors.values(), spec, ckpt.config)
    items, summary = walk_all(quantize_layerwise(ckpt, plans, ids, samples=len(ids), seq_len=64, damp=0.01,
                                                 device="cpu", **kw))
    emitted = {n: (ckpt.get(n), c.weight.codes(), c.weight.scale, c.weight.zero_point, c.extra) for n, c in items.items()
               if c.weight is not None}  # awq also yields the dense tensors it folded into
    return spec, plans, emitted, summary


def test_gptq_output_error_below_rtn_and_matches_direct_computation(tmp_path):
    model = save_tiny("llama", tmp_path)
    ids = samples(8)
    ckpt = open_checkpoint(tmp_path)
    spec, plans, emitted, summary = _quantize(ckpt, ids, "gptq")
    planned = [p.name for p in plans if p.quantize]
    assert sorted(emitted) == sorted(planned) and len(planned) == 14
    assert list(emitted) == [n for n in layer_order(ckpt) if n in emitted]  # emitted in walk order
    assert summary["calibrated"] == 14 and summary["uncalibrated"] == [] and summary["tokens"] == sum(map(len, ids))
    for name, (w, q, scale, zp, extra) in emitted.items():
        assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7 and zp is None
        assert scale.shape == (w.shape[0], w.shape[1] // 32)
        assert extra["output_error_after"] < extra["output_error_before"], name
    _assert_direct_output_errors(model, ids, spec, emitted, ".layers.0.")


def test_awq_before_error_is_rtn_on_the_unscaled_layer(tmp_path):
    model = save_tiny("llama", tmp_path)
    ids = samples(8)
    spec, _, emitted, _ = _quantize(open_checkpoint(tmp_path), ids, "awq", awq_grid=5)
    _assert_direct_output_errors(model, ids, spec, emitted, ".layers.0.", keys=("output_error_before",))


def test_awq_after_error_is_the_scaled_layer_against_the_original(tmp_path):
    # the scaled weight's stored codes read the folded model's inputs X·diag(1/s): ‖XWᵀ − X diag(1/s) Ŵ_sᵀ‖/‖XWᵀ‖,
    # recomputed from the original model's captured X (first block), as the report gives it from the search
    from qtool.quant import awq
    model = save_tiny("llama", tmp_path)
    ids = samples(8)
    spec, _, emitted, _ = _quantize(open_checkpoint(tmp_path), ids, "awq", awq_grid=5)
    ref = reference_stats(model, ids, with_inputs=True)
    scaled = [n for n, e in emitted.items() if ".layers.0." in n and e[4].get("awq", {}).get("by") == "s"]
    assert scaled
    for name in scaled:
        w, q, scale, zp, extra = emitted[name]
        x = torch.cat(ref[name[: -len(".weight")]]["x"])
        s = awq.channel_scales(x.abs().mean(0), extra["awq"]["alpha"])
        w_hat = dequantize(q, scale, zp, spec, dtype=torch.float32)
        want = x @ w.float().T
        direct = float((want - (x / s) @ w_hat.T).norm() / want.norm())
        assert direct == pytest.approx(extra["output_error_after"], rel=1e-3), name


def _assert_direct_output_errors(model, ids, spec, emitted, first_block: str,
                                 keys=("output_error_after", "output_error_before")):
    """The first block's inputs are those of the original model: ‖XWᵀ − XŴᵀ‖/‖XWᵀ‖ recomputed from the captured X,
    for the method (after) and for rtn (before)."""
    ref = reference_stats(model, ids, with_inputs=True)
    names = [n for n in emitted if first_block in n]
    assert names
    for name in names:
        w, q, scale, zp, extra = emitted[name]
        x = torch.cat(ref[name[: -len(".weight")]]["x"])
        w_hat = dequantize(q, scale, zp, spec, dtype=torch.float32)
        rtn = quantize_weight(w, spec.with_method("rtn")).dequantize(torch.float32)
        for w_x, key in ((w_hat, "output_error_after"), (rtn, "output_error_before")):
            if key not in keys:
                continue
            direct = float((x @ (w.float() - w_x).T).norm() / (x @ w.float().T).norm())
            assert direct == pytest.approx(extra[key], rel=1e-3), (name, key)


def test_mse_with_importance_beats_rtn_on_output_error(tmp_path):
    model = save_tiny("bert", tmp_path)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # biases far from zero: the outputs' energy (the errors' denominator) must leave them out
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    model.save_pretrained(tmp_path)
    ckpt = open_checkpoint(tmp_path)
    ids = samples(8)
    spec, _, emitted, summary = _quantize(ckpt, ids, "mse")
    _assert_direct_output_errors(model, ids, spec, emitted, ".layer.0.")
    # the pooler sits outside the encoder blocks: quantized without statistics, and said so
    assert summary["uncalibrated"] == ["pooler.dense.weight"]
    pooler = emitted.pop("pooler.dense.weight")[4]
    assert not pooler["calibrated"] and pooler["output_error_after"] is None and "outside" in pooler["note"]
    before = sum(e[4]["output_error_before"] for e in emitted.values())
    after = sum(e[4]["output_error_after"] for e in emitted.values())
    assert len(emitted) == 12 and after < before and all(e[4]["weighted"] for e in emitted.values())


def test_a_block_with_nothing_to_calibrate_still_passes_its_outputs_on(tmp_path):
    """--exclude a whole block: the walk still runs it, so block 1 is calibrated on what block 0 gives it (the
    original model's block-1 inputs: the same importance as `calibrate` measures)."""
    save_tiny("llama", tmp_path)
    ckpt = open_checkpoint(tmp_path)
    ids = samples(4)
    spec = QuantSpec(bits=4, symmetric=True, group_size=32, method="mse")
    plans = plan_quantization(ckpt.tensors.values(), spec, ckpt.config, exclude=["model.layers.0.*"])
    items, summary = walk_all(quantize_layerwise(ckpt, plans, ids, samples=len(ids), seq_len=64, device="cpu"))
    stats, _ = collect_stats(ckpt, ids, samples=len(ids), seq_len=64, device="cpu")
    assert len(items) == 7 and all(".layers.1." in n for n in items) and summary["calibrated"] == 7
    for name, item in items.items():
        st = stats[name[: -len(".weight")]]
        ref = quantize_weight(ckpt.get(name), spec, importance=st["sum_sq"] / st["count"])
        assert torch.equal(item.weight.codes(), ref.codes()) and torch.equal(item.weight.scale, ref.scale), name


def test_gpt2_conv1d_not_quantized_by_default(tmp_path):
    save_tiny("gpt2", tmp_path)
    ckpt = open_checkpoint(tmp_path)
    with pytest.raises(QtoolError, match="Conv1D weights are not quantized by default"):
        _quantize(ckpt, samples(), "gptq")


def _retype(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    ({"model_type": "t5"}, r"cannot walk a 't5' model block by block: it has 2 stacks of blocks "
                           r"\(encoder.block, decoder.block\)"),
    ({"model_type": "my_llama", "auto_map": {"AutoModelForCausalLM": "modeling.MyLlama"}},
     r"cannot walk a 'my_llama' model block by block: transformers .* has no such architecture \(remote code"),
    ({"model_type": None}, r"has no model_type"),
])
def test_unsupported_architecture_is_one_clear_error_and_data_free_still_works(tmp_path, changes, message):
    save_tiny("llama", tmp_path / "m")
    _retype(tmp_path / "m", **changes)
    with pytest.raises(QtoolError, match=message):
        collect_stats(open_checkpoint(tmp_path / "m"), samples(), device="cpu")
    save_file({"input_ids": torch.stack([s[:5] for s in samples()])}, tmp_path / "ids.safetensors")
    q = ["quantize", tmp_path / "m", "-o", tmp_path / "q", "--group-size", "32"]
    r = run_cli(*q, "--method", "gptq", "--calib", tmp_path / "ids.safetensors")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "q").exists()
    assert run_cli(*q, "--method", "rtn", "--quiet").exit_code == 0 and (tmp_path / "q" / "config.json").exists()


def test_missing_transformers_names_the_extra(tmp_path, monkeypatch):
    save_tiny("llama", tmp_path)
    ckpt = open_checkpoint(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers → ImportError
    with pytest.raises(QtoolError, match=r"pip install 'qtool\[calib\]'"):
        collect_stats(ckpt, samples(), device="cpu")


def test_layer_order_groups_blocks(tmp_path):
    save_tiny("llama", tmp_path)
    order = layer_order(open_checkpoint(tmp_path))
    blocks = [n.split(".")[2] for n in order if n.startswith("model.layers.")]
    assert blocks == sorted(blocks, key=int) and order[-1].startswith(("model.norm", "model.embed", "lm_head"))


def test_gpt2_included_conv1d_quantized_uncalibrated_in_walk_order(tmp_path):
    save_tiny("gpt2", tmp_path)
    ckpt = open_checkpoint(tmp_path)
    spec = QuantSpec(bits=4, symmetric=True, group_size=32, method="gptq")
    with pytest.raises(QtoolError, match="a GPT-2 Conv1D weight, not an nn.Linear one"):  # the planner refuses it
        plan_quantization(ckpt.tensors.values(), spec, ckpt.config, include=["*.mlp.c_fc"])
    # the walk still handles a Conv1D weight that a plan made by hand quantizes
    plans = [TensorPlan(t, t.name.endswith("mlp.c_fc.weight"), "by hand", False,
                        spec if t.name.endswith("mlp.c_fc.weight") else None) for t in ckpt.tensors.values()]
    items, summary = walk_all(quantize_layerwise(ckpt, plans, samples(), samples=6, seq_len=64, damp=0.01, device="cpu"))
    got = [(n, c.extra) for n, c in items.items()]
    assert [n for n, _ in got] == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"]
    assert summary["uncalibrated"] == [n for n, _ in got] and summary["calibrated"] == 0
    assert all(not e["calibrated"] and "Conv1D" in e["note"] and e["method"] == "mse" for _, e in got)


@pytest.mark.parametrize("kind, expected", [
    ("llama", [("input_layernorm", ["q_proj", "k_proj", "v_proj"]), (None, ["o_proj"]),
               ("post_attention_layernorm", ["gate_proj", "up_proj"]), (None, ["down_proj"])]),
    ("phi3", [("input_layernorm", ["qkv_proj"]), (None, ["o_proj"]), ("post_attention_layernorm", ["gate_up_proj"]),
              (None, ["down_proj"])]),
])
def test_linears_reading_one_tensor_share_statistics_and_name_what_fed_them(tmp_path, kind, expected):
    """What activation-aware scaling folds into: per block, the linears that read the same tensor (their
    statistics computed once) and the module that produced it (a norm), or None (attention output, gate·up)."""
    from qtool.calib.walk import LayerWalk
    from .arch_models import save as save_model, tiny_model as tiny
    save_model(tiny(kind), tmp_path)
    walk = LayerWalk(open_checkpoint(tmp_path), samples(3), torch.device("cpu"))
    blocks = walk.blocks()
    block = next(blocks)
    got = walk.collect(block, sorted(walk.targets(block)), hessian=True)
    short = [(g.feeder, [m.rsplit(".", 2)[-2] for m in g.members]) for g in got.groups]
    assert short == expected
    for g in got.groups:
        assert all(got.stats[m] is got.stats[g.members[0]] for m in g.members)
    assert got.stats[got.groups[0].members[0]].hessian.shape == (64, 64)


def test_walk_takes_new_batches_on_the_same_skeleton(tmp_path):
    """eval walks batch after batch of windows: capture() swaps in new samples ([B, L] batches too)."""
    from qtool.calib.walk import LayerWalk
    model = save_tiny("llama", tmp_path)
    walk = LayerWalk(open_checkpoint(tmp_path), samples(2), torch.device("cpu"))
    skeleton = walk.model
    batch = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(5))
    walk.capture([batch])
    assert walk.model is skeleton and walk.tokens == 30
    for block in walk.blocks():
        walk.run(block, keep=True)
    with walk.tail() as tail:
        got = tail.logits(0, walk.inputs[0].hidden)
        head_input = tail.head_input(0, walk.inputs[0].hidden)
    with torch.no_grad():
        out = model(input_ids=batch, output_hidden_states=True)
    assert torch.equal(got, out.logits) and torch.equal(head_input, out.hidden_states[-1])
