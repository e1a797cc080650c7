"""LoRA adapters run beside a shared base layer (dense or quantized), attached from PEFT folders and swapped
without touching the base.

The math is PEFT's forward (peft 0.21.2 `tuners/lora/layer.py::Linear.forward`, `variants.py`, `dora.py`): the
input is cast to the adapter's dtype (float32, as PEFT upcasts adapters), `y = base(x) + s·B(A(drop(x)))` (B
carries lora_bias), the sum is cast back to the base output's dtype; DoRA adds
`(m/‖W + s·BA‖ − 1)·(base(x) − b) + (m/‖·‖)·s·B(A(x))`, the norm detached, and while training with dropout both
its terms use the dropped input (the base term then without bias). Trainable adapters get gradients through a
QuantLinear base without a dense weight ever being stored (its backward pass dequantizes tiles again).
Which modules an adapter targets, its scaling (alpha/r, rsLoRA alpha/√r, rank/alpha patterns) and what it may
hold come from `qtool.lora`, the same code merge-lora uses.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import is_conv1d_module, linear_features
from ..checkpoint import open_checkpoint
from ..errors import QtoolError
from ..lora.adapter import read_adapter
from ..lora.plan import check_variant
from ..lora.targets import PREFIX, is_targeted
from .quant_linear import QuantLinear


def _features(base: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear-like base layer."""
    if is_conv1d_module(base) or isinstance(base, (nn.Linear, QuantLinear)):
        return linear_features(base)
    raise TypeError(f"LoRALinear wraps nn.Linear, QuantLinear or transformers Conv1D, not {type(base).__name__}")


class LoraAdapter(nn.Module):
    """One adapter's tensors for one layer: A [r, in], B [out, r], optional lora_B bias [out] and DoRA
    magnitude [out]; frozen unless made trainable (set_trainable). `config` is the whole adapter's PEFT
    LoraConfig as a dict (shared by its layers; save_adapter writes it); `dropout` PEFT's lora_dropout."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None,
                 magnitude: torch.Tensor | None = None, dropout: float = 0.0, config: dict | None = None):
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=False)
        self.B = nn.Parameter(B, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.magnitude = None if magnitude is None else nn.Parameter(magnitude, requires_grad=False)
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.config = config
        self._norm: torch.Tensor | None = None  # DoRA's ‖W + s·BA‖ per row, cached while A and B are frozen

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """B(A(x)), PEFT's lora_B(lora_A(x)) (lora_B's bias included)."""
        return F.linear(F.linear(x, self.A), self.B, self.bias)


class LoRALinear(nn.Module):
    """A base linear layer plus named LoRA adapters; any mix of them is active at a time.

    `set_adapter("a")` runs one adapter, `set_adapter(None)` only the base, `set_adapter({"a": 0.7, "b": 0.3})`
    the weighted sum `base(x) + Σ wᵢ·sᵢ·Bᵢ(Aᵢ(x))` (merge-lora's `W + Σ wᵢ·sᵢ·BᵢAᵢ`, never merged). Adding or
    switching adapters never changes the base layer's tensors.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.out_features, self.in_features = _features(base)
        self.base = base
        self.adapters = nn.ModuleDict()
        self.active: dict[str, float] = {}

    def add_adapter(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float,
                    bias: torch.Tensor | None = None, magnitude: torch.Tensor | None = None, dropout: float = 0.0,
                    config: dict | None = None) -> None:
        if name in self.adapters:
            raise QtoolError(name, "an adapter of this name is already attached")
        if tuple(A.shape[1:]) != (self.in_features,) or tuple(B.shape) != (self.out_features, A.shape[0]):
            raise QtoolError(name, f"LoRA A {list(A.shape)} / B {list(B.shape)} do not fit a layer of "
                                   f"[{self.out_features}, {self.in_features}]")
        device = _device_of(self.base)
        move = (lambda t: None if t is None else t.to(device))
        self.adapters[name] = LoraAdapter(move(A), move(B), scaling, move(bias), move(magnitude), dropout, config)

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]
        self.active.pop(name, None)

    def set_adapter(self, adapters: str | None | Mapping[str, float] | Iterable[str]) -> None:
        """None: base only; a name; several names (each weight 1); or {name: weight}."""
        mix = _as_mix(adapters)
        for name, w in mix.items():
            if name not in self.adapters:
                raise QtoolError(name, "no adapter of this name on the layer")
            if self.adapters[name].magnitude is not None and (len(mix) > 1 or w != 1.0):
                raise QtoolError(name, "a DoRA adapter runs only alone and with weight 1 (its norm rescale is "
                                       "not additive)")
        self.active = mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if not self.active:
            return result
        out_dtype = result.dtype
        for name, w in self.active.items():
            ad = self.adapters[name]
            xa = ad.dropout(x.to(ad.A.dtype))
            s = ad.scaling if w == 1.0 else ad.scaling * w
            if ad.magnitude is None:  # result + B(A(x))·s, summed in place (the same bits): fewer temporaries
                result = ad.delta(xa).mul_(s).add_(result)
                continue
            scale = (ad.magnitude / self._dora_norm(ad)).view(1, -1)
            if self.training and not isinstance(ad.dropout, nn.Identity):
                base_result = self._unbiased_base(xa)  # PEFT: F.linear(dropout(x), W)
            else:
                bias = getattr(self.base, "bias", None)
                base_result = result if bias is None else result - bias
            result = result + (scale - 1) * base_result + scale * ad.delta(xa) * s
        return result.to(out_dtype)

    def _unbiased_base(self, x: torch.Tensor) -> torch.Tensor:
        """x @ Wᵀ without the bias, in x's dtype (a QuantLinear multiplies any dtype itself)."""
        if isinstance(self.base, QuantLinear):
            out = self.base(x)
            return out if self.base.bias is None else out - self.base.bias.to(out.dtype)
        W = self.base.weight.T if is_conv1d_module(self.base) else self.base.weight
        return F.linear(x, W.to(x.dtype))

    # ---- DoRA -----------------------------------------------------------------------------------------------
    def _dora_norm(self, ad: LoraAdapter) -> torch.Tensor:
        """‖W + s·B@A‖₂ of each output row (PEFT get_weight_norm, detached), tile by tile for a QuantLinear."""
        training = ad.A.requires_grad or ad.B.requires_grad
        if ad._norm is not None and not training:
            return ad._norm
        norm = weight_norm(self.base, ad.A, ad.B, ad.scaling)
        if not training:
            ad._norm = norm
        return norm

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, active={self.active}"


