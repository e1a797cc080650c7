"""The LoRA parts of a report: what an adapter holds and adds to its base (inspect of an adapter, merge-lora), and
the memory a LoRA fine-tune would need (inspect --lora-rank; qtool.nn.accounting for a live model)."""
from __future__ import annotations

from typing import Iterable

import torch

from .. import arch
from ..checkpoint import Checkpoint
from ..errors import QtoolError
from ..lora.config import LoraSettings, raw_settings, scaling
from ..lora.targets import classify_key
from .schema import Lora, LoraTraining, Size


def _fraction(params: int, base: int | None) -> float | None:
    return params / base if base else None


def _one_or_each(values: dict[str, float], default: float | None) -> float | dict[str, float] | None:
    """One scaling when every module has it (`default` when there are no modules), else {module: scaling}."""
    distinct = set(values.values())
    if not distinct:
        return default
    return distinct.pop() if len(distinct) == 1 else dict(sorted(values.items()))


def _default_scaling(s: LoraSettings) -> float | None:
    return scaling(s.r, s.lora_alpha, s.use_rslora) if s.r and s.lora_alpha is not None else None


def _modules(keys: Iterable[str]) -> dict[str, str]:
    """{module: role} of an adapter's LoRA keys (A, emb_A, ...), as PEFT reads them; keys of kinds qtool does not
    merge are passed over (describing an adapter must not fail on them)."""
    found = {}
    for key in keys:
        try:
            k = classify_key(key)
        except QtoolError:
            continue
        if k is not None and k.role in ("A", "emb_A"):
            found[k.target] = k.role
    return found


def adapter_part(ckpt: Checkpoint, base_parameters: int | None) -> Lora:
    """The `lora` block of an adapter checkpoint: rank, alpha, scaling (rank/alpha patterns applied per module),
    targets and what it adds to its base."""
    cfg = ckpt.adapter_config or {}
    s = raw_settings(cfg)
    modules = _modules(ckpt.tensors)
    default = _default_scaling(s)
    params = sum(info.numel for info in ckpt.tensors.values())
    return {
        "rank": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "scaling": _one_or_each({m: s.scaling(m) for m in modules}, default) if default is not None else None,
        "use_rslora": bool(cfg.get("use_rslora")),
        "use_dora": bool(cfg.get("use_dora")),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "targets": sorted({arch.leaf(m) for m, role in modules.items() if role == "A"}),
        "target_modules": cfg.get("target_modules"),
        "parameters": params,
        "base_parameters": base_parameters,
        "fraction_of_base": _fraction(params, base_parameters),
    }


def merge_part(sources: list, adapters: list, weights: list[float], plan, base_parameters: int) -> Lora:
    """The `lora` block of a merge: each adapter's settings and scaling as merged (plan.modules holds, per module,
    every adapter's (index, rank, scaling)), what was merged, and the adapters' share of the base."""
    params = [sum(i.numel for i in a.ckpt.tensors.values()) for a in adapters]
    scalings = [_one_or_each({m: sc for m, entries in plan.modules.items() for j, _, sc in entries if j == i},
                             _default_scaling(a.settings)) for i, a in enumerate(adapters)]
    per_adapter = [{
        "source": str(src), "weight": wt, "rank": a.settings.r, "alpha": a.settings.lora_alpha, "scaling": sc,
        "use_rslora": a.settings.use_rslora, "use_dora": a.settings.use_dora, "lora_bias": a.settings.lora_bias,
        "bias": a.settings.bias, "rank_pattern": a.settings.rank_pattern, "alpha_pattern": a.settings.alpha_pattern,
        "modules": len(a.modules), "replaced_tensors": sorted(a.full), "parameters": p,
    } for src, a, wt, p, sc in zip(sources, adapters, weights, params, scalings)]
    one = len(adapters) == 1
    return {
        "rank": (adapters[0].settings.r if one else [a.settings.r for a in adapters]),
        "ranks_used": sorted({rk for entries in plan.modules.values() for _, rk, _ in entries}),
        "alpha": (adapters[0].settings.lora_alpha if one else [a.settings.lora_alpha for a in adapters]),
        "scaling": scalings[0] if one else scalings,
        "targets": sorted({arch.leaf(m) for m in plan.modules}),
        "parameters": sum(params),
        "base_parameters": base_parameters,
        "fraction_of_base": _fraction(sum(params), base_parameters),
        "weights": weights,
        "merged_tensors": sorted(n for n, op in plan.ops.items() if op.terms),
        "adapters": per_adapter,
    }


