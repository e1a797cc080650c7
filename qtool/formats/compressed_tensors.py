"""compressed-tensors `pack-quantized` (weight-only int4/int8): the stored parts of one quantized Linear
(`PackedModule`), their layout (`layout`), and config.json's `quantization_config` in (`detect`) and out
(`Scheme.to_config`).

Tensors per quantized Linear `<module>` (CT 0.20.1, `compressors/pack_quantized/base.py`), by local name:
  weight_packed      int32 [out, ceil(in*bits/32)]   codes + 2^(bits-1), LSB first along the input dim
  weight_scale       scale dtype: tensor (1,), channel (out, 1), group (out, n_groups)
  weight_shape       int64 [2] = [out, in]
  weight_zero_point  asymmetric only: int32 [ceil(out*bits/32), n_groups] packed along dim 0
                     (tensor strategy: int8 (1,), unpacked, as CT writes it)
A checkpoint names them `<module>.<local name>`; everything here speaks local names, `PackedModule.named` adds the
module. A `quantization_config` may hold several config groups with different schemes: `Scheme.spec_for(module)`
says which one a module has, by compressed-tensors' own precedence (exact name, then `re:` pattern, then class).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..errors import QtoolError
from ..quant.core import SCALE_DTYPES, dequantize
from ..quant.pack import pack_int32, packed_len, packed_shape, unpack_int32
from ..quant.spec import QuantSpec, spec_text
from ..quant.weight import QuantizedWeight

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.1"  # the compressed-tensors release whose layout and config block qtool matches
PROVIDER = "qtool"
TARGETS = ["Linear"]
# What vLLM's weight-only path (CompressedTensorsWNA16, Marlin/Machete kernels) serves: groups of 32, 64 or 128
# columns, or one scale per output channel (-1); per-tensor scales and other group sizes (16, 256...) it does not.
VLLM_GROUP_SIZES = (32, 64, 128, -1)
PACKED, SCALE, SHAPE, ZERO_POINT = "weight_packed", "weight_scale", "weight_shape", "weight_zero_point"
PARTS = (PACKED, SCALE, SHAPE, ZERO_POINT)
# strategies whose zero points CT packs along dim 0 (PACK_ZP_STRATS)
_PACKED_ZP = ("group", "channel")
# a packed module is a Linear: the class targets of a config group that match it
_LINEAR_CLASSES = {"Linear", "LinearBase"}


# --- names ---------------------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str] | None:
    """'model.x.q_proj.weight_scale' -> ('model.x.q_proj', 'weight_scale'); None for other names."""
    prefix, _, local = name.rpartition(".")
    return (prefix, local) if local in PARTS else None


def packed_modules(names: Iterable[str]) -> dict[str, list[str]]:
    """{module: the local part names it stores} for every module of a listing that stores `weight_packed`, sorted."""
    parts: dict[str, list[str]] = {}
    for name in names:
        split = split_name(name)
        if split is not None:
            parts.setdefault(split[0], []).append(split[1])
    return {m: sorted(p) for m, p in sorted(parts.items()) if PACKED in p}


# --- layout --------------------------------------------------------------------------------------

def _zp_packed(spec: QuantSpec) -> bool:
    return not spec.symmetric and spec.strategy in _PACKED_ZP


def layout(shape, spec: QuantSpec, scale_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{local name: (shape, dtype)} of every part stored for an [out, in] weight under `spec`, in sorted name order,
    without touching data (the writer plans headers from it). `scale_dtype`: the source weight's dtype as
    qtool.quant.core.scale_dtype_for keeps it."""
    out, inp = (int(s) for s in shape)
    sshape = spec.scale_shape(out, inp)
    parts = {PACKED: (packed_shape(out, inp, spec.bits), torch.int32), SCALE: (sshape, scale_dtype),
             SHAPE: ((2,), torch.int64)}
    if not spec.symmetric:
        parts[ZERO_POINT] = ((packed_len(out, spec.bits), sshape[1]), torch.int32) if _zp_packed(spec) else (sshape, torch.int8)
    return dict(sorted(parts.items()))