def weight_norm(base: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """‖W + s·B@A‖₂ of each output row of a base layer, in A's dtype, without gradient; tile by tile for a
    QuantLinear (its dense weight is never whole)."""
    with torch.no_grad():
        A, B = A.detach(), B.detach()
        if isinstance(base, QuantLinear):
            step, out_f = base.tile_rows(), base.out_features
            return torch.cat([torch.linalg.norm(base.dequantize_rows(r0, min(r0 + step, out_f), A.dtype)
                                                + scaling * (B[r0:r0 + step] @ A), dim=1)
                              for r0 in range(0, out_f, step)])
        W = base.weight.T if is_conv1d_module(base) else base.weight
        return torch.linalg.norm(W.to(A.dtype) + scaling * (B @ A), dim=1)


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _as_mix(adapters) -> dict[str, float]:
    if adapters is None:
        return {}
    if isinstance(adapters, str):
        return {adapters: 1.0}
    if isinstance(adapters, Mapping):
        mix = {str(k): float(v) for k, v in adapters.items()}
    else:
        mix = {str(k): 1.0 for k in adapters}
    for k, v in mix.items():
        if v != v or v in (float("inf"), float("-inf")):
            raise QtoolError(k, f"weight {v!r} is not a finite number")
    return mix


# ---- whole models -------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for layer in lora_layers(model).values():
        names.extend(n for n in layer.adapters if n not in names)
    return names


def set_adapter(model: nn.Module, adapters: str | None | Mapping[str, float] | Iterable[str]) -> None:
    """Activate an adapter (or a weighted mix, or None for the base) on every LoRALinear of the model.
    A layer the adapter does not target runs its base for that adapter."""
    mix = _as_mix(adapters)
    known = adapter_names(model)
    for name in mix:
        if name not in known:
            raise QtoolError(name, f"no adapter of this name is attached (attached: {known})")
    for layer in lora_layers(model).values():
        layer.set_adapter({n: w for n, w in mix.items() if n in layer.adapters})


def detach_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter from every layer; layers left without adapters keep their LoRALinear wrapper."""
    if name not in adapter_names(model):
        raise QtoolError(name, "no adapter of this name is attached")
    for layer in lora_layers(model).values():
        if name in layer.adapters:
            layer.remove_adapter(name)


def attach_adapter(model: nn.Module, adapter_path: str | os.PathLike, name: str | None = None,
                   activate: bool = True, trainable: bool = False) -> str:
    """Attach a PEFT LoRA adapter folder (or cached hub id) to a loaded model and return its name.

    Targeted linears (nn.Linear, QuantLinear, transformers Conv1D) are wrapped in LoRALinear once and share
    their base. The adapter is checked as merge-lora checks it: every tensor must land on a module its
    target rules select, with the rank its config gives. Adapters that replace base tensors
    (modules_to_save, bias="all"/"lora_only") or put LoRA on embeddings are refused: they cannot be swapped
    on a shared base. activate: make it the active adapter of the whole model (otherwise use set_adapter).
    trainable: fine-tune it (set_trainable: its factors get gradients, every other parameter is frozen; the
    config's lora_dropout applies in train mode); otherwise it is frozen.
    """
    ckpt = open_checkpoint(adapter_path)
    ad = read_adapter(ckpt, str(adapter_path))
    name = name or ("default" if "default" not in adapter_names(model) else Path(str(adapter_path)).name)
    if name in adapter_names(model):
        raise QtoolError(name, "an adapter of this name is already attached")
    placed = _placements(model, ad)
    config = dict(ckpt.adapter_config)
    dropout = float(config.get("lora_dropout") or 0.0)
    for m, lm in placed:  # all checked: now change the model
        wrap(model, m).add_adapter(name, lm.A, lm.B, ad.settings.scaling(m), lm.bias, lm.magnitude, dropout, config)
    if activate:
        set_adapter(model, name)
    if trainable:
        set_trainable(model, name)
    return name


def _placements(model: nn.Module, ad) -> list:
    """(module name, LoraModule) of every module the adapter puts LoRA on, each checked against the model."""
    s = ad.settings
    if ad.unprefixed:
        raise QtoolError(ad.unprefixed[0], f"adapter key lacks PEFT's '{PREFIX}' prefix; PEFT would ignore it")
    if ad.full:
        first = next(iter(ad.full.values()))
        raise QtoolError(first, "the adapter replaces base tensors (modules_to_save or bias=all/lora_only), which "
                                "cannot be swapped on a shared base; merge it with `qtool merge-lora` instead")
    placed = []
    for m, lm in sorted(ad.modules.items()):
        if lm.embedding:
            raise QtoolError(lm.keys[0], "LoRA on embeddings is not supported by LoRALinear; merge it instead")
        if not is_targeted(s, m):
            raise QtoolError(lm.keys[0], f"module {m} is not selected by the adapter's target rules; PEFT would "
                                         "ignore these tensors")
        r, _alpha = s.rank_alpha(m)
        if lm.rank != r:
            raise QtoolError(lm.keys[0], f"lora rank is {lm.rank} but the config (r/rank_pattern) says {r}")
        check_variant(ad, lm)
        try:
            target = model.get_submodule(m)
            out_in = _features(target.base if isinstance(target, LoRALinear) else target)
        except AttributeError:
            raise QtoolError(lm.keys[0], f"the model has no module {m}") from None
        except TypeError as e:
            raise QtoolError(m, str(e)) from None
        if out_in != (lm.b_shape[0], lm.a_shape[1]):
            raise QtoolError(lm.keys[0], f"LoRA shapes give a [{lm.b_shape[0]}, {lm.a_shape[1]}] layer but {m} "
                                         f"is [{out_in[0]}, {out_in[1]}]")
        placed.append((m, lm))
    return placed


def wrap(model: nn.Module, name: str) -> LoRALinear:
    """The LoRALinear at `name`, wrapping the linear layer there on first use."""
    target = model.get_submodule(name)
    if isinstance(target, LoRALinear):
        return target
    wrapped = LoRALinear(target)
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, wrapped)
    return wrapped


def set_trainable(model: nn.Module, name: str | None) -> None:
    """Train adapter `name` as PEFT does: its factors (A, B, lora bias, DoRA magnitude) require gradients and
    every other parameter of the model (base weights, embeddings, norms, other adapters) is frozen.
    None freezes everything."""
    if name is not None and name not in adapter_names(model):
        raise QtoolError(name, "no adapter of this name is attached")
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        if name in layer.adapters:
            for p in layer.adapters[name].parameters():
                p.requires_grad_(True)
