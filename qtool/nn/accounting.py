"""What a live model costs: parameters, memory by dtype, and the memory a LoRA fine-tune of it would need.

Conventions follow the size report (design §7, `qtool.report.size`; the training estimate is `report.lora`'s): a quantized weight is one logical tensor
of dtype `int4`/`int8` whose parameters are those of its [out, in] shape and whose bytes are all its stored
parts (packed codes, scales, zero points, shape). Tied tensors are counted once.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..arch import is_conv1d_module
from ..report.lora import training_part
from ..report.size import dtype_name
from .lora import LoRALinear, _features
from .quant_linear import QuantLinear

ADAM_STATES = 2  # exp_avg and exp_avg_sq, each the shape of the parameter


def _tensors(model: nn.Module):
    """Unique (name, tensor, is_param) of the model, QuantLinear buffers excluded (counted per layer)."""
    seen: set[int] = set()
    quant_prefixes = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, QuantLinear))
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            yield name, p, True
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is None or id(b) in seen or name.startswith(quant_prefixes):
            continue
        seen.add(id(b))
        yield name, b, False


def parameter_counts(model: nn.Module) -> dict:
    """{"total", "trainable", "quantized"}: a QuantLinear's weight counts out·in parameters (frozen)."""
    total = trainable = quantized = 0
    for _, t, is_param in _tensors(model):
        if is_param:
            total += t.numel()
            trainable += t.numel() if t.requires_grad else 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quantized += m.out_features * m.in_features
    return {"total": total + quantized, "trainable": trainable, "quantized": quantized}


def memory_footprint(model: nn.Module) -> dict:
    """{"bytes", "dtypes": {DTYPE: {"tensors", "parameters", "bytes"}}} of the model's tensors as they are
    held (parameters and buffers); a QuantLinear weight counts at its packed size under int4/int8."""
    dtypes: dict[str, dict] = {}

    def add(key: str, params: int, nbytes: int) -> None:
        row = dtypes.setdefault(key, {"tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += params
        row["bytes"] += nbytes

    for _, t, _ in _tensors(model):
        add(dtype_name(t.dtype), t.numel(), t.numel() * t.element_size())
    for m in model.modules():
        if isinstance(m, QuantLinear):
            add(f"int{m.spec.bits}", m.out_features * m.in_features, m.weight_nbytes)
    return {"bytes": sum(r["bytes"] for r in dtypes.values()), "dtypes": dict(sorted(dtypes.items()))}


def _linear_layers(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every layer LoRA can target: nn.Linear, QuantLinear, Conv1D (through a LoRALinear too)."""
    inner = {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
    out = {}
    for name, m in model.named_modules():
        if id(m) in inner:
            continue
        if isinstance(m, LoRALinear) or isinstance(m, (nn.Linear, QuantLinear)) or is_conv1d_module(m):
            out[name] = _features(m.base if isinstance(m, LoRALinear) else m)
    return out


def lora_training_memory(model: nn.Module, rank: int, targets: Iterable[str] | None = None,
                         adapter_dtype: torch.dtype = torch.float32, optimizer_states: int = ADAM_STATES,
                         tokens: int = 0) -> dict:
    """Bytes a LoRA fine-tune of `model` at `rank` needs (the size report's lora_training block, for a live model).

    targets: module names or name suffixes (PEFT's list rule: equal, or ending in "." + target); None means
    PEFT's "all-linear" (every linear layer except the output head). The adapter's weights, gradients and
    optimizer states (Adam: 2) are counted at `adapter_dtype`; the base as it is held (memory_footprint), frozen,
    so it has no gradients or states; `tokens` of a training step add their activations
    (qtool.report.lora.activation_bytes_per_token, from the model's config).
    """
    if rank <= 0:
        raise ValueError(f"rank must be positive, not {rank}")
    layers = _linear_layers(model)
    if targets is None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        chosen = {n: s for n, s in layers.items() if model.get_submodule(n) is not head and not n.endswith("lm_head")}
    else:
        targets = list(targets)
        chosen = {n: s for n, s in layers.items() if any(n == t or n.endswith("." + t) for t in targets)}
    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else config
    width = torch.empty(0, dtype=adapter_dtype).element_size()
    return training_part(rank, list(chosen.values()), memory_footprint(model)["bytes"], config, tokens, width,
                         optimizer_states)