# --- one module ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedModule:
    """One pack-quantized Linear: its stored tensors by local name, its logical [out, in] shape and its scheme."""

    spec: QuantSpec
    shape: tuple[int, int]
    parts: dict[str, torch.Tensor]

    @classmethod
    def from_weight(cls, qw: QuantizedWeight) -> "PackedModule":
        """The stored parts of a quantized weight (zero points packed along the output dim where CT packs them)."""
        out, inp = qw.shape
        parts = {PACKED: qw.packed, SCALE: qw.scale.contiguous(), SHAPE: torch.tensor([out, inp], dtype=torch.int64)}
        if not qw.spec.symmetric:
            zp = qw.zero_point.to(torch.int8)
            parts[ZERO_POINT] = pack_int32(zp, qw.spec.bits, dim=0) if _zp_packed(qw.spec) else zp.contiguous()
        return cls(qw.spec, qw.shape, dict(sorted(parts.items())))

    @classmethod
    def from_parts(cls, parts: Mapping[str, torch.Tensor], spec: QuantSpec, name: str = "module") -> "PackedModule":
        """Check a module's stored tensors against `spec` (so a wrong file fails here, not inside a matmul) and wrap
        them without copying. A symmetric module's all-zero zero point is dropped; a tensor-strategy one becomes int8."""
        missing = [p for p in (PACKED, SCALE, SHAPE) + (() if spec.symmetric else (ZERO_POINT,)) if p not in parts]
        if missing:
            raise QtoolError(name, f"missing {', '.join(missing)} for a {spec.bits}-bit pack-quantized weight")
        shape = [int(s) for s in parts[SHAPE].reshape(-1).tolist()]
        if len(shape) != 2:
            raise QtoolError(name, f"weight_shape {shape} is not 2-D")
        if spec.group_size > 0 and shape[1] % spec.group_size:
            raise QtoolError(name, f"{shape[1]} input columns are not divisible by the group size {spec.group_size}")
        kept = {p: parts[p] for p in (PACKED, SCALE, SHAPE)}
        zp = parts.get(ZERO_POINT)
        if spec.symmetric and zp is not None and bool(torch.any(zp != 0)):
            raise QtoolError(name, "symmetric scheme but the module has non-zero weight_zero_point")
        if not spec.symmetric:
            kept[ZERO_POINT] = zp
        _check_parts(kept, layout(shape, spec, parts[SCALE].dtype), name)
        if ZERO_POINT in kept and not _zp_packed(spec):
            kept[ZERO_POINT] = zp.reshape(1).to(torch.int8)
        return cls(spec, (shape[0], shape[1]), dict(sorted(kept.items())))

    def codes(self) -> torch.Tensor:
        """The int8 codes q [out, in]."""
        return unpack_int32(self.parts[PACKED], self.spec.bits, self.shape, dim=1)

    def zero_point(self) -> torch.Tensor | None:
        """int8 zero points of the scale's shape (None when symmetric)."""
        zp = self.parts.get(ZERO_POINT)
        if zp is None or not _zp_packed(self.spec):
            return zp
        return unpack_int32(zp, self.spec.bits, (self.shape[0], self.parts[SCALE].shape[-1]), dim=0)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight, computed in the scale's dtype as CT does, then cast to `dtype`."""
        return dequantize(self.codes(), self.parts[SCALE], self.zero_point(), self.spec, dtype=dtype)

    def named(self, module: str) -> dict[str, torch.Tensor]:
        """The parts under their checkpoint names, `<module>.<local name>`."""
        return {f"{module}.{local}": t for local, t in self.parts.items()}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def _check_parts(parts: dict, want: dict, name: str) -> None:
    """Shapes and dtypes as `layout` plans them; scales may be any float dtype CT keeps, a tensor-strategy zero
    point any integer width."""
    for local, t in parts.items():
        if local == SHAPE:
            continue
        shape, dtype = want[local]
        dtypes = (dtype,)
        if local == SCALE:
            dtypes = SCALE_DTYPES
        elif dtype == torch.int8:  # an unpacked (tensor-strategy) zero point
            dtypes = (torch.int8, torch.int32, torch.int64)
        if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
            raise QtoolError(f"{name}.{local}", f"is {t.dtype} {list(t.shape)}, expected {list(shape)} "
                                                f"({', '.join(str(d).replace('torch.', '') for d in dtypes)})")


# --- quantization_config -------------------------------------------------------------------------

