"""Tiny random models of many architectures, built from a config with transformers (fixed seed, float32), and the
references the walk is checked against: a full-model forward with hooks on every linear layer, and for MoE layers
each expert run on exactly the tokens its router sent it, from the checkpoint's own per-expert 2-D weights."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)

# model_type → config overrides. Layer counts and window sizes make every layer kind appear (gemma's sliding and
# global layers, deepseek's dense first layer then MoE layers).
ARCHS = {
    "llama": {},
    "mistral": {"sliding_window": 8},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "sliding_window": 8, "num_hidden_layers": 3},
    "gemma3_text": {"head_dim": 16, "sliding_window": 8, "num_hidden_layers": 3,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "phi3": {},
    "granite": {"logits_scaling": 4.0, "residual_multiplier": 0.5, "embedding_multiplier": 2.0},
    "olmo2": {},
    "gpt_neox": {},
    "bert": {"encoder": True},
    "roberta": {"encoder": True, "max_position_embeddings": 140},
    "modernbert": {"encoder": True, "num_hidden_layers": 3, "global_attn_every_n_layers": 2, "local_attention": 8,
                   "cls_token_id": 1, "sep_token_id": 2},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {**MOE, "num_experts": 4, "head_dim": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {**MOE, "num_experts": 4, "shared_expert_intermediate_size": 64},
    "deepseek_v3": {**MOE, "n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1,
                    "num_hidden_layers": 3, "n_group": 1, "topk_group": 1, "q_lora_rank": 32, "kv_lora_rank": 32,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "head_dim": 8},
}
MOE_ARCHS = {"mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"}
ENCODERS = {"bert", "roberta", "modernbert"}
# Names the checkpoint (Hub layout) gives an expert's gate, up and down projections.
EXPERT_PARTS = {"mixtral": ("w1", "w3", "w2")}


def config(kind: str, **extra):
    import transformers as tf
    kw = {**COMMON, **ARCHS[kind], **extra}
    kw.pop("encoder", None)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return tf.AutoConfig.for_model(kind, **kw)


def tiny_model(kind: str, seed: int = 0, **extra):
    """A float32 model with weights larger than transformers' init, so quantization error is visible."""
    import transformers as tf
    torch.manual_seed(seed)
    cfg = config(kind, **extra)
    if ARCHS[kind].get("encoder"):
        model = tf.AutoModel.from_config(cfg) if kind != "modernbert" else tf.AutoModelForMaskedLM.from_config(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
    return model.eval()


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def samples(n: int = 6, seed: int = 1, low: int = 5, high: int = 20) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g) for _ in range(n)]


def _accumulate(out: dict, name: str, x: torch.Tensor) -> None:
    x = x.reshape(-1, x.shape[-1]).float()
    r = out.setdefault(name, {"sum_sq": 0, "absmax": torch.zeros(x.shape[1]), "count": 0})
    r["sum_sq"] = r["sum_sq"] + x.square().sum(0)
    r["absmax"] = torch.maximum(r["absmax"], x.abs().amax(0))
    r["count"] += x.shape[0]


def reference_linear_stats(model, ids: list[torch.Tensor]) -> dict:
    """{module name (model naming): {"sum_sq", "absmax", "count"}} of every nn.Linear/Conv1D in a full forward."""
    from .test_calib_helpers import reference_stats
    return reference_stats(model, ids)


def _expert_weights(sd: dict, prefix: str, e: int, kind: str):
    gate, up, down = EXPERT_PARTS.get(kind, ("gate_proj", "up_proj", "down_proj"))
    return [sd[f"{prefix}.{e}.{p}.weight"] for p in (gate, up, down)], (gate, up, down)


def reference_expert_stats(model, kind: str, checkpoint: dict, ids: list[torch.Tensor], all_tokens=()) -> tuple[dict, dict]:
    """Per checkpoint expert module: statistics of its input when each expert runs on exactly its routed tokens
    (or on every token, for the experts named in `all_tokens`), computed from the checkpoint's 2-D weights; and
    {experts module (model naming): routed token counts}. Asserts on the way that these per-expert computations,
    weighted by the router and summed, reproduce the fused experts module's own output."""
    from transformers.activations import ACT2FN
    act = ACT2FN[model.config.hidden_act]
    stats, routed, calls = {}, {}, []
    mods = {n: m for n, m in model.named_modules() if n.endswith(".experts") and hasattr(m, "gate_up_proj")}
    handles = [m.register_forward_hook(lambda mod, a, out, n=n: calls.append((n, a[0], a[1], a[2], out)))
               for n, m in mods.items()]
    with torch.no_grad():
        for s in ids:
            model(input_ids=s.unsqueeze(0))
    for h in handles:
        h.remove()
    for path, hidden, index, weights, out in calls:
        layer = path.split(".")[2]
        prefix = next(p.rsplit(".", 3)[0] for p in checkpoint if f".layers.{layer}." in p and ".experts." in p)
        counts = routed.setdefault(path, torch.zeros(mods[path].num_experts, dtype=torch.int64))
        mine = torch.zeros_like(out)
        for e in range(mods[path].num_experts):
            (wg, wu, wd), names = _expert_weights(checkpoint, prefix, e, kind)
            pos, k = torch.where(index == e)
            counts[e] += len(pos)
            h = act(hidden[pos] @ wg.T) * (hidden[pos] @ wu.T)
            mine.index_add_(0, pos, (h @ wd.T) * weights[pos, k, None])
            x_all = hidden if f"{prefix}.{e}" in all_tokens else hidden[pos]
            h_all = act(x_all @ wg.T) * (x_all @ wu.T) if f"{prefix}.{e}" in all_tokens else h
            for part, x in zip(names, (x_all, x_all, h_all)):
                if x.shape[0]:
                    _accumulate(stats, f"{prefix}.{e}.{part}", x)
        torch.testing.assert_close(mine, out, rtol=1e-5, atol=1e-6)
    return stats, routed
