"""Decide, for every tensor of a checkpoint, whether it is quantized, why, and with which scheme.

The default follows the contract: 2-D floating weights of linear layers are quantized (qtool.arch says which those
are); embeddings, output heads, norms, biases and other 1-D tensors stay as they are unless `--include` asks.
`--exclude` wins over `--include`. Globs match the full tensor name or its module name. Each planned tensor carries
its own QuantSpec: the first `--scheme GLOB=SPEC` rule that matches it, else the job's global spec (or, when an
allocation picks the schemes, none yet). Modules a serving engine fuses (qtool.arch.fused_groups) must end up with
one scheme: a rule that would split them is refused.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch

from . import arch
from .errors import ArgumentError, QtoolError
from .quant.spec import DEFAULT_GROUP_SIZE, QuantSpec, parse_spec, spec_text


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


@dataclass(frozen=True)
class SchemeRule:
    """One `--scheme GLOB=SPEC` (`text`, as given): tensors or modules matching `glob` get `spec` (None: dense)."""

    glob: str
    spec: QuantSpec | None
    text: str

    @property
    def option(self) -> str:
        """How errors and reasons name it."""
        return f"--scheme {self.text!r}"


def spec_defaults(spec: QuantSpec) -> dict:
    """The global options that fill a SPEC's unset parts: symmetry and method, and the group size when it is not
    just the default of the global bits (a SPEC of other bits then gets its own bits' default)."""
    explicit = spec.group_size != DEFAULT_GROUP_SIZE[spec.bits]
    return {"symmetric": spec.symmetric, "group_size": spec.group_size if explicit else None, "method": spec.method}


def parse_rules(texts: Iterable[str], spec: QuantSpec) -> list[SchemeRule]:
    """`GLOB=SPEC` strings as rules, SPECs completed from the global `spec`; a bad one is a QtoolError naming it."""
    rules = []
    for text in texts:
        glob, sep, spec_part = str(text).rpartition("=")
        if not sep or not glob:
            raise ArgumentError(f"--scheme {text!r}", "is not GLOB=SPEC (e.g. '*.down_proj=int8')")
        try:
            rules.append(SchemeRule(glob, parse_spec(spec_part, **spec_defaults(spec)), str(text)))
        except ValueError as e:
            raise ArgumentError(f"--scheme {text!r}", str(e)) from None
    return rules


def plan_tensor(t, spec: QuantSpec | None, config: dict | None, include: Sequence[str] = (),
                exclude: Sequence[str] = (), rules: Sequence[SchemeRule] = ()) -> TensorPlan:
    """The plan of one tensor (an object with .name, .shape, .dtype). `spec` None: a quantized tensor no rule
    decides is left for the allocation (its spec stays None for now)."""
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
    rule = _matching_rule(t.name, rules) if quantize else None
    if rule is not None:
        spec = rule.spec
        if spec is None:
            return TensorPlan(t, False, f"kept dense by {rule.option}", role.linear)
    if quantize and spec is not None and spec.group_size > 0 and t.shape[1] % spec.group_size:
        fix = f"change {rule.option}" if rule is not None else "choose another --group-size"
        raise QtoolError(t.name, f"input width {t.shape[1]} is not a multiple of group size {spec.group_size}; "
                                 f"pass --exclude '{arch.module_of(t.name)}' to keep it unquantized, or {fix}")
    return TensorPlan(t, quantize, reason, role.linear, spec if quantize else None)


def _matching_rule(name: str, rules: Sequence[SchemeRule]) -> SchemeRule | None:
    for rule in rules:
        if _matches(name, (rule.glob,)) is not None:
            return rule
    return None


def plan_quantization(tensors: Iterable, spec: QuantSpec | None, config: dict | None = None,
                      include: Sequence[str] = (), exclude: Sequence[str] = (), source="checkpoint",
                      rules: Sequence[SchemeRule] = ()) -> list[TensorPlan]:
    """Plan every tensor (objects with .name, .shape, .dtype) of a checkpoint. Nothing is done silently wrong: a
    glob that matches no name and a plan that quantizes nothing are errors (naming `source`). With `rules`: each
    must decide at least one quantized tensor, and no fused group may be split (QtoolError naming the rule)."""
    tensors = list(tensors)
    tied = arch.tied_heads([t.name for t in tensors], config)
    for flag, patterns in (("--include", include), ("--exclude", exclude)):
        for p in patterns:
            if not any(_matches(t.name, [p]) for t in tensors):
                head = next((h for h in tied if _matches(f"{h}.weight", [p])), None)
                why = (f": {head} is tied to the input embeddings (tie_word_embeddings), so the checkpoint stores no "
                       "weight for it and it stays tied and dense") if head else ""
                raise QtoolError(source, f"{flag} {p!r} matches no tensor or module name of the checkpoint{why}")
    plans = [plan_tensor(t, spec, config, include, exclude, rules) for t in tensors]
    if rules:
        candidates = [p for p in plans if p.quantize or p.reason.startswith("kept dense by --scheme")]
        _check_rules(candidates, rules, spec)
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


def _check_rules(candidates: list[TensorPlan], rules: Sequence[SchemeRule], spec: QuantSpec | None) -> None:
    """Every rule matches a candidate; the members of every fused group get one scheme. A module no rule decides
    gets `spec`, or (spec None) whatever the allocation picks for its group, which no rule may then pin in part."""
    decided = {p.module: _matching_rule(p.name, rules) for p in candidates}
    for rule in rules:
        if not any(_matches(p.name, (rule.glob,)) for p in candidates):
            raise QtoolError(rule.option, "matches no tensor that is quantized (--include/--exclude decide which "
                                          "tensors are candidates)")
    allocated = object()
    for group in arch.fused_groups(decided):
        got = {m: decided[m].spec if decided[m] else (spec or allocated) for m in group.members}
        if len(set(got.values())) > 1:
            culprit = next(r for r in rules if r in (decided[m] for m in group.members))
            said = "; ".join(f"{arch.leaf(m)}: {spec_text(decided[m].spec) if decided[m] else 'no rule'}"
                             for m in group.members)
            raise QtoolError(culprit.option, f"splits the fused group {group.name} ({said}), which vLLM runs as one "
                                             "layer with one scheme: give all its modules the same SPEC")


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