def weights_args(spec: QuantSpec) -> dict:
    """The `weights` QuantizationArgs as CT 0.20.1 serialises them (group_size null for channel and
    tensor, as CT's own presets write them; extra keys are forbidden there)."""
    return {
        "dynamic": False,
        "group_size": spec.group_size if spec.group_size > 0 else None,
        "num_bits": spec.bits,
        "strategy": spec.strategy,
        "symmetric": spec.symmetric,
        "type": "int",
    }


@dataclass(frozen=True)
class ConfigGroup:
    name: str
    spec: QuantSpec  # method "rtn": the file does not say how its scales were chosen
    targets: tuple[str, ...]


@dataclass(frozen=True)
class Scheme:
    """A checkpoint's quantization_config: its config groups (each a scheme and the modules it targets), the linear
    modules left dense (`ignore`), who wrote it, and qtool's record of the method when the file carries one."""

    groups: tuple[ConfigGroup, ...]
    ignore: tuple[str, ...] = ()
    provider: str | None = PROVIDER
    method: str | None = None

    @classmethod
    def of(cls, specs: QuantSpec | Mapping[str, QuantSpec], ignore: Iterable[str]) -> "Scheme":
        """The scheme qtool writes: for one spec, one group targeting Linear (every linear not in `ignore`); for a
        mapping module → spec (a mixed-precision run), one group per distinct spec, in SPEC order, each targeting
        exactly its modules by name. Exact names, not a Linear catch-all: compressed-tensors, transformers and vLLM
        all match them first, none depends on the groups' order, and a Linear module the checkpoint does not store
        (or a plan did not see) is never given a scheme."""
        if isinstance(specs, QuantSpec):
            return cls((ConfigGroup("group_0", specs, tuple(TARGETS)),), tuple(sorted(ignore)), method=specs.method)
        methods = {s.method for s in specs.values()}
        by_spec: dict[QuantSpec, list[str]] = {}
        for module in sorted(specs):
            by_spec.setdefault(specs[module], []).append(module)
        order = sorted(by_spec, key=spec_text)
        groups = tuple(ConfigGroup(f"group_{i}", spec, tuple(by_spec[spec])) for i, spec in enumerate(order))
        return cls(groups, tuple(sorted(ignore)), method=methods.pop() if len(methods) == 1 else None)

    @property
    def uniform(self) -> QuantSpec | None:
        """The one scheme every group has, or None when they differ."""
        specs = {g.spec for g in self.groups}
        return specs.pop() if len(specs) == 1 else None

    def spec_for(self, module: str) -> QuantSpec | None:
        """The scheme of `module`, by compressed-tensors' precedence: an exact name, then `re:` patterns (each sorted
        as CT sorts them), then a Linear class target; None when no group targets it or `ignore` lists it."""
        if any(_name_match(module, t) for t in self.ignore):
            return None
        owner = {t: g for g in self.groups for t in g.targets}
        for target in sorted(owner, key=lambda t: ("re:" in t, t)):
            if _name_match(module, target):
                return owner[target].spec
        for target, group in owner.items():
            if target in _LINEAR_CLASSES:
                return group.spec
        return None

    def describe(self, storage: str) -> str:
        """The report's `format`: 'compressed-tensors pack-quantized (safetensors)'."""
        return f"{QUANT_METHOD} {FORMAT} ({storage})"

    def to_config(self) -> dict:
        """config.json's `quantization_config` for a weight-only pack-quantized model (dump with sort_keys)."""
        groups = {g.name: {"format": FORMAT, "input_activations": None, "output_activations": None,
                           "targets": list(g.targets), "weights": weights_args(g.spec)} for g in self.groups}
        return {
            "config_groups": groups,
            "format": FORMAT,
            "global_compression_ratio": None,
            "ignore": sorted(self.ignore),
            "kv_cache_scheme": None,
            "moe_sparsity_config": None,
            "provider": PROVIDER,
            # The method that wrote the weights (merge-lora requantizes with it): compressed-tensors'
            # QuantizationConfig (extra="ignore"), transformers' CompressedTensorsConfig (**kwargs into it) and vLLM
            # (reads keys by name) all accept the extra key.
            **({"qtool": {"method": self.method}} if self.method else {}),
            "quant_method": QUANT_METHOD,
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_VERSION,
        }


