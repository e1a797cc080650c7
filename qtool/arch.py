"""What qtool knows about model architectures, from tensor names, shapes and config.json alone (no model is built
here): which tensors are linear weights, GPT-2's Conv1D, embeddings and output heads, MoE routers, tied embeddings.
Planning, LoRA, calibration, reports and qtool.nn all ask here. (Where a model's blocks sit, calibration learns from
the model transformers builds: qtool.calib.model.)
"""
from __future__ import annotations

import re
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
# Mixture-of-experts routers: `mlp.gate` (Qwen-MoE, OLMoE, DeepSeek), `block_sparse_moe.gate` (Mixtral),
# `mlp.shared_expert_gate` (Qwen2-MoE), `router` / `router.layer` (gpt-oss, Llama 4, Granite-MoE). vLLM loads them
# unquantized (every projection of an MoE layer shares one scheme; the router is not one of them), so they stay
# dense and are listed in `ignore`. Recognised by name in a model whose config declares experts.
ROUTER_PARTS = {"gate", "router", "shared_expert_gate"}
MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok")
# Modules transformers 5 renames on load (its weight-conversion mapping): checkpoint name → transformers' name.
TRANSFORMERS_NAMES = {"embed_out": "lm_head"}  # GPT-NeoX's output head


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


def is_moe(config: dict | None) -> bool:
    """The config declares experts (top level or its text config)."""
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        if any(isinstance(cfg.get(k), int) and cfg[k] > 0 for k in MOE_CONFIG_KEYS):
            return True
    return False


def is_router(module: str, config: dict | None) -> bool:
    parts = module.split(".")
    last = "router" if parts[-2:] == ["router", "layer"] else parts[-1]
    return last in ROUTER_PARTS and is_moe(config)


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
    """What one checkpoint tensor is. kind: linear (a weight of an nn.Linear) | head | router | conv1d | embedding | norm |
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
        return self.kind in ("linear", "head", "router")

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
    if len(shape) == 3 and ("expert" in name or is_moe(config)):
        return Role("other", "fused 3-D experts tensor (kept dense: compressed-tensors stores per-expert 2-D weights)")
    if len(shape) != 2:
        return Role("other", f"{len(shape)}-D tensor (norm or bias)" if len(shape) < 2 else f"{len(shape)}-D tensor")
    module = module_of(name)
    last = leaf(module)
    if "norm" in last.lower() or last.startswith("ln_"):
        return Role("norm", "norm")
    if "embed" in last and last not in HEAD_PARTS or last in EMBEDDING_PARTS:
        return Role("embedding", "embedding")
    if last in HEAD_PARTS or last == "decoder" and shape[0] == (config or {}).get("vocab_size"):
        return Role("head", "output head (lm_head)")  # `decoder`: the vocabulary projection of a masked-LM head
    if is_router(module, config):
        return Role("router", "MoE router (kept dense: vLLM loads routers unquantized)")
    if is_conv1d(module, config):
        return Role("conv1d", "GPT-2 Conv1D weight (compressed-tensors and vLLM quantize nn.Linear only)")
    return Role("linear", "linear weight")


# Linear layers a serving engine runs as one fused matmul (vLLM's packed_modules_mapping: qkv_proj, gate_up_proj,
# BERT's qkv from query/key/value, DeepSeek's fused_qkv_a_proj), found as siblings under one parent module; vLLM
# refuses a fused layer whose parts have different schemes (or are partly ignored).
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("gate_proj", "up_proj"),
                  ("q_a_proj", "kv_a_proj_with_mqa"))
# Every projection of every expert of one MoE layer (`...experts.<e>.<proj>`): vLLM's FusedMoE holds them as one
# set of stacked weights with one scheme.
_EXPERT = re.compile(r"^(.*\.experts)\.\d+\.[^.]+$")


@dataclass(frozen=True)
class FusedGroup:
    """Modules that must share one scheme. name: the module itself for a group of one,
    `<parent>.{q_proj,k_proj,v_proj}` for fused siblings, `<prefix>.experts.*` for an MoE layer's experts."""

    name: str
    members: tuple[str, ...]


def fused_groups(modules: Iterable[str]) -> list[FusedGroup]:
    """Partition `modules` (linear module names) into the groups a serving engine fuses, sorted by name; every
    module is in exactly one group (siblings listed in FUSED_SIBLINGS' order, experts by name)."""
    keyed: dict[tuple, list[str]] = {}
    for m in sorted(set(modules)):
        keyed.setdefault(_fusion_key(m), []).append(m)
    groups = []
    for (prefix, parts), members in keyed.items():
        if parts is None:  # one MoE layer's experts
            groups.append(FusedGroup(f"{prefix}.*", tuple(members)))
        elif len(members) == 1:
            groups.append(FusedGroup(members[0], tuple(members)))
        else:
            members.sort(key=lambda m: parts.index(leaf(m)))
            groups.append(FusedGroup(f"{prefix}.{{{','.join(leaf(m) for m in members)}}}", tuple(members)))
    return sorted(groups, key=lambda g: g.name)


def _fusion_key(module: str) -> tuple[str, tuple | None]:
    """(prefix, sibling names) shared by the modules fused with `module`: (experts prefix, None) for an expert,
    (parent, FUSED_SIBLINGS entry) for a fused sibling, (module, ()) for anything else."""
    expert = _EXPERT.match(module)
    if expert:
        return expert.group(1), None
    parent, _, last = module.rpartition(".")
    for parts in FUSED_SIBLINGS:
        if last in parts:
            return parent, parts
    return module, ()


# -- live torch modules -------------------------------------------------------------------------------------

def is_conv1d_module(module) -> bool:
    """transformers' Conv1D (GPT-2): weight stored [in, out], y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_features(module) -> tuple[int, int]:
    """(out, in) of a linear-like module: Conv1D reads them from its [in, out] weight, others have the attributes."""
    if is_conv1d_module(module):
        return int(module.weight.shape[1]), int(module.weight.shape[0])
    return module.out_features, module.in_features


# Activation-aware scaling (AWQ): a linear whose input no module produces, and the linear inside the same block whose
# output reaches it linearly, so 1/s can be folded into that linear's rows: attention's output projection after the
# value projection (attention is linear in the values), the MLP's down projection after its up projection
# (act(gate)·up is linear in up). Module paths inside a block; whether a fold is exact is still checked on the block.
FOLD_PREDECESSORS = (
    ("self_attn.o_proj", "self_attn.v_proj"),
    ("attn.o_proj", "attn.v_proj"),
    ("self_attn.out_proj", "self_attn.v_proj"),
    ("mlp.down_proj", "mlp.up_proj"),
    ("attention.output.dense", "attention.self.value"),
    ("attention.dense", "attention.value"),
)


def fold_predecessor(path: str) -> str | None:
    """The module path of the linear whose output rows feed `path` (a linear's path inside its block), if known."""
    for consumer, producer in FOLD_PREDECESSORS:
        if path == consumer or path.endswith("." + consumer):
            return path[: len(path) - len(consumer)] + producer
    return None
