"""Tiny Llama, GPT-2 and BERT checkpoints made in the test (random weights, fixed seed), and a reference
forward pass of the whole model with hooks on its linear layers."""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 96


def tiny_model(kind: str, vocab: int = VOCAB):
    import transformers as tf
    torch.manual_seed(0)
    if kind in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[kind]
        cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=False)
        model = tf.AutoModelForCausalLM.from_config(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=128)
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=vocab, max_position_embeddings=128)
        model = tf.BertModel(cfg, add_pooling_layer=True)
    else:
        raise ValueError(kind)
    # larger-than-init weights so quantization error is visible and layers differ
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_tiny(kind: str, folder: Path, vocab: int = VOCAB):
    model = tiny_model(kind, vocab)
    model.save_pretrained(folder)
    return model


def samples(n: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g) for _ in range(n)]


def reference_stats(model, ids: list[torch.Tensor], with_inputs: bool = False) -> dict:
    """{module name: {"sum_sq", "absmax", "count", ["x"]}} from a plain forward pass of the full model."""
    from transformers.pytorch_utils import Conv1D
    out: dict = {}

    def hook(name):
        def f(mod, args, res):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            r = out.setdefault(name, {"sum_sq": 0, "absmax": torch.zeros(x.shape[1]), "count": 0, "x": []})
            r["sum_sq"] = r["sum_sq"] + x.square().sum(0)
            r["absmax"] = torch.maximum(r["absmax"], x.abs().amax(0))
            r["count"] += x.shape[0]
            if with_inputs:
                r["x"].append(x)
        return f

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    with torch.no_grad():
        for s in ids:
            model(input_ids=s.unsqueeze(0))
    for h in handles:
        h.remove()
    return out
