"""compressed-tensors `pack-quantized` (weight-only int4/int8) in and out.

Tensors per quantized Linear `<prefix>` (CT 0.20.1, `compressors/pack_quantized/base.py`):
  weight_packed      int32 [out, ceil(in*bits/32)]   codes + 2^(bits-1), LSB first along the input dim
  weight_scale       scale dtype: tensor (1,), channel (out, 1), group (out, n_groups)
  weight_shape       int64 [2] = [out, in]
  weight_zero_point  asymmetric only: int32 [ceil(out*bits/32), n_groups] packed along dim 0
                     (tensor strategy: int8 (1,), unpacked, as CT writes it)
and the `quantization_config` block of config.json.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..errors import QtoolError
from ..quant.core import dequantize, scale_dtype_for
from ..quant.pack import pack_int32, packed_len, unpack_int32
from ..quant.spec import QuantSpec

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.1"  # the compressed-tensors release whose layout and config block qtool matches
PROVIDER = "qtool"
TARGETS = ["Linear"]
PACKED, SCALE, SHAPE, ZERO_POINT = "weight_packed", "weight_scale", "weight_shape", "weight_zero_point"
PARAM_NAMES = (PACKED, SCALE, SHAPE, ZERO_POINT)
# strategies whose zero points CT packs along dim 0 (PACK_ZP_STRATS)
_PACKED_ZP = ("group", "channel")


# --- names ---------------------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str] | None:
    """'model.x.q_proj.weight_scale' -> ('model.x.q_proj', 'weight_scale'); None for other names."""
    prefix, _, local = name.rpartition(".")
    return (prefix, local) if local in PARAM_NAMES else None


def is_quantized_module(names: Iterable[str]) -> bool:
    """True if a module's local tensor names (or full names) include a packed weight."""
    return any(n == PACKED or n.endswith("." + PACKED) for n in names)


def quantized_modules(names: Iterable[str]) -> list[str]:
    """Sorted module prefixes that carry `<prefix>.weight_packed` in a checkpoint's tensor names."""
    return sorted(n[: -len(PACKED) - 1] for n in names if n.endswith("." + PACKED))


def module_param_names(spec: QuantSpec) -> tuple[str, ...]:
    """Local names written for one module under `spec`."""
    return (PACKED, SCALE, SHAPE) + (() if spec.symmetric else (ZERO_POINT,))


# --- compress ------------------------------------------------------------------------------------

def _zp_packed(spec: QuantSpec) -> bool:
    return not spec.symmetric and spec.strategy in _PACKED_ZP


def _scale_shape(out: int, inp: int, spec: QuantSpec) -> tuple[int, ...]:
    if spec.strategy == "tensor":
        return (1,)
    return (out, spec.n_groups(inp))


