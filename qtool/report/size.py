"""Size reports: parameters, bytes by dtype, bits per parameter, and what the model would weigh elsewhere.

A compressed-tensors module (`weight_packed`, `weight_scale`, ...) counts as one logical weight: its
parameters are those of `weight_shape`, its bytes are those of all its stored parts.
"""
from __future__ import annotations

import math

import torch

from .. import __version__, arch
from ..checkpoint import Checkpoint
from ..formats import compressed_tensors as ct
from ..quant.spec import QuantSpec


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def logical_tensors(ckpt: Checkpoint) -> list[dict]:
    """One row per logical tensor: name, shape, dtype, bytes, and for packed weights their stored parts."""
    qcfg = (ckpt.config or {}).get("quantization_config")
    spec = None
    if qcfg and qcfg.get("quant_method") == "compressed-tensors":
        spec = ct.spec_from_config(qcfg, path=ckpt.root / "config.json")[0]
    parts: dict[str, dict[str, object]] = {}
    for name, info in ckpt.tensors.items():
        module, _, local = name.rpartition(".")
        if spec is not None and local in ct.PARAM_NAMES:
            parts.setdefault(module, {})[local] = info
    rows = []
    for name, info in ckpt.tensors.items():
        module, _, local = name.rpartition(".")
        if module in parts and "weight_packed" in parts[module]:
            if local != "weight_packed":
                continue
            group = parts[module]
            shape = tuple(int(d) for d in ckpt.get(f"{module}.weight_shape").tolist()) if "weight_shape" in group else None
            if shape is None:
                shape = (info.shape[0], info.shape[1] * 32 // spec.bits)
            rows.append({"name": f"{module}.weight", "shape": shape, "dtype": f"int{spec.bits}",
                         "bytes": sum(p.nbytes for p in group.values()), "quantized": True,
                         "reason": describe_scheme(spec), "stored": {k: v for k, v in sorted(group.items())}})
        else:
            rows.append({"name": name, "shape": info.shape, "dtype": dtype_name(info.dtype), "bytes": info.nbytes,
                         "quantized": False, "reason": None, "stored": {local: info}})
    return rows, spec


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
                est[key] += sum(math.prod(s) * d.itemsize for _, s, d in ct.compressed_specs("m", r["shape"], torch.float16, spec))
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
    rows, spec = logical_tensors(ckpt)
    dtypes: dict[str, dict[str, int]] = {}
    for info in ckpt.tensors.values():
        d = dtypes.setdefault(dtype_name(info.dtype), {"tensors": 0, "parameters": 0, "bytes": 0})
        d["tensors"] += 1
        d["parameters"] += info.numel
        d["bytes"] += info.nbytes
    parameters = sum(math.prod(r["shape"]) for r in rows)
    total = sum(info.nbytes for info in ckpt.tensors.values())
    quantization = None
    if spec is not None:
        qcfg = ckpt.config["quantization_config"]
        qrows = [r for r in rows if r["quantized"]]
        qparams = sum(math.prod(r["shape"]) for r in qrows)
        quantization = {
            "bits": spec.bits, "symmetric": spec.symmetric, "group_size": spec.group_size,
            "method": (qcfg.get("qtool") or {}).get("method") if isinstance(qcfg.get("qtool"), dict) else None,
            "format": qcfg.get("format", "pack-quantized"), "ignored": list(qcfg.get("ignore") or []),
            "provider": qcfg.get("provider"), "quantized_tensors": len(qrows),
            "bits_per_weight": round(8 * sum(r["bytes"] for r in qrows) / qparams, 4) if qparams else None,
            "vllm_servable": spec.strategy != "tensor",
        }
    layers = [{"name": r["name"], "shape": list(r["shape"]), "dtype": r["dtype"], "bytes": r["bytes"],
               "quantized": r["quantized"], "reason": r["reason"], "error": None} for r in rows]
    return {
        "qtool_version": __version__,
        "source": source if source is not None else str(ckpt.path),
        "format": ckpt.kind,
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
