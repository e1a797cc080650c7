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
                           optimizer_states: int = 2, tokens: int = 0) -> dict:
    """Bytes a LoRA fine-tune at `rank` on every linear layer but the output head (PEFT's "all-linear") needs:
    the base frozen at its stored width, the adapter's float32 weights, gradients and Adam states, and, for a
    training step of `tokens` tokens (batch × sequence length), the activations kept for the backward pass
    (activation_bytes_per_token). The same convention as `qtool.nn.accounting.lora_training_memory`."""
    params, targets, widths = 0, 0, 0
    for row in report["layers"]:
        r = arch.role(row["name"], tuple(row["shape"]), torch.float16, config)
        if row["quantized"] or r.lora_target:
            params += rank * sum(row["shape"])
            targets += 1
            widths += row["shape"][0 if r.kind == "conv1d" else 1]  # the input width (Conv1D stores [in, out])
    return training_bytes(report["bytes"], rank, targets, params, widths, config, adapter_itemsize,
                          optimizer_states, tokens)


def training_bytes(base: int, rank: int, targets: int, params: int, widths: int, config: dict | None,
                   adapter_itemsize: int, optimizer_states: int, tokens: int) -> dict:
    """The lora_training block: base + (weights, gradients, optimizer states) of `params` adapter parameters
    + tokens × activation_bytes_per_token (left out, and None, when config.json lacks the sizes)."""
    weights = params * adapter_itemsize
    per_token = activation_bytes_per_token(config, widths, targets, rank, adapter_itemsize)
    activations = tokens * per_token if per_token is not None else 0
    return {"rank": rank, "targets": targets, "adapter_parameters": params, "adapter_bytes": weights,
            "gradient_bytes": weights, "optimizer_bytes": optimizer_states * weights, "base_bytes": base,
            "tokens": tokens, "activation_bytes_per_token": per_token, "activation_bytes": activations,
            "total_bytes": base + (2 + optimizer_states) * weights + activations}


def _size(config: dict, *keys, default=None):
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return default


def activation_bytes_per_token(config: dict | None, target_widths: int, targets: int, rank: int,
                               adapter_itemsize: int = 4) -> int | None:
    """What one token of a LoRA training step keeps for its backward pass, for a decoder of Llama-style blocks
    (measured within a few % on bench/nn_bench.py's model by autograd's saved tensors): the adapter-dtype copy
    of each target layer's input (`target_widths` = the sum of their input widths; PEFT casts the input to the
    adapter's dtype) and its A·x; per block the attention's q, k, v and output and the MLP's three intermediate
    tensors in the model dtype and two norms' float32 inputs; the final norm's input; the logits in the model
    dtype, their float32 copy and its gradient. None when config.json lacks the sizes."""
    if not config:
        return None
    hidden = _size(config, "hidden_size", "n_embd", "d_model")
    layers = _size(config, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _size(config, "vocab_size")
    if hidden is None or layers is None or vocab is None:
        return None
    inter = _size(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    heads = _size(config, "num_attention_heads", "n_head", default=1)
    head_dim = _size(config, "head_dim", default=hidden // heads)
    kv = _size(config, "num_key_value_heads", default=heads) * head_dim
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    item = getattr(torch, name, torch.float32).itemsize if isinstance(name, str) else 4
    lora = adapter_itemsize * (target_widths + rank * targets)
    block = item * (heads * head_dim + 2 * kv + hidden + 3 * inter) + 4 * 2 * hidden + 4 * heads
    return lora + layers * block + 4 * hidden + (item + 8) * vocab


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
            "vllm_servable": all(g.spec.strategy != "tensor" for g in scheme.groups),
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
