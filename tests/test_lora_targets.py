"""Target rules, pattern keys, key parsing, orientation and config refusals, checked against PEFT's own helpers."""
from __future__ import annotations

import pytest

from qtool.errors import QtoolError
from qtool.lora.config import parse_adapter_config, pattern_key
from qtool.lora.targets import classify_key, is_conv1d, is_targeted, layer_index

MODULES = [
    "model.embed_tokens", "lm_head",
    *[f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qkvo"],
    *[f"model.layers.{i}.mlp.{p}_proj" for i in range(3) for p in ("gate", "up", "down")],
    "model.layers.1.mlp.experts.0.down_proj", "transformer.h.10.attn.c_attn", "encoder.blocks.2.attn.q_proj",
]

CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1, 2]),
    dict(target_modules=["q_proj", "down_proj"], layers_to_transform=1, layers_pattern="layers"),
    dict(target_modules=["q_proj", "c_attn"], layers_to_transform=[2, 10], layers_pattern=["blocks", "h"]),
    dict(target_modules=r".*\.layers\.[02]\.self_attn\.(q|k)_proj"),
    dict(target_modules=["q_proj", "model.layers.0.mlp.up_proj"], layers_to_transform=[1]),
    dict(target_modules=["proj"]),
    dict(target_modules=["q_proj", "v_proj", "down_proj"], exclude_modules=["model.layers.0.self_attn.q_proj", "down_proj"]),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.1\..*"),
    dict(target_modules=["lm_head", "q_proj"], modules_to_save=["lm_head", "layers.2.self_attn.q_proj"]),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_is_targeted_matches_peft(kw):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    peft_cfg = LoraConfig(**kw)
    ours = parse_adapter_config({"peft_type": "LORA", **{k: (sorted(v) if isinstance(v, set) else v)
                                                          for k, v in peft_cfg.to_dict().items()
                                                          if k in kw}}, "cfg")
    for m in MODULES:
        assert is_targeted(ours, m) == bool(check_target_module_exists(peft_cfg, m)), (kw, m)


def test_pattern_key_matches_peft():
    from peft.utils.other import get_pattern_key
    patterns = {r"layers\.1\..*": 1, "v_proj": 2, "self_attn.q_proj": 3, "q_proj": 4, "proj": 5}
    for m in MODULES:
        want = get_pattern_key(list(patterns), m)
        got = pattern_key(patterns, m)
        assert (got if got is not None else m) == want, m


def test_scaling_rules():
    s = parse_adapter_config({"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 2},
                              "alpha_pattern": {r"layers\.1\..*": 3, "v_proj": 5}}, "cfg")
    assert s.scaling("model.layers.0.self_attn.q_proj") == 2.0
    assert s.scaling("model.layers.0.self_attn.v_proj") == 5 / 2
    assert s.scaling("model.layers.1.self_attn.v_proj") == 3 / 2  # first matching alpha key wins
    rs = parse_adapter_config({"r": 16, "lora_alpha": 8, "use_rslora": True}, "cfg")
    assert rs.scaling("x.q_proj") == 8 / 4


def test_classify_key():
    k = classify_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert (k.role, k.target) == ("A", "model.layers.0.self_attn.q_proj")
    assert classify_key("base_model.model.x.lora_B.bias").role == "B_bias"
    assert classify_key("base_model.model.x.lora_magnitude_vector").role == "magnitude"
    assert classify_key("base_model.model.emb.lora_embedding_A").role == "emb_A"
    full = classify_key("base_model.model.h.0.attn.c_attn.base_layer.bias")
    assert (full.role, full.target) == ("full", "h.0.attn.c_attn.bias")
    assert classify_key("base_model.model.score.modules_to_save.default.weight").target == "score.weight"
    assert classify_key("model.layers.0.q_proj.lora_A.weight") is None
    with pytest.raises(QtoolError, match="unknown LoRA variant"):
        classify_key("base_model.model.x.lora_diag.weight")


def test_layer_index_first_number():
    assert layer_index("model.layers.1.mlp.experts.0.down_proj", None) == 1
    assert layer_index("model.layers.1.mlp.experts.0.down_proj", "experts") == 0


def test_orientation():
    gpt2 = {"model_type": "gpt2"}
    assert is_conv1d("transformer.h.0.attn.c_proj", (32, 32), (32, 32), gpt2)
    assert not is_conv1d("model.layers.0.self_attn.o_proj", (32, 32), (32, 32), {"model_type": "llama"})
    # gpt_bigcode's c_attn is nn.Linear: the architecture decides, not the name
    assert not is_conv1d("transformer.h.0.attn.c_attn", (96, 32), (96, 32), {"model_type": "gpt_bigcode"})
    with pytest.raises(QtoolError, match="base weight is"):
        is_conv1d("transformer.h.0.attn.c_attn", (96, 32), (96, 32), gpt2)
    # no config.json: a non-square shape decides; a square Conv1D-style name is refused, not guessed
    assert is_conv1d("h.0.attn.c_attn", (32, 96), (96, 32), None)
    with pytest.raises(QtoolError, match="no config.json"):
        is_conv1d("h.0.attn.c_proj", (32, 32), (32, 32), None)


@pytest.mark.parametrize("cfg, match", [
    ({"peft_type": "LOHA"}, "only LORA"),
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"kasa_config": {}}, None),  # an empty sub-config is not set
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"use_qalora": True}, "use_qalora"),
    ({"trainable_token_indices": [1]}, "trainable_token_indices"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewrote the base"),
    ({"r": 0}, "r must be positive"),
    ({"lora_alpha": "8"}, "lora_alpha must be a number"),
    ({"rank_pattern": {"q_proj": 2.5}}, "positive integer"),
    ({"target_modules": "(["}, "not a valid regular expression"),
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, "cannot be used"),
    ({"use_dora": True, "lora_bias": True}, "not supported with DoRA"),
    ({"bias": "some"}, "bias must be"),
    ({"init_lora_weights": "mica", "velora_config": None}, None),  # merge = plain LoRA
])
def test_config_refusals(cfg, match):
    if match is None:
        parse_adapter_config(cfg, "cfg")
        return
    with pytest.raises(QtoolError, match=match):
        parse_adapter_config(cfg, "cfg")
