"""Size reports: parameters, bytes by dtype, bits per parameter, and what the model would weigh elsewhere.

A compressed-tensors module (`weight_packed`, `weight_scale`, ...) counts as one logical weight: its
parameters are those of `weight_shape`, its bytes are those of all its stored parts.
"""
from __future__ import annotations

import math

import torch

from .. import __version__, arch
from ..checkpoint import Checkpoint
from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from ..quant.spec import QuantSpec


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def logical_tensors(ckpt: Checkpoint, scheme: ct.Scheme | None) -> list[dict]:
    """One row per logical tensor: name, shape, dtype, bytes, and for packed weights their stored parts."""
    packed = ct.packed_modules(ckpt.tensors) if scheme is not None else {}
    rows = []
    for name, info in ckpt.tensors.items():
        module, _, local = name.rpartition(".")
        if module not in packed:
            rows.append({"name": name, "shape": info.shape, "dtype": dtype_name(info.dtype), "bytes": info.nbytes,
                         "quantized": False, "reason": None, "stored": {local: info}})
            continue
        if local != ct.PACKED:
            continue
        spec = scheme.spec_for(module)
        if spec is None:
            raise QtoolError(module, "stores packed weights but no config group of quantization_config targets it")
        group = {p: ckpt.tensors[f"{module}.{p}"] for p in packed[module]}
        if ct.SHAPE in group:
            shape = tuple(int(d) for d in ckpt.get(f"{module}.{ct.SHAPE}").tolist())
        else:
            shape = (info.shape[0], info.shape[1] * 32 // spec.bits)
        rows.append({"name": f"{module}.weight", "shape": shape, "dtype": f"int{spec.bits}",
                     "bytes": sum(p.nbytes for p in group.values()), "quantized": True,
                     "reason": describe_scheme(spec), "stored": group})
    return rows


def checkpoint_format(ckpt: Checkpoint, scheme: ct.Scheme | None) -> str:
    """What a checkpoint is: 'peft-adapter (safetensors)', 'compressed-tensors pack-quantized (safetensors)',
    'safetensors, 3 shards', 'pytorch', ..."""
    if ckpt.adapter_config is not None:
        return f"peft-adapter ({ckpt.storage})"
    if scheme is not None:
        return scheme.describe(ckpt.storage)
    return ckpt.storage + (f", {len(ckpt.files)} shards" if len(ckpt.files) > 1 else "")


def describe_scheme(spec: QuantSpec) -> str:
    grouping = {"tensor": "per tensor", "channel": "per channel"}.get(spec.strategy, f"group {spec.group_size}")
    return f"int{spec.bits} {'sym' if spec.symmetric else 'asym'} {grouping}"


def estimate_bytes(rows: list[dict], config: dict | None) -> dict[str, int]:
    """Bytes of the same model stored at float32, float16, and int8/int4 with qtool's default schemes
    (pack-quantized weights with 16-bit scales; other floating tensors at 16 bits)."""
    est = {"float32": 0, "float16": 0, "int8": 0, "int4": 0}
    schemes = {"int8": QuantSpec(bits=8), "int4": QuantSpec(bits=4)}
    for r in rows:
        numel = math.prod(r["shape"])
        stored = next(iter(r["stored"].values()))
        floating = r["quantized"] or stored.dtype in arch.FLOAT_DTYPES
        if not floating:
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


def lora_training_estimate(report: dict, config: dict | None, rank: int, adapter_itemsize: int = 4,
                           optimizer_states: int = 2) -> dict:
    """Bytes a LoRA fine-tune at `rank` on every linear layer but the output head (PEFT's "all-linear") needs,
    activations aside: the base frozen at its stored width, plus the adapter's float32 weights, gradients and
    Adam states. The same convention as `qtool.nn.accounting.lora_training_memory` for a live model."""
    params, targets = 0, 0
    for row in report["layers"]:
        if row["quantized"] or arch.role(row["name"], tuple(row["shape"]), torch.float16, config).lora_target:
            params += rank * sum(row["shape"])
            targets += 1
    weights = params * adapter_itemsize
    return {"rank": rank, "targets": targets, "adapter_parameters": params, "adapter_bytes": weights,
            "gradient_bytes": weights, "optimizer_bytes": optimizer_states * weights, "base_bytes": report["bytes"],
            "total_bytes": report["bytes"] + (2 + optimizer_states) * weights}


def size_report(ckpt: Checkpoint, source: str | None = None) -> dict:
    """The report schema of the design (§7) with the size fields filled; error fields empty."""
    scheme = ct.detect(ckpt.config, ckpt.root / "config.json")
    rows = logical_tensors(ckpt, scheme)
    dtypes: dict[str, dict[str, int]] = {}
    for info in ckpt.tensors.values():
        d = dtypes.setdefault(dtype_name(info.dtype), {"tensors": 0, "parameters": 0, "bytes": 0})
        d["tensors"] += 1
        d["parameters"] += info.numel
        d["bytes"] += info.nbytes
    parameters = sum(math.prod(r["shape"]) for r in rows)
    total = sum(info.nbytes for info in ckpt.tensors.values())
    quantization = None
    if scheme is not None:
        spec = scheme.uniform  # None when the config groups' schemes differ
        qrows = [r for r in rows if r["quantized"]]
        qparams = sum(math.prod(r["shape"]) for r in qrows)
        quantization = {
            "bits": spec and spec.bits, "symmetric": spec and spec.symmetric, "group_size": spec and spec.group_size,
            "method": scheme.method, "format": ct.FORMAT, "ignored": list(scheme.ignore),
            "provider": scheme.provider, "quantized_tensors": len(qrows),
            "bits_per_weight": round(8 * sum(r["bytes"] for r in qrows) / qparams, 4) if qparams else None,
            "vllm_servable": all(g.spec.group_size in ct.VLLM_GROUP_SIZES for g in scheme.groups),
        }
    layers = [{"name": r["name"], "shape": list(r["shape"]), "dtype": r["dtype"], "bytes": r["bytes"],
               "quantized": r["quantized"], "reason": r["reason"], "error": None} for r in rows]
    return {
        "qtool_version": __version__,
        "source": source if source is not None else str(ckpt.path),
        "format": checkpoint_format(ckpt, scheme),
        "tensors": len(ckpt.tensors),
        "parameters": parameters,
        "bytes": total,
        "bits_per_parameter": round(8 * total / parameters, 4) if parameters else None,
        "dtypes": dict(sorted(dtypes.items())),
        "estimates": estimate_bytes(rows, ckpt.config),
        "quantization": quantization,
        "lora": None,
        "layers": layers,
        "summary": None,
        "gate": None,
        "timing": None,
    }
