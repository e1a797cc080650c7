"""The architecture matrix: for tiny random models of each architecture, built from a config with transformers,

- `qtool calibrate` statistics equal a full-model forward with hooks (exact, float32), and for MoE experts a
  reference that runs each expert on exactly its routed tokens from the checkpoint's 2-D weights;
- `qtool quantize --method gptq --calib` gives every calibrated layer an output error below rtn's;
- compressed-tensors decompresses the output to qtool's weights;
- transformers loads it with `dequantize=True` giving the logits of qtool's dequantized model, and through its
  default (compressed) path the same, or the consumer's own error where it cannot (CONSUMER_LIMITS, in README);
- the walk's tail (final norm and head, replayed through the model's own forward) gives the model's logits.

A representative subset runs by default; QTOOL_ARCH_MATRIX=full runs every architecture.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtool.calib.stats import read_stats
from qtool.checkpoint import open_checkpoint
from qtool.formats.dense import DenseView

from .arch_models import ARCHS, ENCODERS, MOE_ARCHS, VOCAB, reference_expert_stats, reference_linear_stats, save, tiny_model
from .conftest import run_cli

# Decoders with sliding-window and global layers (gemma2), a head transformers renames (gpt_neox),
# an encoder (bert), MoE with a renamed block and fused experts (mixtral), and Qwen-style MoE names with shared
# experts after a dense first layer (deepseek_v3).
FAST = ["llama", "gemma2", "gpt_neox", "bert", "mixtral", "deepseek_v3"]
KINDS = [k for k in ARCHS if k != "gpt2"] if os.environ.get("QTOOL_ARCH_MATRIX") == "full" else FAST
# transformers' default (compressed) load path, where it fails on a qtool output: its own error, also in README.
CONSUMER_LIMITS = {
    "modernbert": "'Linear' object has no attribute 'weight'",  # ModernBertPreTrainedModel._init_weights reads Wqkv.weight
}
GROUP = "32"


def _model_class(kind):
    import transformers as tf
    if kind == "modernbert":
        return tf.AutoModelForMaskedLM
    return tf.AutoModel if kind in ENCODERS else tf.AutoModelForCausalLM


class Bundle:
    """One architecture's tiny model, its checkpoint, calibration ids, and the outputs of the qtool commands."""

    def __init__(self, kind, root):
        self.kind, self.root = kind, root
        self.model = tiny_model(kind)
        self.src = save(self.model, root / "src")
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(3, VOCAB, (6, 24), generator=g)
        save_file({"input_ids": self.ids}, root / "ids.safetensors")
        calib = ["--calib", root / "ids.safetensors", "--calib-samples", "6", "--seq-len", "24", "--moe-min-tokens", "1"]
        r = run_cli("calibrate", self.src, "-o", root / "stats.safetensors", *calib, "--quiet")
        assert r.exit_code == 0, r.stderr
        r = run_cli("quantize", self.src, "-o", root / "gptq", "--method", "gptq", "--group-size", GROUP,
                    "--report", root / "gptq.json", *calib, "--quiet")
        assert r.exit_code == 0, r.stderr
        self.report = json.loads((root / "gptq.json").read_text())


@pytest.fixture(scope="module", params=KINDS)
def bundle(request, tmp_path_factory):
    return Bundle(request.param, tmp_path_factory.mktemp(request.param))


