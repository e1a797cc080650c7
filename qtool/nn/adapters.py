"""New LoRA adapters to train on a loaded model (dense or quantized base), and PEFT adapter folders written back.

`add_adapter` is PEFT's `get_peft_model(model, LoraConfig(...))` for the linear layers of a model qtool runs: the
same argument meanings and defaults (r=8, lora_alpha=8, lora_dropout=0, target_modules from PEFT's table for the
model type, rsLoRA, DoRA, lora_bias, rank/alpha patterns), the same initialisation (A kaiming-uniform(a=√5) or
gaussian(1/r), B zero, drawn from torch's global generator in PEFT's order: the same seed gives the same
factors), the factors held in float32 and only they trainable. `save_adapter` writes PEFT 0.21's save format:
`adapter_model.safetensors` (`base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.lora_B.bias`,
`.lora_magnitude_vector`) and `adapter_config.json`, which PEFT loads and `qtool merge-lora` merges.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn as nn

from ..arch import is_conv1d_module
from ..checkpoint.writer import CheckpointWriter
from ..errors import QtoolError
from ..lora.config import LoraSettings, parse_adapter_config
from ..lora.targets import PREFIX, is_targeted
from .lora import LoRALinear, _features, adapter_names, lora_layers, set_adapter, set_trainable, weight_norm, wrap
from .quant_linear import QuantLinear

# PEFT 0.21.2's default target_modules by model type (utils/constants.py,
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), for the architectures qtool loads.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "bloom": ["query_key_value"], "falcon": ["query_key_value"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"],
}
INITS = (True, False, "gaussian")


def add_adapter(model: nn.Module, r: int = 8, alpha: float = 8, targets=None, dropout: float = 0.0, *,
                name: str = "default", use_rslora: bool = False, use_dora: bool = False, lora_bias: bool = False,
                init_lora_weights: bool | str = True, rank_pattern: dict | None = None,
                alpha_pattern: dict | None = None, exclude_modules=None, trainable: bool = True,
                activate: bool = True) -> str:
    """Add a new LoRA adapter to `model`'s linear layers (nn.Linear, QuantLinear, Conv1D) and return its name.

    Arguments mean what LoraConfig's do (r, lora_alpha, target_modules, lora_dropout, ...): `targets` is a list of
    module names or name suffixes, a full-match regex, "all-linear" (every linear layer but the output head), or
    None for PEFT's default for the model type. trainable: only this adapter's factors get gradients (PEFT's
    get_peft_model); activate: it becomes the active adapter.
    """
    if name in adapter_names(model):
        raise QtoolError(name, "an adapter of this name is already attached")
    config = _peft_config(model, dict(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
        lora_bias=lora_bias, init_lora_weights=init_lora_weights, rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}), exclude_modules=exclude_modules))
    settings = parse_adapter_config(config, name)
    chosen = _targets(model, settings, targets)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        config["target_modules"] = sorted(chosen)  # PEFT saves the names it expanded the shorthand to
    if any(is_conv1d_module(_base(model.get_submodule(m))) for m in chosen):
        config["fan_in_fan_out"] = True  # PEFT switches it on for GPT-2 Conv1D layers and saves it so
    for m in chosen:  # named_modules order: PEFT's order of drawing from the generator
        base = _base(model.get_submodule(m))
        rank, scaling = settings.rank_alpha(m)[0], settings.scaling(m)
        A, B, bias = _init_factors(base, rank, lora_bias, init_lora_weights)
        magnitude = _round_to_base(weight_norm(base, A, B, scaling), base) if use_dora else None
        wrap(model, m).add_adapter(name, A, B, scaling, bias, magnitude, dropout, config)
    if activate:
        set_adapter(model, name)
    if trainable:
        set_trainable(model, name)
    return name


def _peft_config(model: nn.Module, fields: dict) -> dict:
    """The adapter's LoraConfig as PEFT saves it (adapter_config.json) from add_adapter's LoraConfig fields;
    PEFT's default targets for the model type when none are given. parse_adapter_config checks the rest."""
    r, dropout, init = fields["r"], fields["lora_dropout"], fields["init_lora_weights"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise QtoolError("r", f"must be a positive integer, not {r!r}")
    if not 0 <= dropout < 1:
        raise QtoolError("dropout", f"must be in [0, 1), not {dropout!r}")
    if init not in INITS:
        raise QtoolError("init_lora_weights", f"must be True, False or 'gaussian', not {init!r}")
    cfg = getattr(model, "config", None)
    targets = fields["target_modules"]
    if targets is None:
        mt = getattr(cfg, "model_type", None)
        if mt not in DEFAULT_TARGETS:
            raise QtoolError("targets", f"no default target modules for model type {mt!r}; pass targets=")
        targets = DEFAULT_TARGETS[mt]
    elif not isinstance(targets, str):
        targets = sorted(set(targets))
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": getattr(cfg, "_name_or_path", None),
            **fields, "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "inference_mode": True}


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, LoRALinear) else module


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, QuantLinear, LoRALinear)) or is_conv1d_module(module)


