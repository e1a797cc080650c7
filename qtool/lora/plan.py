"""Match adapters to a base checkpoint: which base tensor changes how, checked before anything is written.

Every adapter tensor must land on a base tensor; keys that match none are counted and refused (PEFT would warn
and merge nothing). The result maps base tensor names to what happens to them; names not in it are copied.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import QtoolError
from .adapter import Adapter, LoraModule
from .merge import LoraTerm
from .targets import PREFIX, is_conv1d, is_targeted


@dataclass(frozen=True)
class ModuleWeight:
    """Where a module's weight lives in the base: a plain `<module>.weight`, or a quantized one (its packed
    tensor name and the logical [out, in] shape)."""

    name: str
    shape: tuple
    quantized: bool = False


@dataclass(frozen=True)
class PlannedTerm:
    """One adapter's update of one module as planned: what it needs to be computed, not its tensors (A and B are
    read when the module is merged: `load()`). bias, magnitude, scaling and weight as on LoraTerm."""

    lora: LoraModule
    scaling: float
    kind: str
    weight: float = 1.0

    @property
    def bias(self):
        return self.lora.bias

    @property
    def magnitude(self):
        return self.lora.magnitude

    def load(self) -> LoraTerm:
        return LoraTerm(self.lora.A, self.lora.B, self.scaling, self.kind, self.lora.bias, self.lora.magnitude,
                        self.weight)


@dataclass
class TensorOp:
    """What happens to one base tensor: start from the base (or an adapter's full copy), then add LoRA terms."""

    name: str
    module: str
    role: str                                   # weight | bias | full
    terms: list[PlannedTerm] = field(default_factory=list)
    replace: tuple | None = None                # (Adapter, adapter key) of a full tensor replacing the base's
    quantized: bool = False


@dataclass
class MergePlan:
    ops: dict[str, TensorOp]
    modules: dict[str, list[tuple[int, int, float]]]  # module -> [(adapter index, rank, scaling)]


def module_weights(tensors: dict) -> dict[str, ModuleWeight]:
    """Plain (unquantized) modules of a base: `<module>.weight` -> its shape."""
    return {n[: -len(".weight")]: ModuleWeight(n, tuple(i.shape)) for n, i in tensors.items() if n.endswith(".weight")}


def plan_merge(base_tensors: dict, base_config: dict | None, adapters: list[Adapter], weights: list[float],
               weights_of: dict[str, ModuleWeight] | None = None) -> MergePlan:
    """Build and check the plan. `base_tensors`: name -> TensorInfo; `weights_of` overrides module_weights()
    for quantized modules."""
    if len(weights) != len(adapters):
        raise QtoolError("--weight", f"{len(weights)} weights given for {len(adapters)} adapters")
    wmap = module_weights(base_tensors)
    wmap.update(weights_of or {})
    plan = MergePlan({}, {})
    for i, (ad, w) in enumerate(zip(adapters, weights)):
        _check_weight(ad, w, len(adapters))
        unmatched = list(ad.unprefixed)
        unmatched += [k for m, lm in ad.modules.items() if m not in wmap for k in lm.keys]
        unmatched += [k for name, k in ad.full.items() if name not in base_tensors]
        if unmatched:
            raise QtoolError(ad.source, _unmatched_message(unmatched, len(ad.ckpt.tensors), wmap))
        for name, key in sorted(ad.full.items()):
            _plan_full(plan, ad, name, key, base_tensors)
        for m, lm in sorted(ad.modules.items()):
            _plan_module(plan, i, ad, w, m, lm, wmap[m], base_tensors, base_config)
    return plan


def _plan_full(plan: MergePlan, ad: Adapter, name: str, key: str, base_tensors: dict) -> None:
    """A full tensor of the adapter (modules_to_save, bias="all"/"lora_only") replaces the base's."""
    base_shape, shape = tuple(base_tensors[name].shape), tuple(ad.ckpt.tensors[key].shape)
    if base_shape != shape:
        raise QtoolError(key, f"shape {list(shape)} does not match base tensor {name} {list(base_shape)}")
    op = plan.ops.setdefault(name, TensorOp(name, name.rsplit(".", 1)[0], "full"))
    if op.replace is not None:
        raise QtoolError(key, f"{op.replace[0].source} also replaces {name}; two full copies conflict")
    op.replace = (ad, key)


def _plan_module(plan: MergePlan, i: int, ad: Adapter, w: float, m: str, lm: LoraModule, mw: ModuleWeight,
                 base_tensors: dict, base_config: dict | None) -> None:
    """One adapter's LoRA update of module `m`: checked against the target rules, its rank, the base weight's shape
    and orientation, then added to the weight's op (and its lora_bias to the bias's)."""
    s = ad.settings
    if not is_targeted(s, m):
        raise QtoolError(lm.keys[0], f"module {m} is not selected by the adapter's target rules "
                                     "(target_modules/exclude_modules/layers_to_transform); PEFT would "
                                     "ignore these tensors")
    r, _alpha = s.rank_alpha(m)
    if lm.rank != r:
        raise QtoolError(lm.keys[0], f"lora rank is {lm.rank} but the config (r/rank_pattern) says {r}")
    kind = _kind(m, lm, mw, base_config)
    check_variant(ad, lm)
    term = PlannedTerm(lm, s.scaling(m), kind, w)
    op = plan.ops.setdefault(mw.name, TensorOp(mw.name, m, "weight", quantized=mw.quantized))
    op.role = "weight"
    op.quantized = mw.quantized
    if op.terms and (term.magnitude is not None or op.terms[0].magnitude is not None):
        raise QtoolError(lm.keys[0], "DoRA adapters merge only alone (the norm rescale is not additive)")
    op.terms.append(term)
    plan.modules.setdefault(m, []).append((i, lm.rank, term.scaling))
    if lm.bias is not None:
        bname = f"{m}.bias"
        if bname not in base_tensors:
            raise QtoolError(lm.keys[0], f"lora_bias is set but the base has no {bname}")
        bop = plan.ops.setdefault(bname, TensorOp(bname, m, "bias"))
        bop.role = "bias"
        bop.terms.append(term)


def _kind(m: str, lm: LoraModule, mw: ModuleWeight, base_config: dict | None) -> str:
    """linear, conv1d or embedding: how ΔW = s·B@A lies on the base weight (whose shape must fit)."""
    if lm.embedding:
        want = (lm.a_shape[1], lm.b_shape[0])
        if mw.shape != want:
            raise QtoolError(lm.keys[0], f"embedding LoRA gives a weight of shape {list(want)}, "
                                         f"but the base weight is {list(mw.shape)}")
        return "embedding"
    if mw.quantized:  # packed weights are always stored [out, in]
        if mw.shape != (lm.b_shape[0], lm.a_shape[1]):
            raise QtoolError(lm.keys[0], f"LoRA shapes give a weight of shape "
                                         f"{[lm.b_shape[0], lm.a_shape[1]]}, but the base is {list(mw.shape)}")
        return "linear"
    return "conv1d" if is_conv1d(m, mw.shape, (lm.b_shape[0], lm.a_shape[1]), base_config) else "linear"


def _check_weight(ad: Adapter, w: float, n: int) -> None:
    if not isinstance(w, (int, float)) or w != w or w in (float("inf"), float("-inf")):
        raise QtoolError(ad.source, f"weight {w!r} is not a finite number")
    if ad.settings.use_dora and n > 1:
        raise QtoolError(ad.source, "a DoRA adapter merges only alone (its norm rescale is not additive)")
    if w != 1.0 and ad.settings.use_dora:
        raise QtoolError(ad.source, f"weight {w}: a DoRA merge has no weighted form; use weight 1")
    if w != 1.0 and ad.full:
        raise QtoolError(ad.source, f"weight {w}: the adapter replaces {len(ad.full)} base tensors "
                                    "(modules_to_save/bias), which has no weighted form; use weight 1")


def check_variant(ad: Adapter, lm) -> None:
    s = ad.settings
    if s.use_dora and lm.magnitude is None:
        raise QtoolError(lm.keys[0], f"use_dora is set but {lm.module} has no lora_magnitude_vector")
    if not s.use_dora and lm.magnitude is not None:
        raise QtoolError(lm.keys[0], f"{lm.module} has a lora_magnitude_vector but use_dora is not set")
    if s.lora_bias and lm.bias is None and not lm.embedding:
        raise QtoolError(lm.keys[0], f"lora_bias is set but {lm.module} has no lora_B.bias")
    if not s.lora_bias and lm.bias is not None:
        raise QtoolError(lm.keys[0], f"{lm.module} has a lora_B.bias but lora_bias is not set")


def _unmatched_message(keys: list[str], total: int, wmap: dict) -> str:
    first = keys[0]
    msg = f"{len(keys)} of {total} adapter tensors match no base tensor (first: {first})"
    if not first.startswith(PREFIX):
        return msg + f"; PEFT adapter keys start with '{PREFIX}' and PEFT would silently ignore these"
    rest = first[len(PREFIX):]
    hint = next((p for p in ("model.", "transformer.", "bert.") if any(m.startswith(p + rest.split(".lora_")[0])
                                                                      for m in wmap)), None)
    if hint:
        msg += f"; the base names start with '{hint}' (adapter trained on a bare backbone?)"
    return msg
