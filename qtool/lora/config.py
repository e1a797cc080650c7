"""Read a PEFT `adapter_config.json` into the few settings that change merge math (peft 0.21.2 rules).

Everything else a LoraConfig holds is training-time only (dropout, init of A, runtime options). Fields that
would make `W + s·B@A` the wrong answer are refused here, by name, before any tensor is read.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import QtoolError

# Variant or layout fields whose merge is not `W + s·B@A` (or needs a model qtool does not rebuild):
# refused when set to anything truthy. Value: why, in a few words.
_REFUSED_FIELDS = {
    "use_bdlora": "block-diagonal LoRA (BD-LoRA) merge is not implemented",
    "arrow_config": "Arrow routing mixes adapters per token and cannot be merged",
    "kasa_config": "KaSA rewrites the base weight by SVD and adds lora_diag; its merge is not implemented",
    "alora_invocation_tokens": "activated LoRA applies only after invocation tokens and cannot be merged",
    "use_qalora": "QA-LoRA pools inputs for a GPTQ base; its merge is not implemented",
    "monteclora_config": "MonteCLoRA samples its weights; its merge is not implemented",
    "layer_replication": "layer replication builds a deeper model than the base checkpoint",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not implemented",
    "trainable_token_indices": "trainable token embeddings are not implemented",
    "megatron_config": "Megatron tensor-parallel LoRA layers are not implemented",
}
# init_lora_weights values that rewrite the base weight at init: the adapter only fits that residual base
# (PEFT converts such adapters to plain LoRA with save_pretrained(path_initial_model_for_weight_conversion=...)).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass(frozen=True)
class LoraSettings:
    """The merge-relevant part of one adapter's LoraConfig."""

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    target_modules: Any = None          # list[str] | str (full-match regex, or "all-linear") | None
    exclude_modules: Any = None         # list[str] | str | None
    layers_to_transform: Any = None     # list[int] | int | None
    layers_pattern: Any = None          # list[str] | str | None
    modules_to_save: tuple = ()
    bias: str = "none"                  # none | all | lora_only
    lora_bias: bool = False
    use_dora: bool = False

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """r and alpha of one module: the first rank_pattern / alpha_pattern key (dict order) that matches wins."""
        r_key = pattern_key(self.rank_pattern, module)
        a_key = pattern_key(self.alpha_pattern, module)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[a_key] if a_key is not None else self.lora_alpha
        return r, alpha

    def scaling(self, module: str) -> float:
        """PEFT's `scaling[adapter]` of one module (its rank and alpha patterns applied)."""
        return scaling(*self.rank_alpha(module), self.use_rslora)


def scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha/r, or alpha/sqrt(r) with rsLoRA (the same float expression as PEFT)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def raw_settings(cfg: dict) -> LoraSettings:
    """The scaling-relevant settings of an adapter_config.json taken as they are, unchecked (for describing an
    adapter, which must work for adapters qtool would refuse to merge)."""
    return LoraSettings(r=cfg.get("r"), lora_alpha=cfg.get("lora_alpha"), use_rslora=bool(cfg.get("use_rslora")),
                        rank_pattern=dict(cfg.get("rank_pattern") or {}), alpha_pattern=dict(cfg.get("alpha_pattern") or {}))


def pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's get_pattern_key: first key with `re.match(rf"(.*\\.)?({key})$", module)`, else None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def parse_adapter_config(cfg: dict | None, path) -> LoraSettings:
    """Validate an adapter_config.json dict; refuse adapter kinds qtool cannot merge exactly, naming the field."""
    if cfg is None:
        raise QtoolError(path, "no adapter_config.json: not a PEFT adapter")
    if not isinstance(cfg, dict):
        raise QtoolError(path, "adapter_config.json is not a JSON object")
    _refuse_other_kinds(cfg, path)
    bias = cfg.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise QtoolError(path, f"bias must be none, all or lora_only, not {bias!r}")
    target, exclude, layers, layers_pattern = _selection(cfg, path)
    use_dora = bool(cfg.get("use_dora", False))
    lora_bias = bool(cfg.get("lora_bias", False))
    if use_dora and lora_bias:
        raise QtoolError(path, "lora_bias=True is not supported with DoRA (PEFT refuses it too)")
    return LoraSettings(
        r=_number(cfg, path, "r", 8, int),
        lora_alpha=_number(cfg, path, "lora_alpha", 8),
        use_rslora=bool(cfg.get("use_rslora", False)),
        rank_pattern=_patterns(cfg, path, "rank_pattern", int),
        alpha_pattern=_patterns(cfg, path, "alpha_pattern", float),
        target_modules=target,
        exclude_modules=exclude,
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
        modules_to_save=tuple(_str_list(path, "modules_to_save", cfg.get("modules_to_save") or [])),
        bias=bias,
        lora_bias=lora_bias,
        use_dora=use_dora,
    )


def _refuse_other_kinds(cfg: dict, path) -> None:
    peft_type = str(cfg.get("peft_type", "LORA"))
    if peft_type.upper() != "LORA":
        raise QtoolError(path, f"peft_type {peft_type}: only LORA adapters can be merged")
    for name, why in _REFUSED_FIELDS.items():
        if cfg.get(name):
            raise QtoolError(path, f"{name} is set: {why}")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_REWRITING_INITS):
        raise QtoolError(path, f"init_lora_weights={cfg['init_lora_weights']!r} rewrote the base weights at init; "
                               "convert the adapter with PEFT's path_initial_model_for_weight_conversion first")


def _selection(cfg: dict, path):
    """(target_modules, exclude_modules, layers_to_transform, layers_pattern), checked."""
    target = cfg.get("target_modules")
    if isinstance(target, str):
        if target.lower() != "all-linear":
            _check_regex(path, "target_modules", target)
    elif target is not None:
        target = _str_list(path, "target_modules", target)
    exclude = cfg.get("exclude_modules")
    if isinstance(exclude, str):
        _check_regex(path, "exclude_modules", exclude)
    elif exclude is not None:
        exclude = _str_list(path, "exclude_modules", exclude)
    layers = cfg.get("layers_to_transform")
    if layers is not None and not isinstance(layers, int):
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            raise QtoolError(path, f"layers_to_transform must be an integer or a list of integers, not {layers!r}")
    layers_pattern = cfg.get("layers_pattern")
    if layers_pattern is not None and not isinstance(layers_pattern, str):
        layers_pattern = _str_list(path, "layers_pattern", layers_pattern)
    if isinstance(target, str) and (layers is not None or layers_pattern is not None):
        raise QtoolError(path, "layers_to_transform/layers_pattern cannot be used when target_modules is a string")
    return target, exclude, layers, layers_pattern


def _number(cfg: dict, path, key: str, default, kind=float, positive: bool = True):
    v = cfg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v):
        raise QtoolError(path, f"{key} must be {'an integer' if kind is int else 'a number'}, not {v!r}")
    if positive and not v > 0:
        raise QtoolError(path, f"{key} must be positive, not {v!r}")
    return kind(v) if kind is int else v


def _patterns(cfg: dict, path, key: str, kind) -> dict:
    p = cfg.get(key) or {}
    if not isinstance(p, dict):
        raise QtoolError(path, f"{key} must be an object of module pattern -> value")
    for k, v in p.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or (kind is int and int(v) != v):
            raise QtoolError(path, f"{key}[{k!r}] must be a positive {'integer' if kind is int else 'number'}")
        _check_regex(path, key, k)
    return {k: (int(v) if kind is int else v) for k, v in p.items()}


def _str_list(path, key, value) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise QtoolError(path, f"{key} must be a string or a list of strings, not {value!r}")
    return list(value)


def _check_regex(path, key, pattern):
    try:
        re.compile(pattern)
    except re.error as e:
        raise QtoolError(path, f"{key} {pattern!r} is not a valid regular expression ({e})") from None