def _targets(model: nn.Module, settings: LoraSettings, targets) -> list[str]:
    """Names of the modules the adapter goes on, in named_modules order (PEFT's matching rules)."""
    inner = {id(m.base) for m in lora_layers(model).values()}
    all_linear = isinstance(settings.target_modules, str) and settings.target_modules.lower() == "all-linear"
    head = model.get_output_embeddings() if all_linear and hasattr(model, "get_output_embeddings") else None
    chosen = []
    for m, module in model.named_modules():
        if not m or id(module) in inner or ".adapters." in f".{m}." or not is_targeted(settings, m):
            continue
        if all_linear and (not _linear_like(module) or _base(module) is head):
            continue
        if not _linear_like(module):
            raise QtoolError(m, f"targets select a {type(module).__name__}; LoRA here goes on linear layers only")
        chosen.append(m)
    if not chosen:
        raise QtoolError("targets", f"{targets!r} select no linear layer of the model")
    return chosen


def _init_factors(base: nn.Module, r: int, lora_bias: bool, init) -> tuple:
    """A [r, in], B [out, r] (and B's bias) as PEFT makes them: nn.Linear layers (their default init draws
    first), then A re-drawn kaiming-uniform(a=√5) or normal(std=1/r), B and its bias zero; rounded through
    the base's dtype and back to float32, as PEFT's device/dtype move and autocast do."""
    out_f, in_f = _features(base)
    lora_A = nn.Linear(in_f, r, bias=False)
    lora_B = nn.Linear(r, out_f, bias=lora_bias)
    with torch.no_grad():
        if init is True:
            nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(lora_A.weight, std=1 / r)
        if init is not False:
            nn.init.zeros_(lora_B.weight)
            if lora_bias:
                nn.init.zeros_(lora_B.bias)
    A, B = (_round_to_base(t.detach(), base) for t in (lora_A.weight, lora_B.weight))
    return A, B, None if not lora_bias else _round_to_base(lora_B.bias.detach(), base)


def _round_to_base(t: torch.Tensor, base: nn.Module) -> torch.Tensor:
    dtype = base.compute_dtype if isinstance(base, QuantLinear) else base.weight.dtype
    return t.to(dtype).to(torch.float32) if dtype in (torch.float16, torch.bfloat16) else t.to(torch.float32)


def save_adapter(model: nn.Module, name: str, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write adapter `name` of `model` as a PEFT adapter folder (adapter_model.safetensors, adapter_config.json),
    atomically: the folder appears only when complete; an existing one is replaced only with overwrite=True."""
    layers = {m: layer.adapters[name] for m, layer in lora_layers(model).items() if name in layer.adapters}
    if not layers:
        raise QtoolError(name, "no adapter of this name is attached")
    config = next(iter(layers.values())).config
    if config is None:
        raise QtoolError(name, "the adapter has no PEFT config to save")
    tensors = {}
    for m, ad in layers.items():
        key = f"{PREFIX}{m}"
        tensors[f"{key}.lora_A.weight"] = ad.A
        tensors[f"{key}.lora_B.weight"] = ad.B
        if ad.bias is not None:
            tensors[f"{key}.lora_B.bias"] = ad.bias
        if ad.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = ad.magnitude
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in sorted(tensors.items())}
    with CheckpointWriter(path, overwrite=overwrite, basename="adapter_model", metadata={"format": "pt"}) as w:
        w.plan([(k, tuple(t.shape), t.dtype) for k, t in tensors.items()], index=False)
        for k, t in tensors.items():
            w.write(k, t)
        w.write_json("adapter_config.json", {**config, "inference_mode": True})

