"""The size part of a report: parameters, bytes by dtype, bits per parameter, what the model would weigh elsewhere,
and one row per logical tensor.

It describes a `Listing`: the stored tensors of a checkpoint (`listing(ckpt)`) or of an output a job has just
planned and written (the job builds the Listing from its plan, so nothing is read back). A compressed-tensors module
(`weight_packed`, `weight_scale`, ...) counts as one logical weight: its parameters are those of its [out, in] shape,
its bytes are those of all its stored parts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .. import arch
from ..checkpoint import Checkpoint
from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..quant.spec import QuantSpec, spec_text
from .schema import Estimates, Layer, Quantization, Size


@dataclass(frozen=True)
class Listing:
    """What a size part describes: every stored tensor (name → an object with .shape, .dtype, .nbytes, .numel, such
    as a TensorInfo), the config, the `format` string, the compressed-tensors scheme (None for a dense model) and the
    logical [out, in] shape of each packed module."""

    tensors: Mapping[str, object]
    config: dict | None
    format: str
    scheme: ct.Scheme | None = None
    packed_shapes: Mapping[str, tuple[int, int]] = field(default_factory=dict)


def checkpoint_format(storage: str, files: int, scheme: ct.Scheme | None, adapter: bool = False) -> str:
    """The report's `format`: 'peft-adapter (safetensors)', 'compressed-tensors pack-quantized (safetensors)',
    'safetensors, 3 shards', 'pytorch', ..."""
    if adapter:
        return f"peft-adapter ({storage})"
    if scheme is not None:
        return scheme.describe(storage)
    return storage + (f", {files} shards" if files > 1 else "")


def listing(ckpt: Checkpoint) -> Listing:
    """A checkpoint's Listing (reads only each packed module's weight_shape)."""
    scheme = ct.detect(ckpt.config, ckpt.root / "config.json")
    packed = ct.packed_modules(ckpt.tensors) if scheme is not None else {}
    shapes = {m: tuple(int(d) for d in ckpt.get(f"{m}.{ct.SHAPE}").tolist()) for m, parts in packed.items()
              if ct.SHAPE in parts}
    fmt = checkpoint_format(ckpt.storage, len(ckpt.files), scheme, ckpt.adapter_config is not None)
    return Listing(ckpt.tensors, ckpt.config, fmt, scheme, shapes)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_scheme(spec: QuantSpec) -> str:
    grouping = {"tensor": "per tensor", "channel": "per channel"}.get(spec.strategy, f"group {spec.group_size}")
    return f"int{spec.bits} {'sym' if spec.symmetric else 'asym'} {grouping}"


def _rows(lst: Listing) -> list[dict]:
    """One row per logical tensor: name, shape, dtype, bytes, quantized, reason, and its stored parts' infos."""
    packed = ct.packed_modules(lst.tensors) if lst.scheme is not None else {}
    rows = []
    for name, info in sorted(lst.tensors.items()):
        module, _, local = name.rpartition(".")
        if module not in packed:
            rows.append({"name": name, "shape": info.shape, "dtype": dtype_name(info.dtype), "bytes": info.nbytes,
                         "quantized": False, "reason": None, "stored": {local: info}})
        elif local == ct.PACKED:
            spec = lst.scheme.spec_for(module)
            if spec is None:
                raise QtoolError(module, "stores packed weights but no config group of quantization_config targets it")
            group = {p: lst.tensors[f"{module}.{p}"] for p in packed[module]}
            shape = lst.packed_shapes.get(module) or (info.shape[0], info.shape[1] * 32 // spec.bits)
            rows.append({"name": f"{module}.weight", "shape": tuple(shape), "dtype": f"int{spec.bits}",
                         "bytes": sum(p.nbytes for p in group.values()), "quantized": True,
                         "reason": describe_scheme(spec), "stored": group, "spec": spec})
    return rows


def _estimates(rows: list[dict], config: dict | None) -> Estimates:
    """Bytes of the same model stored at float32, float16, and int8/int4 with qtool's default schemes
    (pack-quantized weights with 16-bit scales; other floating tensors at 16 bits)."""
    est = {"float32": 0, "float16": 0, "int8": 0, "int4": 0}
    schemes = {"int8": QuantSpec(bits=8), "int4": QuantSpec(bits=4)}
    for r in rows:
        numel = math.prod(r["shape"])
        stored = next(iter(r["stored"].values()))
        if not (r["quantized"] or stored.dtype in arch.FLOAT_DTYPES):
            for k in est:
                est[k] += r["bytes"]
            continue
        est["float32"] += numel * 4
        est["float16"] += numel * 2
        quantizable = arch.role(r["name"], tuple(r["shape"]), torch.float16, config).quantize
        for key, spec in schemes.items():
            if quantizable and not (spec.group_size > 0 and r["shape"][1] % spec.group_size):
                est[key] += sum(math.prod(s) * d.itemsize for s, d in ct.layout(r["shape"], spec, torch.float16).values())
            else:
                est[key] += numel * 2
    return est


def estimates(lst: Listing) -> Estimates:
    """What the model of `lst` would weigh at float32, float16, int8 and int4."""
    return _estimates(_rows(lst), lst.config)


def parameter_count(lst: Listing) -> int:
    return sum(math.prod(r["shape"]) for r in _rows(lst))


def _quantization(lst: Listing, rows: list[dict]) -> Quantization | None:
    if lst.scheme is None:
        return None
    spec = lst.scheme.uniform  # None when the config groups' schemes differ
    qrows = [r for r in rows if r["quantized"]]
    qparams = sum(math.prod(r["shape"]) for r in qrows)
    return {
        "bits": spec.bits if spec else None, "symmetric": spec.symmetric if spec else None,
        "group_size": spec.group_size if spec else None, "method": lst.scheme.method, "format": ct.FORMAT,
        "ignored": list(lst.scheme.ignore), "provider": lst.scheme.provider, "quantized_tensors": len(qrows),
        "bits_per_weight": round(8 * sum(r["bytes"] for r in qrows) / qparams, 4) if qparams else None,
        "vllm_servable": all(g.spec.group_size in ct.VLLM_GROUP_SIZES for g in lst.scheme.groups),
        **({} if spec else {"schemes": _shares(qrows, qparams)}),
    }


def _shares(qrows: list[dict], qparams: int) -> dict:
    """{SPEC: modules, parameters, bytes, share of the quantized parameters} of a checkpoint whose schemes differ."""
    out: dict[str, dict] = {}
    for r in qrows:
        d = out.setdefault(spec_text(r["spec"]), {"modules": 0, "parameters": 0, "bytes": 0, "share": 0.0})
        d["modules"] += 1
        d["parameters"] += math.prod(r["shape"])
        d["bytes"] += r["bytes"]
    for d in out.values():
        d["share"] = round(d["parameters"] / qparams, 6) if qparams else 0.0
    return dict(sorted(out.items()))


def size_part(lst: Listing, estimates_of: Listing | None = None) -> Size:
    """The size fields of the report schema for `lst`; `estimates_of`: the listing whose model the estimates describe
    (a quantize output reports what its source would weigh)."""
    rows = _rows(lst)
    dtypes: dict[str, dict[str, int]] = {}
    for info in lst.tensors.values():
        d = dtypes.setdefault(dtype_name(info.dtype), {"tensors": 0, "parameters": 0, "bytes": 0})
        d["tensors"] += 1
        d["parameters"] += info.numel
        d["bytes"] += info.nbytes
    parameters = sum(math.prod(r["shape"]) for r in rows)
    total = sum(info.nbytes for info in lst.tensors.values())
    layers: list[Layer] = [{"name": r["name"], "shape": list(r["shape"]), "dtype": r["dtype"], "bytes": r["bytes"],
                            "quantized": r["quantized"], "reason": r["reason"], "error": None} for r in rows]
    return {
        "format": lst.format,
        "tensors": len(lst.tensors),
        "parameters": parameters,
        "bytes": total,
        "bits_per_parameter": round(8 * total / parameters, 4) if parameters else None,
        "dtypes": dict(sorted(dtypes.items())),
        "estimates": estimates(estimates_of) if estimates_of is not None else _estimates(rows, lst.config),
        "quantization": _quantization(lst, rows),
        "layers": layers,
    }
