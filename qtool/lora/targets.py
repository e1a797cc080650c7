"""PEFT's rules for which module an adapter tensor belongs to, whether its config targets it, and its orientation.

Adapter files name tensors `base_model.model.<module>.<role>` (peft 0.21.2 save format, adapter name removed;
a name left in, `lora_A.default.weight`, is accepted as PEFT's loader accepts it). `<module>` is the module path
of the model PEFT wrapped, i.e. the base checkpoint's names with the parameter suffix removed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import QtoolError
from .. import arch
from .config import LoraSettings

PREFIX = "base_model.model."

# role -> pattern on the key after PREFIX; the optional `\.[^.]+` is an adapter name left in the key.
_ROLES = (
    ("A", re.compile(r"^(?P<m>.+)\.lora_A(?:\.[^.]+)?\.weight$")),
    ("B", re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?\.weight$")),
    ("B_bias", re.compile(r"^(?P<m>.+)\.lora_B(?:\.[^.]+)?\.bias$")),
    ("emb_A", re.compile(r"^(?P<m>.+)\.lora_embedding_A(?:\.[^.]+)?$")),
    ("emb_B", re.compile(r"^(?P<m>.+)\.lora_embedding_B(?:\.[^.]+)?$")),
    ("magnitude", re.compile(r"^(?P<m>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")),
)
# Any other `lora_*` segment is a tensor of a LoRA variant qtool does not know (lora_E, lora_diag, ...).
_UNKNOWN_LORA = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")
# Saved full tensors (bias="all"/"lora_only", modules_to_save, saved embeddings) may carry wrapper infixes.
_WRAPPER_INFIX = re.compile(r"\.(base_layer|modules_to_save\.[^.]+)(?=\.)")



@dataclass(frozen=True)
class AdapterKey:
    key: str        # as stored in the adapter file
    role: str       # A, B, B_bias, emb_A, emb_B, magnitude, full (a saved full tensor that replaces the base's)
    target: str     # module name for LoRA roles; base tensor name for `full`


def classify_key(key: str) -> AdapterKey | None:
    """Role and module of one adapter tensor; None when the key lacks PEFT's `base_model.model.` prefix
    (PEFT itself would ignore such a key and merge nothing)."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    for role, pattern in _ROLES:
        m = pattern.match(rest)
        if m:
            return AdapterKey(key, role, m.group("m"))
    if _UNKNOWN_LORA.search(rest):
        raise QtoolError(key, "adapter tensor of an unknown LoRA variant; its merge is not implemented")
    return AdapterKey(key, "full", _WRAPPER_INFIX.sub("", rest))


def is_targeted(s: LoraSettings, module: str) -> bool:
    """PEFT's check_target_module_exists for a module name (`all-linear` cannot see module classes in a
    checkpoint, so it accepts every module not excluded; the saved PEFT configs expand it to a list anyway)."""
    if s.exclude_modules:
        if isinstance(s.exclude_modules, str):
            if re.fullmatch(s.exclude_modules, module):
                return False
        elif module in s.exclude_modules or any(module.endswith("." + x) for x in s.exclude_modules):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in s.modules_to_save):
        return False
    target = s.target_modules
    if target is None:
        return False
    if isinstance(target, str):
        return target.lower() == "all-linear" or re.fullmatch(target, module) is not None
    if module in target:
        return True  # listed verbatim: layers_to_transform does not apply (PEFT returns before it)
    if not any(module.endswith("." + t) for t in target):
        return False
    layers = s.layers_to_transform
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = layer_index(module, s.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def layer_index(module: str, layers_pattern) -> int | None:
    """The layer number PEFT reads from a module name: the first numbered segment (after layers_pattern)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        m = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def is_conv1d(module: str, weight_shape: tuple, out_in: tuple[int, int], base_config: dict | None) -> bool:
    """Whether a LoRA'd module is a transformers Conv1D (weight [in, out]) rather than nn.Linear ([out, in]).

    Decided by the architecture in config.json, not the adapter's fan_in_fan_out flag (PEFT forces that flag per
    layer type at load). Without config.json, a non-square shape decides; a square one is refused for Conv1D-style
    names rather than guessed.
    """
    out_f, in_f = out_in
    conv = arch.is_conv1d(module, base_config)
    if conv is None:
        if arch.conv1d_name(module) and out_f == in_f:
            raise QtoolError(module, "no config.json: cannot tell a square GPT-2 Conv1D weight from a Linear one")
        conv = tuple(weight_shape) == (in_f, out_f) and out_f != in_f
    want = (in_f, out_f) if conv else (out_f, in_f)
    if tuple(weight_shape) != want:
        raise QtoolError(module, f"LoRA shapes A/B give a {'Conv1D' if conv else 'Linear'} weight of shape "
                                 f"{list(want)}, but the base weight is {list(weight_shape)}")
    return conv