def _name_match(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def quant_method(config: Mapping | None) -> str | None:
    """The quant_method of config.json's quantization_config (None when the model is not quantized)."""
    qcfg = (config or {}).get("quantization_config")
    return qcfg.get("quant_method") if isinstance(qcfg, Mapping) else None


def detect(config: Mapping | None, path="config.json") -> Scheme | None:
    """The compressed-tensors scheme of a model's config.json, or None when it is not a compressed-tensors model.
    Anything but int weight-only pack-quantized (qtool's, llm-compressor's, CT's) is refused, naming the field."""
    qcfg = (config or {}).get("quantization_config")
    if not isinstance(qcfg, Mapping) or qcfg.get("quant_method") != QUANT_METHOD:
        return None
    where = str(path)
    for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if qcfg.get(field):
            _refuse(where, field, "is set")
    groups = qcfg.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        _refuse(where, "config_groups", "is missing or empty")
    # in the file's order: as in compressed-tensors, a later group's target replaces an earlier one's
    read = tuple(ConfigGroup(g, _group_spec(groups[g], f"config_groups.{g}", qcfg.get("format"), where),
                             tuple(groups[g].get("targets") or ()))
                 for g in groups)
    record = qcfg.get("qtool")
    method = record.get("method") if isinstance(record, Mapping) else None
    return Scheme(read, tuple(qcfg.get("ignore") or []), qcfg.get("provider"), method)


def _refuse(path: str, field: str, problem: str):
    raise QtoolError(path, f"quantization_config.{field} {problem}; qtool reads only int weight-only pack-quantized")


_WEIGHT_KEYS_OK = {
    "num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "actorder", "observer",
    "observer_kwargs", "block_structure", "scale_dtype", "zp_dtype",
}


def _group_spec(group, where: str, top_format, path: str) -> QuantSpec:
    """The QuantSpec of one config group, every field it sets checked."""
    if not isinstance(group, Mapping):
        _refuse(path, where, "is not an object")
    fmt = group.get("format") or top_format
    if fmt != FORMAT:
        _refuse(path, f"{where}.format", f"is {fmt!r}")
    for act in ("input_activations", "output_activations"):
        if group.get(act) is not None:
            _refuse(path, f"{where}.{act}", "is set (activation quantization)")
    w = group.get("weights")
    if not isinstance(w, Mapping):
        _refuse(path, f"{where}.weights", "is missing")
    unknown = sorted(set(w) - _WEIGHT_KEYS_OK)
    if unknown:
        _refuse(path, f"{where}.weights", f"has unknown keys {unknown}")
    if str(w.get("type", "int")).lower() != "int":
        _refuse(path, f"{where}.weights.type", f"is {w.get('type')!r}")
    bits = w.get("num_bits", 8)
    if bits not in (4, 8):
        _refuse(path, f"{where}.weights.num_bits", f"is {bits!r} (4 or 8 supported)")
    if w.get("dynamic", False) not in (False, None):
        _refuse(path, f"{where}.weights.dynamic", f"is {w.get('dynamic')!r}")
    if w.get("actorder") not in (None, False, "static", "weight"):
        _refuse(path, f"{where}.weights.actorder", f"is {w.get('actorder')!r} (needs g_idx)")
    if w.get("scale_dtype") is not None:
        _refuse(path, f"{where}.weights.scale_dtype", f"is {w.get('scale_dtype')!r}")
    if w.get("zp_dtype") is not None and "int8" not in str(w.get("zp_dtype")):
        _refuse(path, f"{where}.weights.zp_dtype", f"is {w.get('zp_dtype')!r}")
    group_size = _group_size(w.get("strategy"), w.get("group_size"), f"{where}.weights", path)
    return QuantSpec(bits=bits, symmetric=bool(w.get("symmetric", True)), group_size=group_size, method="rtn")


def _group_size(strategy, gs, where: str, path: str) -> int:
    if strategy is None:
        strategy = "tensor" if gs is None else "group" if gs > 0 else "channel" if gs == -1 else None
    if strategy == "group":
        if not isinstance(gs, int) or gs <= 0:
            _refuse(path, f"{where}.group_size", f"is {gs!r} for group strategy")
        return gs
    if strategy in ("channel", "tensor"):
        return -1 if strategy == "channel" else 0
    _refuse(path, f"{where}.strategy", f"is {strategy!r}")
