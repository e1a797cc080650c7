"""`qtool eval` equals a direct full-model computation with transformers; a model against itself is exact."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from qtool.jobs.evaluate import evaluate

from .conftest import SAMPLES, run_cli
from .eval_helpers import assert_matches, causal_lm, compressed_by_compressed_tensors, direct, perturbed, windows_of

EVAL_TXT = SAMPLES / "eval.txt"
SEQ = 64  # the tiny models' 128 positions hold it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{kind: (reference folder, perturbed folder)} for a Llama- and a GPT-2-shaped causal LM."""
    out = {}
    for kind in ("llama", "gpt2"):
        base = tmp_path_factory.mktemp(kind)
        ref = causal_lm(kind, base / "ref")
        out[kind] = (ref, perturbed(ref, base / "noisy"))
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_equals_direct_computation(tiny, kind):
    ref, noisy = tiny[kind]
    report = evaluate(noisy, EVAL_TXT, ref=ref, seq_len=SEQ, device="cpu")
    expected = direct(noisy, windows_of(EVAL_TXT, SEQ), ref)
    assert report["kld"]["mean"] > 1e-4 and report["top1_agreement"] < 1  # the models do differ
    assert_matches(report, expected)
    assert report["windows"] == len(windows_of(EVAL_TXT, SEQ)) and report["predicted"] == report["tokens"] - report["windows"]
    assert [b["index"] for b in report["blocks"]] == [0, 1]
    assert all(0 < b["hidden_rel_error"] < 1 for b in report["blocks"])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_without_ref_only_ppl(tiny, kind):
    ref, _ = tiny[kind]
    report = evaluate(ref, EVAL_TXT, seq_len=SEQ, samples=3, device="cpu")
    assert_matches(report, direct(ref, windows_of(EVAL_TXT, SEQ)[:3]))
    assert report["windows"] == 3 and report["blocks"] is None and report["ppl_ratio"] is None and report["gate"] is None


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_model_against_itself_is_exact(tiny, kind):
    ref, _ = tiny[kind]
    report = evaluate(ref, EVAL_TXT, ref=ref, seq_len=SEQ, device="cpu")
    assert report["kld"] == {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    assert report["ppl_ratio"] == 1.0 and report["top1_agreement"] == 1.0 and report["ppl"] == report["ref_ppl"]
    assert all(b["hidden_rel_error"] == 0.0 for b in report["blocks"])


def test_batch_size_does_not_change_the_numbers(tiny):
    ref, noisy = tiny["llama"]
    one = evaluate(noisy, EVAL_TXT, ref=ref, seq_len=SEQ, samples=8, batch_size=1, device="cpu")
    many = evaluate(noisy, EVAL_TXT, ref=ref, seq_len=SEQ, samples=8, batch_size=5, device="cpu")
    assert abs(one["ppl"] / many["ppl"] - 1) < 1e-6 and one["top1_agreement"] == many["top1_agreement"]
    for k in one["kld"]:
        assert abs(one["kld"][k] - many["kld"][k]) < 1e-7


def test_jsonl_windows_of_different_lengths_padded_in_a_batch(tiny, tmp_path):
    """Records of different lengths share a batch (right-padded): each equals its own full-model run."""
    ref, noisy = tiny["llama"]
    lines = EVAL_TXT.read_text().splitlines()[:9]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(ref)
    windows = [torch.tensor(tok(t, add_special_tokens=False)["input_ids"][:SEQ]) for t in lines]
    assert len({len(w) for w in windows}) > 3
    report = evaluate(noisy, data, ref=ref, seq_len=SEQ, batch_size=4, device="cpu")
    assert report["windows"] == 9
    assert_matches(report, direct(noisy, windows, ref))


def test_token_id_windows(tiny, tmp_path):
    ref, noisy = tiny["gpt2"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 1024, (5, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0                       # a padded row: its masked positions are dropped
    save_file({"input_ids": ids, "attention_mask": mask}, tmp_path / "ids.safetensors")
    report = evaluate(noisy, tmp_path / "ids.safetensors", ref=ref, seq_len=32, device="cpu")
    windows = [ids[0, :32], ids[1, :30], ids[2, :32], ids[3, :32], ids[4, :32]]
    assert report["tokens"] == 158
    assert_matches(report, direct(noisy, windows, ref))


def test_bundled_sample_quantized_equals_transformers_dequantize_load(tmp_path):
    """The sample (bf16) quantized by qtool: eval through qtool = the same computation on transformers'
    dequantize=True load of the output."""
    out = tmp_path / "int4"
    r = run_cli("quantize", SAMPLES / "tiny-llama", "-o", out, "--method", "rtn", "--group-size", "32", "--quiet")
    assert r.exit_code == 0, r.stderr
    report = evaluate(out, EVAL_TXT, ref=SAMPLES / "tiny-llama", seq_len=128, device="cpu")
    assert report["kld"]["mean"] > 1e-3
    assert_matches(report, direct(out, windows_of(EVAL_TXT, 128), SAMPLES / "tiny-llama", quantized=True))


def test_bundled_sample_against_itself(tmp_path):
    report = evaluate(SAMPLES / "tiny-llama", EVAL_TXT, ref=SAMPLES / "tiny-llama", seq_len=128, device="cpu")
    assert report["kld"]["max"] == 0.0 and report["ppl_ratio"] == 1.0 and report["top1_agreement"] == 1.0
    assert_matches(report, direct(SAMPLES / "tiny-llama", windows_of(EVAL_TXT, 128), SAMPLES / "tiny-llama"))


def test_dequantized_output_against_its_quantized_source_is_exact(tmp_path):
    """dequantize writes the tensors the dense view computes with: the two models are the same numbers."""
    q, d = tmp_path / "q", tmp_path / "d"
    assert run_cli("quantize", SAMPLES / "tiny-llama", "-o", q, "--method", "rtn", "--quiet").exit_code == 0
    r = run_cli("dequantize", q, "-o", d, "--eval", EVAL_TXT, "--max-kld", "0", "--min-top1", "1", "--json")
    assert r.exit_code == 0, r.stderr
    ev = json.loads(r.stdout)["eval"]
    assert ev["kld"]["max"] == 0.0 and ev["top1_agreement"] == 1.0 and ev["gate"]["passed"]
    assert ev["model"] == str(d) and ev["ref"] == str(q)


@pytest.mark.parametrize("scheme", [["--method", "mse", "--group-size", "32"],
                                    ["--method", "rtn", "--group-size", "32", "--asymmetric"],
                                    ["--bits", "8"]])
def test_tiny_llama_quantized_equals_transformers_dequantize_load(tiny, tmp_path, scheme):
    """float32 Llama-shaped model, several schemes (asymmetric too): qtool's eval of the output = the direct
    computation on transformers' dequantize=True load of it."""
    ref, _ = tiny["llama"]
    out = tmp_path / "q"
    r = run_cli("quantize", ref, "-o", out, *scheme, "--quiet")
    assert r.exit_code == 0, r.stderr
    report = evaluate(out, EVAL_TXT, ref=ref, seq_len=SEQ, samples=6, device="cpu")
    assert report["kld"]["mean"] > 1e-5
    assert_matches(report, direct(out, windows_of(EVAL_TXT, SEQ)[:6], ref, quantized=True))


@pytest.mark.parametrize("symmetric", [True, False])
def test_checkpoint_written_by_compressed_tensors_equals_transformers_dequantize_load(tmp_path, symmetric):
    """A pack-quantized checkpoint as llm-compressor saves it (compressed-tensors' own compressor and config)."""
    ref = SAMPLES / "tiny-llama"
    out = compressed_by_compressed_tensors(ref, tmp_path / "ct", symmetric)
    report = evaluate(out, EVAL_TXT, ref=ref, seq_len=128, device="cpu")
    assert report["kld"]["mean"] > 1e-3
    assert_matches(report, direct(out, windows_of(EVAL_TXT, 128), ref, quantized=True))
