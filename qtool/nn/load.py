"""Load a compressed-tensors pack-quantized checkpoint (qtool's output, or llm-compressor's) into a torch model.

Quantized linears become `QuantLinear` holding the file's packed tensors; every other tensor is loaded as it
is. With transformers and a config.json the model is built on the meta device and filled tensor by tensor,
so no dense copy of a quantized weight (nor a randomly initialised model) ever exists. With a user-given
module, its linears are replaced by name.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from .. import runtime
from ..arch import FLOAT_DTYPES
from ..checkpoint import open_checkpoint
from ..errors import QtoolError
from ..formats import compressed_tensors as ct
from .quant_linear import QuantLinear



def load(path: str | os.PathLike, model: nn.Module | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype | None = None, revision: str | None = None, kernels: bool = True) -> nn.Module:
    """A torch model for the checkpoint at `path` (folder, file or cached hub id), in eval mode.

    model: None builds the transformers model of config.json (architectures[0], else AutoModelForCausalLM)
    on the meta device; an nn.Module (on meta or a real device) has its linears replaced by name.
    dtype: of the unquantized floating tensors (default: config.json's dtype, else as stored). Quantized
    weights keep their stored bytes and scales whatever `dtype` is; QuantLinear builds its kernel layout for
    the model's dtype (kernels=False: the tiled path on the stored words, for comparisons).
    A dense checkpoint loads too (nothing is quantized then).
    """
    ckpt = open_checkpoint(path, revision)
    device = torch.device(device)
    scheme = ct.detect(ckpt.config, ckpt.root / "config.json")
    modules = list(ct.packed_modules(ckpt.tensors))
    if modules and scheme is None:
        raise QtoolError(ckpt.path, "holds packed weights but config.json has no compressed-tensors "
                                    "quantization_config")
    if model is None:
        model = _build_transformers(ckpt, dtype)
    _fill(model, ckpt, scheme, modules, device, dtype, kernels)
    return model.eval()


def _build_transformers(ckpt, dtype: torch.dtype | None) -> nn.Module:
    """The transformers model of config.json, every parameter on the meta device (no memory, no init)."""
    if ckpt.config is None:
        raise QtoolError(ckpt.path, "no config.json: pass the model to fill (qtool.load(path, model=...))")
    try:
        import transformers
    except ImportError:
        raise QtoolError(ckpt.path, "building a model from config.json needs transformers "
                                    "(pip install transformers), or pass model=...") from None
    config = transformers.AutoConfig.from_pretrained(ckpt.root)
    dtype = dtype or _config_dtype(ckpt.config) or _stored_float_dtype(ckpt)
    names = list(ckpt.config.get("architectures") or [])
    cls = getattr(transformers, names[0], None) if names else None
    with torch.device("meta"):
        if cls is not None:
            return cls._from_config(config, dtype=dtype)
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


def _config_dtype(config: dict) -> torch.dtype | None:
    name = config.get("dtype") or config.get("torch_dtype")
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    return dt if dt in FLOAT_DTYPES else None


def _stored_float_dtype(ckpt) -> torch.dtype:
    for info in ckpt.tensors.values():
        if info.dtype in FLOAT_DTYPES and not info.name.endswith("." + ct.SCALE):
            return info.dtype
    return torch.float32


def _fill(model: nn.Module, ckpt, scheme, modules: list[str], device: torch.device, dtype, kernels: bool) -> None:
    """Replace the quantized modules, then load every other checkpoint tensor into its parameter or buffer."""
    # Every name a parameter is reachable by: tied weights (lm_head = embed_tokens) are one Parameter under
    # two names, and a meta Parameter replaced under one name must be replaced under all.
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    consumed: set[str] = set()
    compute = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    # building a kernel layout is many small ops: one thread (threads would mostly wait for each other)
    with runtime.threads_per_worker(torch.get_num_threads()):
        for m in modules:
            consumed |= _swap_quantized(model, ckpt, scheme, m, device, dtype, compute, kernels)
            # a quantized lm_head unties from the embedding: drop it from the alias lists
            for names in aliases.values():
                names[:] = [n for n in names if not n.startswith(m + ".")]
    runtime.release_host_memory()  # the layouts' temporaries, freed, back to the OS
    own = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    unexpected, loaded = [], set()
    for name, info in ckpt.tensors.items():
        if name in consumed:
            continue
        target = own.get(name)
        if target is None:
            target = buffers.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if tuple(target.shape) != tuple(info.shape):
            raise QtoolError(name, f"checkpoint shape {list(info.shape)} does not fit the model's {list(target.shape)}")
        t = read = ckpt.get(name)
        if t.is_floating_point():
            t = t.to(dtype or (target.dtype if target.dtype in FLOAT_DTYPES else t.dtype))
        t = t.to(device)
        if t.data_ptr() == read.data_ptr():
            t = t.clone()  # the reader maps the file (copy-on-write): a loaded model owns its memory
        if name in own:
            names = aliases.get(id(target), [name])
            param = nn.Parameter(t, requires_grad=target.requires_grad)
            for n in names:
                _set(model, n, param, "_parameters")
            loaded.update(names)
        else:
            _set(model, name, t, "_buffers")
            loaded.add(name)
    if unexpected:
        raise QtoolError(ckpt.path, f"{len(unexpected)} checkpoint tensors have no place in the model "
                                    f"(first: {unexpected[0]})")
    _finish(model, device, loaded)


def _swap_quantized(model: nn.Module, ckpt, scheme, m: str, device, dtype, compute, kernels: bool) -> set[str]:
    try:
        old = model.get_submodule(m)
    except AttributeError:
        raise QtoolError(m, "the checkpoint quantizes a module the model does not have") from None
    out_in = (getattr(old, "out_features", None), getattr(old, "in_features", None))
    # copy=True: the reader maps the file (copy-on-write) and a loaded model owns its memory; a kernel layout is
    # new memory already, so only what the layer keeps as read is copied
    parts = {p: ckpt.get(f"{m}.{p}") for p in ct.PARTS if f"{m}.{p}" in ckpt.tensors}
    spec = scheme.spec_for(m)
    if spec is None:
        raise QtoolError(m, "stores packed weights but no config group of quantization_config targets it")
    bias = ckpt.get(f"{m}.bias").clone() if f"{m}.bias" in ckpt.tensors else None
    if bias is not None:
        old_b = getattr(old, "bias", None)
        bias = bias.to(dtype or (old_b.dtype if old_b is not None else bias.dtype))
    q = QuantLinear(parts, spec, bias=bias, name=m, device=device, compute_dtype=compute, kernels=kernels,
                    copy=True)
    if out_in != (q.out_features, q.in_features):
        raise QtoolError(m, f"quantized weight is [{q.out_features}, {q.in_features}] but the model's module is "
                            f"{type(old).__name__} [{out_in[0]}, {out_in[1]}]")
    parent, _, leaf = m.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, q)
    return {f"{m}.{p}" for p in parts} | ({f"{m}.bias"} if bias is not None else set())


def _set(model: nn.Module, name: str, value, slot: str) -> None:
    parent, _, leaf = name.rpartition(".")
    getattr(model.get_submodule(parent) if parent else model, slot)[leaf] = value


def _finish(model: nn.Module, device: torch.device, loaded: set[str]) -> None:
    """Whatever is still on the meta device: recompute transformers' non-persistent buffers (rotary
    frequencies, position ids) with the model's own init; anything else is a missing tensor."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise QtoolError(missing[0], f"the checkpoint lacks {len(missing)} of the model's parameters "
                                     f"(first: {missing[0]})")
    meta_buffers = [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if not meta_buffers:
        return
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise QtoolError(meta_buffers[0], "buffer missing from the checkpoint and the model has no initializer")
    for p in model.parameters():
        p._is_hf_initialized = True  # transformers' guarded init functions leave these alone
    owners = {}
    for n in meta_buffers:
        parent, _, leaf = n.rpartition(".")
        mod = model.get_submodule(parent) if parent else model
        mod._buffers[leaf] = torch.empty_like(mod._buffers[leaf], device=device)
        owners[id(mod)] = mod
    with torch.no_grad():
        for mod in owners.values():
            init(mod)
    still = [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if still:
        raise QtoolError(still[0], "buffer missing from the checkpoint could not be initialised")
