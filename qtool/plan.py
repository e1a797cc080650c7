"""Decide, for every tensor of a checkpoint, whether it is quantized, why, and with which scheme.

The default follows the contract: 2-D floating weights of linear layers are quantized (qtool.arch says which those
are); embeddings, output heads, norms, biases and other 1-D tensors stay as they are unless `--include` asks.
`--exclude` wins over `--include`. Globs match the full tensor name or its module name. Each planned tensor carries
its own QuantSpec, so a plan can mix schemes (today every quantized tensor gets the job's one spec).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch

from . import arch
from .errors import QtoolError
from .quant.spec import QuantSpec


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one source tensor (`tensor`: its .name, .shape and .dtype, a TensorInfo for a checkpoint)."""

    tensor: object
    quantize: bool
    reason: str
    linear: bool  # a weight of a linear layer (quantized or listed in `ignore` when not)
    spec: QuantSpec | None = None  # the scheme of a quantized tensor

    @property
    def name(self) -> str:
        return self.tensor.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def module(self) -> str:
        return arch.module_of(self.name)


def _matches(name: str, patterns: Sequence[str]) -> str | None:
    module = arch.module_of(name)
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module, p):
            return p
    return None


def plan_tensor(t, spec: QuantSpec, config: dict | None, include: Sequence[str] = (),
                exclude: Sequence[str] = ()) -> TensorPlan:
    """The plan of one tensor (an object with .name, .shape, .dtype)."""
    role = arch.role(t.name, tuple(t.shape), t.dtype, config)
    quantize, reason = role.quantize, role.reason
    inc = _matches(t.name, include)
    exc = _matches(t.name, exclude)
    if exc is not None:
        quantize, reason = False, f"excluded by --exclude {exc!r}"
    elif inc is not None and not quantize:
        if t.dtype not in arch.FLOAT_DTYPES or len(t.shape) != 2:
            raise QtoolError(t.name, f"matched by --include {inc!r} but only 2-D floating weights can be quantized")
        if role.kind == "router":
            raise QtoolError(t.name, f"matched by --include {inc!r} but is an MoE router: routers stay dense "
                                     "(vLLM loads them unquantized)")
        if role.kind in _UNLOADABLE:
            raise QtoolError(t.name, f"matched by --include {inc!r}, but it is {_UNLOADABLE[role.kind]}: compressed-tensors "
                                     f"consumers (transformers, vLLM) load only nn.Linear weights packed, so it stays dense")
        if arch.tied_embeddings(config) and arch.is_head(arch.module_of(t.name)):
            raise QtoolError(t.name, "is tied to the input embeddings (tie_word_embeddings); quantizing it would untie them on reload")
        quantize, reason = True, f"included by --include {inc!r}"
    if quantize and spec.group_size > 0 and t.shape[1] % spec.group_size:
        raise QtoolError(t.name, f"input width {t.shape[1]} is not a multiple of group size {spec.group_size}; "
                                 f"pass --exclude '{arch.module_of(t.name)}' to keep it unquantized, or choose another --group-size")
    return TensorPlan(t, quantize, reason, role.linear, spec if quantize else None)


def plan_quantization(tensors: Iterable, spec: QuantSpec, config: dict | None = None,
                      include: Sequence[str] = (), exclude: Sequence[str] = (), source="checkpoint") -> list[TensorPlan]:
    """Plan every tensor (objects with .name, .shape, .dtype) of a checkpoint. Nothing is done silently wrong: a
    glob that matches no name and a plan that quantizes nothing are errors (naming `source`)."""
    tensors = list(tensors)
    tied = arch.tied_heads([t.name for t in tensors], config)
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for p in patterns:
            if not any(_matches(t.name, [p]) for t in tensors):
                head = next((h for h in tied if _matches(f"{h}.weight", [p])), None)
                why = (f": {head} is tied to the input embeddings (tie_word_embeddings), so the checkpoint stores no "
                       "weight for it and it stays tied and dense") if head else ""
                raise QtoolError(source, f"{flag} {p!r} matches no tensor or module name of the checkpoint{why}")
    plans = [plan_tensor(t, spec, config, include, exclude) for t in tensors]
    if not any(p.quantize for p in plans):
        raise QtoolError(source, _nothing_to_quantize(plans, config, exclude))
    return plans


# Tensors --include may not quantize: what they are, for the refusal.
_UNLOADABLE = {"embedding": "an embedding", "conv1d": "a GPT-2 Conv1D weight, not an nn.Linear one"}


def _nothing_to_quantize(plans: list[TensorPlan], config: dict | None, exclude: Sequence[str]) -> str:
    """Why a plan quantizes no tensor, and what to do about it."""
    kinds = {arch.role(p.name, p.shape, p.dtype, config).kind for p in plans}
    if "linear" in kinds:  # there were linear weights: the globs excluded them all
        return (f"nothing to quantize: --exclude {' '.join(repr(e) for e in exclude)} leaves no linear weight; "
                "narrow the globs")
    if "conv1d" in kinds:
        return ("nothing to quantize: GPT-2 Conv1D weights are not quantized by default (compressed-tensors consumers "
                "such as transformers and vLLM load only nn.Linear weights packed) and it has no other linear weight: "
                "keep this model dense, or quantize one whose layers are nn.Linear")
    heads = " (--include its output head to quantize that)" if "head" in kinds else ""
    return f"nothing to quantize: it has no 2-D floating linear weight{heads}"


def keep_nonfinite(plans: list[TensorPlan], read: Callable[[str], torch.Tensor]) -> list[TensorPlan]:
    """--allow-nonfinite: weights holding NaN/Inf stay unquantized. Which ones do decides the output layout, so they
    are found (one read each) before the files are planned."""
    out = []
    for p in plans:
        if p.quantize and not torch.isfinite(read(p.name)).all():
            p = replace(p, quantize=False, reason="kept unquantized: holds NaN/Inf (--allow-nonfinite)", spec=None)
        out.append(p)
    if not any(p.quantize for p in out):
        raise QtoolError(out[0].name if out else "checkpoint", "nothing to quantize: every linear weight holds NaN/Inf")
    return out


def ignore_list(plans: Iterable[TensorPlan], names: Iterable[str] = (), config: dict | None = None) -> list[str]:
    """compressed-tensors' `ignore` (sorted): the linear modules left dense, under the checkpoint's names (vLLM's)
    and, where transformers 5 renames one on load, under its name too (transformers' compressed path matches
    `ignore` against its own modules); and the output heads tied to the embeddings (arch.tied_heads) of the
    checkpoint whose tensor `names` and `config` are given."""
    kept = {p.module for p in plans if p.linear and not p.quantize}
    renamed = {arch.TRANSFORMERS_NAMES[m] for m in kept if m in arch.TRANSFORMERS_NAMES}
    return sorted(kept | renamed | set(arch.tied_heads(names, config)))