def test_calibrate_equals_full_forward(bundle):
    stats, meta = read_stats(bundle.root / "stats.safetensors")
    ids = list(bundle.ids)
    ref = reference_linear_stats(bundle.model, ids)
    layout = open_checkpoint(bundle.src)
    blocks = {n for n in ref if ".layers." in n or ".layer." in n}
    assert blocks and blocks <= set(stats), sorted(blocks - set(stats))[:3]
    for name in blocks:  # dense linears: model names equal checkpoint names in every architecture here
        assert stats[name]["count"] == ref[name]["count"] == ids[0].numel() * len(ids), name
        assert torch.equal(stats[name]["sum_sq"], ref[name]["sum_sq"]), name
        assert torch.equal(stats[name]["absmax"], ref[name]["absmax"]), name
    if bundle.kind in MOE_ARCHS:
        experts = json.loads(meta["experts"])
        assert experts and all(e["stats"] == "routed" for e in experts.values())  # --moe-min-tokens 1
        sd = {n: layout.get(n) for n in layout.tensors if ".experts." in n}
        exp_ref, routed = reference_expert_stats(bundle.model, bundle.kind, sd, ids)
        assert set(exp_ref) == {m for m, e in experts.items() if e["tokens"] > 0}
        for name, r in exp_ref.items():
            assert stats[name]["count"] == r["count"] == experts[name]["tokens"], name
            torch.testing.assert_close(stats[name]["sum_sq"], r["sum_sq"], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(stats[name]["absmax"], r["absmax"], rtol=1e-5, atol=1e-6)
        total = sum(int(c.sum()) for c in routed.values())
        assert total == sum(e["tokens"] for m, e in experts.items() if m.endswith(("w1", "gate_proj")))


def test_gptq_output_error_below_rtn(bundle):
    rows = [r for r in bundle.report["layers"] if r["quantized"]]
    calibrated = [r for r in rows if r.get("calibrated")]
    assert calibrated and {r["name"] for r in rows} - {r["name"] for r in calibrated} <= {
        r["name"] for r in rows if ".layers." not in r["name"] and ".layer." not in r["name"]}
    for r in calibrated:
        assert r["reason"].endswith("gptq")
        assert 0 < r["output_error_after"] < r["output_error_before"], r["name"]
    if bundle.kind in MOE_ARCHS:
        experts = [r for r in calibrated if "expert" in r]
        assert experts and all(r["expert"]["stats"] == "routed" and r["expert"]["tokens"] >= 1 for r in experts)
        ignore = json.loads((bundle.root / "gptq" / "config.json").read_text())["quantization_config"]["ignore"]
        routers = [n for n in ignore if n.endswith(("gate", "router"))]
        assert routers and all(f"{n}.weight" in load_all(bundle.root / "gptq") for n in routers)


def load_all(folder):
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def test_compressed_tensors_decompresses_to_qtool_weights(bundle):
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    out = bundle.root / "gptq"
    theirs = CompressedTensorsDequantizer(out, dtype=torch.float32).process(load_all(out))
    view = DenseView(open_checkpoint(out))
    packed = [n for n in view.names if view.is_packed(n)]
    assert packed and set(view.names) == set(theirs)
    for name in view.names:
        assert torch.equal(theirs[name], view.get(name)), name


def _logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_transformers_loads_with_logits_of_qtool_dequantized(bundle):
    from transformers.utils.quantization_config import CompressedTensorsConfig
    out, dense = bundle.root / "gptq", bundle.root / "dense"
    assert run_cli("dequantize", out, "-o", dense, "--quiet").exit_code == 0
    cls = _model_class(bundle.kind)
    ids = bundle.ids[:2, :16]
    expected = _logits(cls.from_pretrained(dense).eval(), ids)
    got = _logits(cls.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval(), ids)
    assert torch.equal(got, expected)
    if bundle.kind in CONSUMER_LIMITS:
        with pytest.raises(Exception, match=CONSUMER_LIMITS[bundle.kind]):
            cls.from_pretrained(out)
    else:
        assert torch.equal(_logits(cls.from_pretrained(out).eval(), ids), expected)


def test_walk_tail_gives_the_model_logits(bundle):
    from qtool.calib.walk import LayerWalk
    ids = list(bundle.ids[:3, :12])
    walk = LayerWalk(open_checkpoint(bundle.src), ids, torch.device("cpu"))
    for block in walk.blocks():
        walk.run(block, keep=True)
    with walk.tail() as tail:
        for i, s in enumerate(ids):
            expected = _logits(bundle.model, s.unsqueeze(0))
            assert torch.equal(tail.logits(i, walk.inputs[i].hidden), expected)
            if tail.head is not None and bundle.kind not in ("gemma2", "granite"):  # they post-process logits
                assert torch.equal(tail.head(tail.head_input(i, walk.inputs[i].hidden)), expected)
        assert walk.arch.causal == (bundle.kind not in ENCODERS)


def test_walk_of_the_quantized_output_gives_transformers_dequantized_logits(bundle):
    """What `qtool eval` needs: the walk runs a quantized checkpoint (through its dense view) to the logits
    transformers computes for it."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from qtool.calib.walk import LayerWalk
    out = bundle.root / "gptq"
    ids = list(bundle.ids[:2, :12])
    model = _model_class(bundle.kind).from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    walk = LayerWalk(DenseView(open_checkpoint(out)), ids, torch.device("cpu"))
    for block in walk.blocks():
        walk.run(block, keep=True)
    with walk.tail() as tail:
        for i, s in enumerate(ids):
            assert torch.equal(tail.logits(i, walk.inputs[i].hidden), _logits(model.eval(), s.unsqueeze(0)))
