"""`qtool quantize --method awq | awq+gptq` on tiny models built from configs (tests/arch_models):

- folding alone (quantization off) leaves the model's logits equal to the source's within float32 rounding, with the
  folded tensors really changed (GQA llama, Gemma's 1 + w norms, a post-LN encoder, ...);
- every searched mapping is no worse on its outputs than no scaling; skipped mappings say why;
- outputs decompress with compressed-tensors to qtool's weights, load in transformers by its default (compressed)
  path with every weight used, and reruns are byte-identical.

A few architectures run by default; QTOOL_ARCH_MATRIX=full runs the folding check on every one the walk supports.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from qtool.checkpoint import open_checkpoint
from qtool.plan import plan_quantization
from qtool.quant.spec import QuantSpec

from .arch_models import ARCHS, ENCODERS, VOCAB, save, tiny_model
from .conftest import assert_decompresses_like_qtool, digest, run_cli

FAST = ["llama", "gemma2", "bert"]
FOLD_KINDS = [k for k in ARCHS if k != "gpt2"] if os.environ.get("QTOOL_ARCH_MATRIX") == "full" else FAST


def _model_class(kind):
    import transformers as tf
    if kind == "modernbert":
        return tf.AutoModelForMaskedLM
    return tf.AutoModel if kind in ENCODERS else tf.AutoModelForCausalLM


def _source(kind, root):
    model = tiny_model(kind)
    with torch.no_grad():  # norms away from their init, so a wrong parameterisation (w vs 1 + w) shows
        g = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name.lower():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    ids = torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(3))
    return model, save(model, root / "src"), ids


def _output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@pytest.mark.parametrize("kind", FOLD_KINDS)
def test_folding_alone_keeps_the_outputs(kind, tmp_path):
    from qtool.calib.layerwise import quantize_layerwise
    model, src, ids = _source(kind, tmp_path)
    ckpt = open_checkpoint(src)
    plans = plan_quantization(ckpt.tensors.values(), QuantSpec(bits=4, group_size=32, method="awq"), ckpt.config)
    walk = quantize_layerwise(ckpt, plans, list(ids), samples=6, seq_len=24, device="cpu", awq_grid=5, fold_only=True)
    folded = {}
    while True:
        try:
            item = next(walk)
        except StopIteration as stop:
            summary = stop.value["awq"]
            break
        folded[item.name] = item.tensor
    changed = [f["tensor"] for f in summary["folded"] if f["by"] == "1/s"]
    assert all(f["relative_change"] > 0 for f in summary["folded"])
    assert all(m["error"] <= m["error_unscaled"] for m in summary["mappings"])
    assert all(s["reason"] for s in summary["skipped"])
    state = {**{n: ckpt.get(n) for n in ckpt.tensors}, **folded}
    save_file(state, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    again = _model_class(kind).from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    want, got = _output(model, ids), _output(again, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if kind in ("llama", "gemma2"):
        assert changed, summary  # norms (and up_proj into down_proj) really folded
        if kind == "gemma2":
            assert {m["offset"] for m in summary["mappings"] if m["kind"] == "norm"} == {1.0}




@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_output_is_an_ordinary_checkpoint(method, tmp_path):
    import transformers as tf
    model, src, ids = _source("llama", tmp_path)
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    args = ["--method", method, "--group-size", "32", "--calib", tmp_path / "ids.safetensors", "--calib-samples", "6",
            "--seq-len", "24", "--awq-grid", "5", "--quiet"]
    for name in ("a", "b"):
        r = run_cli("quantize", src, "-o", tmp_path / name, "--report", tmp_path / f"{name}.json", *args)
        assert r.exit_code == 0, r.stderr
    assert digest(tmp_path / "a") == digest(tmp_path / "b")

    rep = json.loads((tmp_path / "a.json").read_text())
    awq = rep["awq"]
    assert awq["grid"] == 5 and awq["mappings"]
    assert [s["members"] for s in awq["skipped"]] == [[f"model.layers.{i}.self_attn.o_proj"] for i in range(2)]
    assert all("grouped-query" in s["reason"] for s in awq["skipped"])
    rows = {l["name"]: l for l in rep["layers"]}
    for f in awq["folded"]:
        assert f["relative_change"] > 0
        row = rows.get(f["tensor"]) or rows[f["tensor"].removesuffix(".weight") + ".weight_packed"]
        assert (row.get("folded") or row.get("awq")) == {k: v for k, v in f.items() if k != "tensor"}
    then = "gptq" if method == "awq+gptq" else "mse"
    assert {l["method"] for l in rep["layers"] if l["quantized"]} == {then}
    assert rep["quantization"]["method"] == method

    assert_decompresses_like_qtool(tmp_path / "a", torch.float32)
    loaded, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    r = run_cli("dequantize", tmp_path / "a", "-o", tmp_path / "dense", "--quiet")
    assert r.exit_code == 0, r.stderr
    dense = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    torch.testing.assert_close(_output(loaded.eval(), ids), _output(dense, ids), rtol=1e-5, atol=1e-5)


def test_awq_needs_calibration_data(tmp_path):
    _, src, _ = _source("llama", tmp_path)
    for method in ("awq", "awq+gptq"):
        r = run_cli("quantize", src, "-o", tmp_path / "q", "--method", method, "--group-size", "32")
        assert r.exit_code == 1 and f"--method {method} needs calibration data" in r.stderr
    assert not (tmp_path / "q").exists()
