"""What qtool knows about model architectures, from tensor names, shapes and config.json alone (no model is built
here): which tensors are linear weights, GPT-2's Conv1D, embeddings and output heads, tied embeddings, and where the
repeated decoder (or encoder) layers sit. Planning, LoRA, calibration, reports and qtool.nn all ask here.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Module names (last part) that hold embeddings or output heads, across common architectures.
EMBEDDING_PARTS = {"wte", "wpe", "shared", "word_embeddings", "position_embeddings", "token_type_embeddings"}
HEAD_PARTS = {"lm_head", "embed_out", "output"}
# GPT-2-style Conv1D modules store [in, out] weights and are not nn.Linear: compressed-tensors targets Linear.
# The models whose c_attn/q_attn/c_proj/c_fc are Conv1D (`= Conv1D(` in transformers 5.24 models/).
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp", "clvp_decoder"}
CONV1D_PARTS = {"c_attn", "c_proj", "c_fc", "q_attn"}
# model_type → where the repeated blocks sit in transformers' base model (AutoModel).
DECODER_LAYERS = {
    "llama": "layers",
    "mistral": "layers",
    "qwen2": "layers",
    "gpt2": "h",
    "bert": "encoder.layer",
}


def module_of(name: str) -> str:
    """'a.b.weight' → 'a.b': the module a parameter belongs to (other names stand for themselves)."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def model_type(config: dict | None) -> str | None:
    """config.json's model_type (None without a config)."""
    return (config or {}).get("model_type")


def tied_embeddings(config: dict | None) -> bool:
    """transformers ties input and output embeddings unless the config says otherwise."""
    if not config:
        return False
    return bool(config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", True)))


def tied_heads(names: Iterable[str], config: dict | None) -> list[str]:
    """Output heads a checkpoint stores no weight for because transformers ties them to the input embeddings
    (`tie_word_embeddings`): they are still nn.Linear modules of the model, so compressed-tensors must be told to
    leave them alone (its `ignore`), or its default loading path looks for packed weights that are not there."""
    archs = (config or {}).get("architectures") or []
    lm = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    return ["lm_head"] if lm and tied_embeddings(config) and "lm_head.weight" not in set(names) else []


def is_head(module: str) -> bool:
    """An output head (lm_head and its other names)."""
    return leaf(module) in HEAD_PARTS


def is_conv1d(module: str, config: dict | None) -> bool | None:
    """Whether `module` is a transformers Conv1D (weight [in, out]) by the architecture config.json names; None when
    there is no model_type to tell by."""
    mt = model_type(config)
    if mt is None:
        return None
    return mt in CONV1D_MODEL_TYPES and leaf(module) in CONV1D_PARTS


def conv1d_name(module: str) -> bool:
    """A name GPT-2-style models give their Conv1D modules (c_attn, c_proj, c_fc, q_attn)."""
    return leaf(module) in CONV1D_PARTS


@dataclass(frozen=True)
class Role:
    """What one checkpoint tensor is. kind: linear (a weight of an nn.Linear) | head | conv1d | embedding | norm |
    other; reason: said in reports."""

    kind: str
    reason: str

    @property
    def quantize(self) -> bool:
        """Quantized by default: the linear weights, heads and Conv1D aside."""
        return self.kind == "linear"

    @property
    def linear(self) -> bool:
        """A weight of an nn.Linear (quantized, or listed in compressed-tensors' `ignore` when not)."""
        return self.kind in ("linear", "head")

    @property
    def lora_target(self) -> bool:
        """What PEFT's "all-linear" targets: every linear layer (Conv1D too) but the output head."""
        return self.kind in ("linear", "conv1d")


def role(name: str, shape: tuple[int, ...], dtype: torch.dtype, config: dict | None) -> Role:
    """The role of one tensor, from its name, shape, dtype and the model's config."""
    if dtype not in FLOAT_DTYPES:
        return Role("other", f"not floating point ({str(dtype).removeprefix('torch.')})")
    if not name.endswith(".weight"):
        return Role("other", "not a weight (bias or buffer)" if len(shape) <= 1 else "not a .weight tensor")
    if len(shape) != 2:
        return Role("other", f"{len(shape)}-D tensor (norm or bias)" if len(shape) < 2 else f"{len(shape)}-D tensor")
    module = module_of(name)
    last = leaf(module)
    if "norm" in last.lower() or last.startswith("ln_"):
        return Role("norm", "norm")
    if "embed" in last and last not in HEAD_PARTS or last in EMBEDDING_PARTS:
        return Role("embedding", "embedding")
    if last in HEAD_PARTS:
        return Role("head", "output head (lm_head)")
    if is_conv1d(module, config):
        return Role("conv1d", "GPT-2 Conv1D weight (compressed-tensors and vLLM quantize nn.Linear only)")
    return Role("linear", "linear weight")


def decoder_layers(names: Iterable[str], path: str) -> tuple[str, dict[int, list[str]]] | None:
    """(outer prefix, {layer index: its tensor names}) of the blocks under `path` (DECODER_LAYERS' value), from the
    names alone: e.g. ('model.', {0: ['model.layers.0.mlp.up_proj.weight', ...], ...}) for a *ForCausalLM; None when
    no name has that shape."""
    names = list(names)
    pat = re.compile(rf"^((?:[\w]+\.)*?){re.escape(path)}\.(\d+)\.")
    prefixes: Counter = Counter()
    for name in names:
        m = pat.match(name)
        if m:
            prefixes[m.group(1)] += 1
    if not prefixes:
        return None
    outer = prefixes.most_common(1)[0][0]
    layers: dict[int, list[str]] = {}
    start = f"{outer}{path}."
    for name in names:
        if name.startswith(start):
            idx, _, _ = name[len(start):].partition(".")
            if idx.isdigit():
                layers.setdefault(int(idx), []).append(name)
    return outer, dict(sorted(layers.items()))


# -- live torch modules -------------------------------------------------------------------------------------

def is_conv1d_module(module) -> bool:
    """transformers' Conv1D (GPT-2): weight stored [in, out], y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_features(module) -> tuple[int, int]:
    """(out, in) of a linear-like module: Conv1D reads them from its [in, out] weight, others have the attributes."""
    if is_conv1d_module(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return module.out_features, module.in_features
