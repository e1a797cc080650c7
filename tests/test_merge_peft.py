"""qtool merge-lora against PEFT 0.21.2's own merge_and_unload() on tiny Llama, GPT-2 (Conv1D) and BERT.

Tolerance: for float32 bases the float32 operations are PEFT's own (same operands, same order), so results are
compared bit for bit where PEFT's arithmetic is a plain add; DoRA's row norm may reduce in a different order
(memory layout of a transposed view), so DoRA allows 2 float32 ulps (rtol 2.4e-7·|x|, atol 1e-7). fp16/bf16
bases: PEFT adds the fp32 delta into the low-precision weight, which rounds once, as qtool's single cast does:
also compared exactly.
"""
from __future__ import annotations

import json

import pytest
import torch

from .lora_helpers import make_adapter, peft_merged, read_folder, save_base
from qtool.jobs.merge import merge_lora

EXACT = dict(rtol=0, atol=0)
DORA = dict(rtol=2.4e-7, atol=1e-7)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {
        ("llama", torch.float32): save_base("llama", root / "llama32"),
        ("llama", torch.float16): save_base("llama", root / "llama16", torch.float16),
        ("llama", torch.bfloat16): save_base("llama", root / "llama_bf16", torch.bfloat16),
        ("gpt2", torch.float32): save_base("gpt2", root / "gpt2"),
        ("bert", torch.float32): save_base("bert", root / "bert"),
    }


def check(tmp_path, bases, arch, lora_kw, dtype=torch.float32, tol=EXACT, seed=1):
    base = bases[(arch, dtype)]
    adapter = make_adapter(arch, base, tmp_path / "adapter", seed=seed, **lora_kw)
    ref = peft_merged(arch, base, adapter, dtype)
    out = tmp_path / "out"
    report = merge_lora(str(base), [str(adapter)], str(out))
    got = read_folder(out)
    base_sd = read_folder(base)
    assert set(got) == set(base_sd)
    changed = 0
    for name, t in got.items():
        assert t.dtype == base_sd[name].dtype, name
        torch.testing.assert_close(t, ref[name], **tol, msg=lambda m: f"{name}: {m}")
        changed += not torch.equal(t, base_sd[name])
    assert changed > 0
    return report, got, base_sd


CASES = {
    "llama_qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama_all_linear": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear")),
    "llama_rslora": ("llama", dict(r=8, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "down_proj"])),
    "llama_patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                     rank_pattern={r"layers\.1\.self_attn\.v_proj": 2, "up_proj": 6},
                                     alpha_pattern={r"layers\.1\..*": 3, "v_proj": 32, "q_proj": 5})),
    "llama_regex": ("llama", dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.1\.self_attn\.(q|k)_proj")),
    "llama_layers": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                   layers_to_transform=[1], layers_pattern="layers")),
    "llama_dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "o_proj"])),
    "llama_dora_rslora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                                        target_modules=["gate_proj", "down_proj"])),
    "llama_modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "llama_embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "k_proj"])),
    "gpt2_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2_bias_all": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn"], bias="all")),
    "gpt2_dora": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj"])),
    "gpt2_lora_bias": ("gpt2", dict(r=2, lora_alpha=8, lora_bias=True, target_modules=["c_fc", "c_proj"])),
    "bert_lora_bias": ("bert", dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["query", "value"],
                                    modules_to_save=["classifier"])),
    "bert_lora_only": ("bert", dict(r=4, lora_alpha=8, target_modules=["query", "dense"], bias="lora_only",
                                    exclude_modules=["pooler.dense"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft(tmp_path, bases, case):
    arch, kw = CASES[case]
    tol = DORA if kw.get("use_dora") else EXACT
    report, got, base_sd = check(tmp_path, bases, arch, kw, tol=tol)
    merged = {r["name"] for r in report["layers"] if r.get("merged")}
    assert merged, "report lists merged tensors"
    for row in report["layers"]:
        if row.get("merged") and row["name"].endswith(".weight"):
            w, w2 = base_sd[row["name"]].double(), got[row["name"]].double()
            want = float((w2 - w).norm() / w.norm())
            assert row["delta_rel_norm"] == pytest.approx(want, rel=1e-4)
    assert report["lora"]["parameters"] > 0 and 0 < report["lora"]["fraction_of_base"] < 1


def test_layers_to_transform_leaves_other_layers(tmp_path, bases):
    arch, kw = CASES["llama_layers"]
    _, got, base_sd = check(tmp_path, bases, arch, kw)
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base_sd["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(got["model.layers.1.self_attn.q_proj.weight"], base_sd["model.layers.1.self_attn.q_proj.weight"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base(tmp_path, bases, dtype):
    report, got, _ = check(tmp_path, bases, "llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), dtype)
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == dtype


def test_dtype_option_casts_once_and_updates_config(tmp_path, bases):
    base = bases[("llama", torch.float32)]
    adapter = make_adapter("llama", base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    ref = peft_merged("llama", base, adapter)
    merge_lora(str(base), [str(adapter)], str(tmp_path / "out"), dtype="bfloat16")
    got = read_folder(tmp_path / "out")
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, ref[name].to(torch.bfloat16)), name  # fp32 result rounded once
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_sharded_base_layout_mirrored(tmp_path):
    base = save_base("llama", tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    adapter = make_adapter("llama", base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    ref = peft_merged("llama", base, adapter)
    out = tmp_path / "out"
    merge_lora(str(base), [str(adapter)], str(out))
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == index["weight_map"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    for name, t in read_folder(out).items():
        assert torch.equal(t, ref[name]), name
    for extra in ("config.json", "generation_config.json"):
        if (base / extra).exists():
            assert (out / extra).read_bytes() == (base / extra).read_bytes()


def test_adapter_name_in_keys_accepted(tmp_path, bases):
    from .lora_helpers import rewrite_adapter
    base = bases[("llama", torch.float32)]
    adapter = make_adapter("llama", base, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    named = rewrite_adapter(adapter, tmp_path / "named",
                            rename=lambda k: k.replace("lora_A.", "lora_A.default.").replace("lora_B.", "lora_B.default.")
                            .replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight"))
    merge_lora(str(base), [str(adapter)], str(tmp_path / "o1"))
    merge_lora(str(base), [str(named)], str(tmp_path / "o2"))
    a, b = read_folder(tmp_path / "o1"), read_folder(tmp_path / "o2")
    assert all(torch.equal(a[k], b[k]) for k in a)