def training_part(rank: int, layers: list[tuple[int, int]], base_bytes: int, config: dict | None = None,
                  tokens: int = 0, adapter_itemsize: int = 4, optimizer_states: int = 2) -> LoraTraining:
    """Bytes a LoRA fine-tune at `rank` on `layers` ([out, in] each) needs: the base frozen at its stored width (no
    gradients, no states), the adapter's weights, gradients and optimizer states (Adam: 2), and, for a training step
    of `tokens` tokens (batch × sequence length), the activations kept for the backward pass
    (activation_bytes_per_token; left out, and None, when config.json lacks the sizes)."""
    params = sum(rank * (o + i) for o, i in layers)
    weights = params * adapter_itemsize
    per_token = activation_bytes_per_token(config, sum(i for _, i in layers), len(layers), rank, adapter_itemsize)
    activations = tokens * per_token if per_token is not None else 0
    return {"rank": rank, "targets": len(layers), "adapter_parameters": params, "adapter_bytes": weights,
            "gradient_bytes": weights, "optimizer_bytes": optimizer_states * weights, "base_bytes": base_bytes,
            "tokens": tokens, "activation_bytes_per_token": per_token, "activation_bytes": activations,
            "total_bytes": base_bytes + (2 + optimizer_states) * weights + activations}


def _size(config: dict, *keys, default=None):
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def activation_bytes_per_token(config: dict | None, target_widths: int, targets: int, rank: int,
                               adapter_itemsize: int = 4) -> int | None:
    """What one token of a LoRA training step keeps for its backward pass, for a decoder of Llama-style blocks
    (measured within a few % on bench/nn_bench.py's model by autograd's saved tensors): the adapter-dtype copy
    of each target layer's input (`target_widths` = the sum of their input widths; PEFT casts the input to the
    adapter's dtype) and its A·x; per block the attention's q, k, v and output and the MLP's three intermediate
    tensors in the model dtype and two norms' float32 inputs; the final norm's input; the logits in the model
    dtype, their float32 copy and its gradient. None when config.json lacks the sizes."""
    if not config:
        return None
    hidden = _size(config, "hidden_size", "n_embd", "d_model")
    layers = _size(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _size(config, "vocab_size")
    if hidden is None or layers is None or vocab is None:
        return None
    inter = _size(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    heads = _size(config, "num_attention_heads", "n_head", default=1)
    head_dim = _size(config, "head_dim", default=hidden // heads)
    kv = _size(config, "num_key_value_heads", default=heads) * head_dim
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    item = getattr(torch, name, torch.float32).itemsize if isinstance(name, str) else 4
    lora = adapter_itemsize * (target_widths + rank * targets)
    block = item * (heads * head_dim + 2 * kv + hidden + 3 * inter) + 4 * 2 * hidden + 4 * heads
    return lora + layers * block + 4 * hidden + (item + 8) * vocab


def checkpoint_training_part(size: Size, config: dict | None, rank: int, tokens: int = 0) -> LoraTraining:
    """training_part for a checkpoint on file: PEFT's "all-linear" targets (every linear layer, Conv1D included,
    but the output head), the base at its stored bytes. The same convention as qtool.nn.lora_training_memory."""
    layers = []
    for r in size["layers"]:
        role = arch.role(r["name"], tuple(r["shape"]), torch.float16, config)
        if r["quantized"] or role.lora_target:
            out, inp = r["shape"]
            layers.append((inp, out) if role.kind == "conv1d" else (out, inp))  # Conv1D stores [in, out]
    return training_part(rank, layers, size["bytes"], config, tokens)