def compressed_specs(
    prefix: str, shape, dtype: torch.dtype, spec: QuantSpec
) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor compress() writes for a weight of `shape` and `dtype`,
    in sorted name order, without touching data (the writer plans headers from it)."""
    out, inp = (int(s) for s in shape)
    sshape = _scale_shape(out, inp, spec)
    specs = [
        (f"{prefix}.{PACKED}", (out, packed_len(inp, spec.bits)), torch.int32),
        (f"{prefix}.{SCALE}", sshape, scale_dtype_for(dtype)),
        (f"{prefix}.{SHAPE}", (2,), torch.int64),
    ]
    if not spec.symmetric:
        if _zp_packed(spec):
            specs.append((f"{prefix}.{ZERO_POINT}", (packed_len(out, spec.bits), sshape[1]), torch.int32))
        else:
            specs.append((f"{prefix}.{ZERO_POINT}", sshape, torch.int8))
    return sorted(specs)


def compress(name_prefix: str, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
             spec: QuantSpec, shape) -> dict[str, torch.Tensor]:
    """The CT tensors of one module from its int8 codes [out, in], scale and zero point."""
    out, inp = (int(s) for s in shape)
    if tuple(q.shape) != (out, inp):
        raise ValueError(f"codes of shape {tuple(q.shape)} do not match weight shape {(out, inp)}")
    return compress_packed(name_prefix, pack_int32(q, spec.bits, dim=1), scale, zero_point, spec, shape)


def compress_packed(
    name_prefix: str,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    spec: QuantSpec,
    shape,
) -> dict[str, torch.Tensor]:
    """The CT tensors of one module from its codes already packed along the input dim (pack_int32's layout)."""
    out, inp = (int(s) for s in shape)
    if tuple(packed.shape) != (out, packed_len(inp, spec.bits)) or packed.dtype != torch.int32:
        raise ValueError(f"packed codes {packed.dtype} {tuple(packed.shape)} do not hold {spec.bits}-bit codes of {(out, inp)}")
    expected = _scale_shape(out, inp, spec)
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale shape {tuple(scale.shape)} should be {expected} for {spec.strategy} strategy")
    tensors = {
        f"{name_prefix}.{PACKED}": packed,
        f"{name_prefix}.{SCALE}": scale.contiguous(),
        f"{name_prefix}.{SHAPE}": torch.tensor([out, inp], dtype=torch.int64),
    }
    if not spec.symmetric:
        if zero_point is None or tuple(zero_point.shape) != expected:
            raise ValueError("an asymmetric scheme needs a zero point of the scale's shape")
        zp = zero_point.to(torch.int8)
        tensors[f"{name_prefix}.{ZERO_POINT}"] = pack_int32(zp, spec.bits, dim=0) if _zp_packed(spec) else zp.contiguous()
    return tensors


# --- decompress ----------------------------------------------------------------------------------

def decompress(
    tensors: Mapping[str, torch.Tensor], spec: QuantSpec, dtype: torch.dtype | None = None, name: str = ""
) -> torch.Tensor:
    """Dense weight of one pack-quantized module from its local tensors (weight_packed, weight_scale,
    weight_shape[, weight_zero_point]); computed in the scale's dtype as CT does, then cast to `dtype`."""
    path = name or "module"
    missing = [n for n in module_param_names(spec) if n not in tensors]
    if missing:
        raise QtoolError(path, f"missing {', '.join(missing)} for a {spec.bits}-bit pack-quantized weight")
    packed, scale = tensors[PACKED], tensors[SCALE]
    shape = [int(s) for s in tensors[SHAPE].reshape(-1).tolist()]
    if len(shape) != 2:
        raise QtoolError(path, f"weight_shape {shape} is not 2-d")
    out, inp = shape
    if packed.dtype != torch.int32 or tuple(packed.shape) != (out, packed_len(inp, spec.bits)):
        raise QtoolError(path, f"weight_packed {packed.dtype} {tuple(packed.shape)} does not hold {spec.bits}-bit codes of {shape}")
    if tuple(scale.shape) != _scale_shape(out, inp, spec):
        raise QtoolError(path, f"weight_scale shape {tuple(scale.shape)} does not fit {spec.strategy} strategy for {shape}")
    if not scale.is_floating_point():
        raise QtoolError(path, f"weight_scale has non-float dtype {scale.dtype}")
    if spec.group_size > 0 and inp % spec.group_size:
        raise QtoolError(path, f"{inp} input columns are not divisible by the group size {spec.group_size}")
    zp = None
    if not spec.symmetric:
        zp = tensors[ZERO_POINT]
        if _zp_packed(spec):
            try:
                zp = unpack_int32(zp, spec.bits, (out, scale.shape[-1]), dim=0)
            except ValueError as e:
                raise QtoolError(path, f"weight_zero_point: {e}") from None
        elif zp.numel() != 1:
            raise QtoolError(path, f"weight_zero_point has {zp.numel()} values for tensor strategy")
        else:
            zp = zp.reshape(1).to(torch.int8)
    q = unpack_int32(packed, spec.bits, (out, inp), dim=1)
    return dequantize(q, scale, zp, spec, dtype=dtype)


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


def quantization_config(spec: QuantSpec, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for a weight-only pack-quantized model (dump with sort_keys)."""
    return {
        "config_groups": {
            "group_0": {
                "format": FORMAT,
                "input_activations": None,
                "output_activations": None,
                "targets": list(TARGETS),
                "weights": weights_args(spec),
            }
        },
        "format": FORMAT,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "provider": PROVIDER,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


_WEIGHT_KEYS_OK = {
    "num_bits", "type", "symmetric", "group_size", "strategy", "dynamic", "actorder", "observer",
    "observer_kwargs", "block_structure", "scale_dtype", "zp_dtype",
}


def spec_from_config(qcfg: Mapping, path: str = "config.json") -> tuple[QuantSpec, list[str], list[str]]:
    """(QuantSpec, ignore, targets) of a compressed-tensors `quantization_config` written by qtool,
    llm-compressor or CT. Anything but int weight-only pack-quantized is refused, naming the field."""

    def refuse(field: str, problem: str):
        raise QtoolError(path, f"quantization_config.{field} {problem}; qtool reads only int weight-only pack-quantized")

    if not isinstance(qcfg, Mapping):
        raise QtoolError(path, "quantization_config is not an object")
    method = qcfg.get("quant_method", QUANT_METHOD)
    if method != QUANT_METHOD:
        refuse("quant_method", f"is {method!r}")
    for field in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        if qcfg.get(field):
            refuse(field, "is set")
    groups = qcfg.get("config_groups")
    if not isinstance(groups, Mapping) or not groups:
        refuse("config_groups", "is missing or empty")
    top_format = qcfg.get("format")
    spec = None
    targets: list[str] = []
    for gname in sorted(groups):
        scheme = groups[gname]
        where = f"config_groups.{gname}"
        if not isinstance(scheme, Mapping):
            refuse(where, "is not an object")
        fmt = scheme.get("format") or top_format
        if fmt != FORMAT:
            refuse(f"{where}.format", f"is {fmt!r}")
        for act in ("input_activations", "output_activations"):
            if scheme.get(act) is not None:
                refuse(f"{where}.{act}", "is set (activation quantization)")
        w = scheme.get("weights")
        if not isinstance(w, Mapping):
            refuse(f"{where}.weights", "is missing")
        unknown = sorted(set(w) - _WEIGHT_KEYS_OK)
        if unknown:
            refuse(f"{where}.weights", f"has unknown keys {unknown}")
        if str(w.get("type", "int")).lower() != "int":
            refuse(f"{where}.weights.type", f"is {w.get('type')!r}")
        bits = w.get("num_bits", 8)
        if bits not in (4, 8):
            refuse(f"{where}.weights.num_bits", f"is {bits!r} (4 or 8 supported)")
        if w.get("dynamic", False) not in (False, None):
            refuse(f"{where}.weights.dynamic", f"is {w.get('dynamic')!r}")
        if w.get("actorder") not in (None, False, "static", "weight"):
            refuse(f"{where}.weights.actorder", f"is {w.get('actorder')!r} (needs g_idx)")
        for field in ("scale_dtype", "zp_dtype"):
            v = w.get(field)
            if v is not None and field == "scale_dtype":
                refuse(f"{where}.weights.{field}", f"is {v!r}")
            if v is not None and field == "zp_dtype" and "int8" not in str(v):
                refuse(f"{where}.weights.{field}", f"is {v!r}")
        gs = w.get("group_size")
        strategy = w.get("strategy")
        if strategy is None:
            strategy = "tensor" if gs is None else "group" if gs > 0 else "channel" if gs == -1 else None
        if strategy == "group":
            if not isinstance(gs, int) or gs <= 0:
                refuse(f"{where}.weights.group_size", f"is {gs!r} for group strategy")
            group_size = gs
        elif strategy == "channel":
            group_size = -1
        elif strategy == "tensor":
            group_size = 0
        else:
            refuse(f"{where}.weights.strategy", f"is {strategy!r}")
        this = QuantSpec(bits=bits, symmetric=bool(w.get("symmetric", True)), group_size=group_size, method="rtn")
        if spec is not None and this != spec:
            refuse(where, "differs from another config group (mixed schemes are not supported)")
        spec = this
        t = scheme.get("targets") or []
        targets.extend(x for x in t if x not in targets)
    ignore = list(qcfg.get("ignore") or [])
    return spec, ignore, targets
