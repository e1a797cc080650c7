"""The bundled samples are what the README and the other tests rely on.

samples/tiny-llama: a bf16 Llama checkpoint sharded in two with an index, loadable offline with its tokenizer,
trained well below chance on held-out text; samples/tiny-llama-lora: a PEFT adapter that changes it;
scripts/make_samples.py regenerates them byte for byte (the full check runs with QTOOL_SLOW=1).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
BASE = SAMPLES / "tiny-llama"
LORA = SAMPLES / "tiny-llama-lora"
SCRIPT = ROOT / "scripts" / "make_samples.py"
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

transformers = pytest.importorskip("transformers")


def lines(name: str) -> list[str]:
    return [ln for ln in (SAMPLES / name).read_text(encoding="utf-8").splitlines() if ln.strip()]


def sha256_tree(folder: Path, names: list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        p = folder / name
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f.relative_to(folder))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE, local_files_only=True)


@pytest.fixture(scope="module")
def base_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32, local_files_only=True)
    return model.eval()


@torch.no_grad()
def mean_loss(model, tokenizer, texts: list[str]) -> float:
    """Next-token cross-entropy per token over texts, each encoded as <s> text </s>, in one padded batch."""
    seqs = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    width = max(map(len, seqs))
    x = torch.full((len(seqs), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(x)
    for i, ids in enumerate(seqs):
        x[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    logits = model(input_ids=x, attention_mask=mask).logits.float()
    targets = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100).item()


def test_text_files():
    sample, evals, calib = lines("sample.txt"), lines("eval.txt"), lines("calib.txt")
    assert 20_000 <= (SAMPLES / "sample.txt").stat().st_size <= 60_000
    assert len(evals) == 64 and len(set(evals)) == 64
    assert len(calib) == 128
    jsonl = [json.loads(ln) for ln in lines("calib.jsonl")]
    assert len(jsonl) == 32 and all(list(r) == ["text"] and r["text"] for r in jsonl)
    calib_all = set(calib) | {r["text"] for r in jsonl}
    assert len(calib_all) == 160  # the two calibration sets are disjoint
    assert not calib_all & set(evals)
    # Eval lines are held out from training; calibration lines come from the training text.
    assert not set(evals) & set(sample) and calib_all <= set(sample)


def test_sharded_in_two_with_consistent_index():
    index = json.loads((BASE / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in BASE.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(index["weight_map"].values()) == set(shards)
    seen, total_bytes, total_params = {}, 0, 0
    for shard in shards:
        header = safetensors_header(BASE / shard)
        assert header.pop("__metadata__") == {"format": "pt"}  # no timestamps or paths
        for name, info in header.items():
            assert name not in seen
            seen[name] = shard
            assert info["dtype"] == "BF16"
            start, end = info["data_offsets"]
            assert end - start == 2 * math.prod(info["shape"])
            total_bytes += end - start
            total_params += math.prod(info["shape"])
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total_bytes
    assert index["metadata"]["total_parameters"] == total_params
    # Untied head, GQA shapes, and input widths that int4 group 128 divides.
    with safe_open(BASE / seen["lm_head.weight"], "pt") as f:
        assert f.get_slice("lm_head.weight").get_shape() == [1024, 128]
    with safe_open(BASE / seen["model.layers.0.self_attn.k_proj.weight"], "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [64, 128]
    linear = [n for n in seen if n.endswith("_proj.weight")]
    assert len(linear) == 14


def test_config_and_tokenizer_load_offline(tokenizer):
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(BASE, local_files_only=True)
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 384, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.tie_word_embeddings is False
    assert config.vocab_size == len(tokenizer) == 1024
    gen = GenerationConfig.from_pretrained(BASE, local_files_only=True)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 3)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 3)
    text = lines("eval.txt")[0]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # <s> prepended, as Llama does
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # BPE learned words from sample.txt: far fewer tokens than bytes.
    assert len(ids) < len(text.encode()) / 3
    # No absolute paths or timestamps in any JSON file of the samples.
    for p in list(BASE.glob("*.json")) + list(LORA.glob("*.json")):
        s = p.read_text()
        assert str(ROOT) not in s and "/tmp" not in s and "\"_name_or_path\"" not in s, p


def test_model_loss_well_below_chance(base_model, tokenizer):
    chance = math.log(len(tokenizer))
    held_out = mean_loss(base_model, tokenizer, lines("eval.txt"))
    trained = mean_loss(base_model, tokenizer, lines("calib.txt"))
    assert held_out < 0.7 * chance  # ~4.2 against ln(1024) = 6.93
    assert trained < held_out  # it learned sample.txt itself
    # Greedy generation continues a prompt with words, not noise.
    x = tokenizer("The river", return_tensors="pt")["input_ids"]
    out = base_model.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    words = tokenizer.decode(out[0], skip_special_tokens=True).split()
    vocab = set((SAMPLES / "sample.txt").read_text().replace(".", " ").replace(",", " ").split())
    assert len(words) >= 6 and sum(w.strip(".,") in vocab for w in words) >= 0.8 * len(words)


def test_adapter_loads_with_peft_and_changes_logits(base_model, tokenizer):
    peft = pytest.importorskip("peft")
    cfg = json.loads((LORA / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (8, 16, "LORA")
    assert set(cfg["target_modules"]) == TARGETS
    assert (LORA / cfg["base_model_name_or_path"]).resolve() == BASE.resolve()
    assert sorted(p.name for p in LORA.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    header = safetensors_header(LORA / "adapter_model.safetensors")
    header.pop("__metadata__")
    assert len(header) == 2 * 2 * len(TARGETS)  # layers x modules x (A, B)
    with safe_open(LORA / "adapter_model.safetensors", "pt") as f:
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
        assert b.shape == (64, 8) and b.abs().max() > 0  # trained: B is no longer zero

    x = tokenizer(lines("eval.txt")[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        before = base_model(**x).logits
        model = peft.PeftModel.from_pretrained(base_model, LORA)
        model.eval()
        after = model(**x).logits
        recipe = lines("adapter.txt")
        loss_lora = mean_loss(model, tokenizer, recipe)
        with model.disable_adapter():
            loss_base = mean_loss(model, tokenizer, recipe)
        model.unload()  # leave the shared fixture as it was
    assert (after - before).abs().max() > 1.0
    assert loss_lora < loss_base - 1.0  # it learned the recipe style


def test_regenerate_configs_and_tokenizer(tmp_path):
    """The parts that need no training regenerate byte for byte (a few seconds)."""
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--skip-train"], check=True,
                   capture_output=True)
    names = ["calib.txt", "calib.jsonl", "tiny-llama"]
    fresh = sha256_tree(tmp_path, names)
    assert sorted(fresh) == sorted(["calib.txt", "calib.jsonl"] + [
        f"tiny-llama/{n}" for n in
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]])
    committed = sha256_tree(SAMPLES, names)
    assert {k: committed[k] for k in fresh} == fresh
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".make_samples-")]


@pytest.mark.skipif(os.environ.get("QTOOL_SLOW") != "1", reason="full retraining (~2 min); set QTOOL_SLOW=1")
def test_regenerate_everything_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    names = ["calib.txt", "calib.jsonl", "tiny-llama", "tiny-llama-lora"]
    assert sha256_tree(tmp_path, names) == sha256_tree(SAMPLES, names)
