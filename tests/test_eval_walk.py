"""`qtool eval` on the layer walk's architectures: mixture-of-experts models equal the full transformers forward of
both models, dense and quantized; logit post-processing equals the models' own forward; encoders are refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from qtool.checkpoint import open_checkpoint
from qtool.jobs.evaluate import evaluate
from qtool.jobs.quantize import quantize
from qtool.quant.spec import QuantSpec

from .arch_models import VOCAB, save, tiny_model
from .conftest import run_cli
from .eval_helpers import assert_matches, direct, perturbed


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory):
    """(reference, perturbed copy, token-id windows file, the windows) of a tiny MoE causal LM (fixed seed)."""
    base = tmp_path_factory.mktemp(request.param)
    ref = save(tiny_model(request.param), base / "ref")
    ids = torch.randint(3, VOCAB, (6, 24), generator=torch.Generator().manual_seed(3))
    save_file({"input_ids": ids}, str(base / "ids.safetensors"))
    return ref, perturbed(ref, base / "noisy"), base / "ids.safetensors", list(ids)


def test_moe_equals_full_forward(moe):
    ref, noisy, data, windows = moe
    report = evaluate(noisy, data, ref=ref, seq_len=24, batch_size=4, device="cpu")   # batches of 4 and 2 windows
    assert report["kld"]["mean"] > 1e-4 and report["top1_agreement"] < 1            # the routers moved too
    assert_matches(report, direct(noisy, windows, ref))
    itself = evaluate(ref, data, ref=ref, seq_len=24, device="cpu")
    assert itself["kld"]["max"] == 0.0 and itself["top1_agreement"] == 1.0 and itself["ppl_ratio"] == 1.0


def test_quantized_moe_equals_transformers_dequantize_load(moe, tmp_path):
    ref, _, data, windows = moe
    out = tmp_path / "int8"
    quantize(ref, out, QuantSpec(bits=8), device="cpu")
    names = open_checkpoint(out).tensors
    assert any(".experts." in n and n.endswith(".weight_packed") for n in names)   # the experts are packed
    report = evaluate(out, data, ref=ref, seq_len=24, device="cpu")
    assert report["kld"]["mean"] > 0
    assert_matches(report, direct(out, windows, ref, quantized=True))


@pytest.mark.parametrize("kind, extra", [("gemma2", {"final_logit_softcapping": 0.5}), ("granite", {})])
def test_logit_post_processing_equals_the_model_forward(tmp_path, kind, extra):
    """Gemma-2's soft-capping (a small cap, so it changes every distribution) and Granite's logits_scaling (4.0) are
    applied to the float32 tiles as the models' own forward applies them."""
    ref = save(tiny_model(kind, **extra), tmp_path / "ref")
    noisy = perturbed(ref, tmp_path / "noisy")
    ids = torch.randint(3, VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    report = evaluate(noisy, tmp_path / "ids.safetensors", ref=ref, seq_len=16, device="cpu")
    assert_matches(report, direct(noisy, list(ids), ref, own=True))


def test_an_encoder_is_refused_in_one_line(tmp_path):
    model = save(tiny_model("bert"), tmp_path / "bert")
    save_file({"input_ids": torch.tensor([[5, 6, 7, 8]])}, str(tmp_path / "ids.safetensors"))
    r = run_cli("eval", str(model), "--data", str(tmp_path / "ids.safetensors"))
    assert r.exit_code == 1 and "a bert model is not a causal LM" in r.stderr and r.stderr.count("\n") == 1
