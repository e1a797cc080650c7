"""The model calibration walks: the class transformers builds for the checkpoint, on the meta device, and its
stack of blocks.

Nothing here is per architecture. The blocks are the one `nn.ModuleList` whose items are the classes the model
declares unsplittable (`_no_split_modules`, transformers' own unit for device placement: a decoder layer, an
encoder layer); the checkpoint's names map onto the model through transformers' conversion mapping (`.layout`).
A model that does not fit is refused with one error naming its type and what is missing; data-free methods still
work on it. transformers is an optional extra (`pip install qtool[calib]`), imported only when a model runs.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QtoolError
from .layout import Layout

DATA_FREE = "data-free quantization (--method rtn, or mse without --calib) still works on it"



def require_transformers():
    try:
        import transformers
    except ImportError:
        raise QtoolError("transformers", "calibration needs the optional extra: pip install 'qtool[calib]'") from None
    return transformers


def unsupported(ckpt, mt, what: str) -> QtoolError:
    return QtoolError(ckpt.path, f"cannot walk a {mt!r} model block by block: {what}; {DATA_FREE}")


def tensor_names(ckpt) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)}: of a checkpoint, or of a dense view of a quantized one (its logical weights)."""
    return {n: (tuple(i.shape), i.dtype) for n, i in ckpt.tensors.items()}


def compute_dtype(names: dict) -> torch.dtype:
    """The checkpoint's most common floating dtype: the walk runs in it, as transformers would load the model."""
    dtypes = Counter(dt for _, dt in names.values() if dt.is_floating_point)
    return dtypes.most_common(1)[0][0] if dtypes else torch.float32


@dataclass
class Architecture:
    """The task model on meta (its head included), where its blocks are, and how checkpoint names map onto it."""
    model: nn.Module
    model_type: str
    blocks_path: str
    layout: Layout
    dtype: torch.dtype
    causal: bool                 # a causal LM (next-token logits), not an encoder

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path)


def _config(ckpt, transformers):
    cfg = dict(ckpt.config or {})
    if not cfg:
        raise QtoolError(ckpt.path, "calibration needs the model's config.json beside its weights")
    mt = cfg.pop("model_type", None)
    if mt is None:
        raise QtoolError(ckpt.root / "config.json", "has no model_type: the walk cannot tell which model to build")
    if mt not in transformers.CONFIG_MAPPING:
        what = "remote code (auto_map) that qtool never runs" if cfg.get("auto_map") else "an unknown model type"
        raise unsupported(ckpt, mt, f"transformers {transformers.__version__} has no such architecture ({what})")
    for key in ("quantization_config", "auto_map"):
        cfg.pop(key, None)
    try:
        return mt, transformers.AutoConfig.for_model(mt, **cfg)
    except Exception as e:  # a config transformers refuses
        raise QtoolError(ckpt.root / "config.json", f"transformers cannot read it as a {mt} config ({type(e).__name__}: {e})") from None


def _model_class(transformers, config, architectures):
    """The class the checkpoint was saved from (config `architectures`), else the causal LM, else the base model."""
    for name in architectures or ():
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and isinstance(config, getattr(cls, "config_class", ())):
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    return None


def _materialize_buffers(model) -> None:
    """Buffers built on meta get real CPU storage and transformers' own initial values (rotary inv_freq,
    position ids): the step transformers takes for what a checkpoint does not hold."""
    owners = {}
    for name, buf in list(model.named_buffers()):
        mod_name, _, buf_name = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if buf.is_meta:
            mod._buffers[buf_name] = torch.zeros_like(buf, device="cpu")
            owners[mod_name] = mod
    for mod in owners.values():
        model._init_weights(mod)


def find_blocks(model, ckpt, mt) -> str:
    """The path of the one ModuleList holding the model's declared block classes (e.g. 'model.layers')."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    if not classes:
        raise unsupported(ckpt, mt, f"{type(model).__name__} declares no block classes (_no_split_modules)")
    lists = [name for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and all(type(b).__name__ in classes for b in m)]
    if not lists:
        raise unsupported(ckpt, mt, f"no ModuleList of its block classes ({', '.join(sorted(classes))})")
    if len(lists) > 1:
        raise unsupported(ckpt, mt, f"it has {len(lists)} stacks of blocks ({', '.join(lists)}); "
                                    "the walk runs a single stack (decoder-only or encoder-only models)")
    return lists[0]


def build_architecture(ckpt) -> Architecture:
    """Build the model of a checkpoint (or of a `formats.dense.DenseView` of a quantized one: it reads alike) on meta
    in its own dtype, find its blocks and map its names (no data read)."""
    transformers = require_transformers()
    mt, config = _config(ckpt, transformers)
    cls = _model_class(transformers, config, (ckpt.config or {}).get("architectures"))
    if cls is None:
        raise unsupported(ckpt, mt, "transformers has neither a causal-LM nor a base model class for it")
    names = tensor_names(ckpt)
    dtype = compute_dtype(names)
    try:
        with torch.device("meta"):
            model = cls._from_config(config, dtype=dtype)
    except Exception as e:  # a config transformers cannot build
        raise QtoolError(ckpt.root / "config.json", f"transformers cannot build a {mt} model from it ({type(e).__name__}: {e})") from None
    model.eval()
    model.requires_grad_(False)
    _materialize_buffers(model)
    path = find_blocks(model, ckpt, mt)
    layout = Layout(model, {n: s for n, (s, _) in names.items()}, {n: d for n, (_, d) in names.items()}, ckpt.path)
    causal = cls in transformers.AutoModelForCausalLM._model_mapping.values()
    return Architecture(model, mt, path, layout, dtype, causal)


def free_module(module: nn.Module) -> None:
    """Drop a module's weights (back to meta) once the walk has passed it."""
    for mod in module.modules():
        for k, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def linear_modules(block: nn.Module) -> dict[str, nn.Module]:
    """nn.Linear and GPT-2's Conv1D modules of a block, by their name inside it."""
    from transformers.pytorch_utils import Conv1D
    return {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
