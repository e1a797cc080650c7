"""The model skeleton calibration walks: built from config.json on the meta device, filled one part at a time.

transformers is an optional extra (`pip install qtool[calib]`), imported only here and only when needed.
"""
from __future__ import annotations

import torch
from torch import nn

from ..arch import DECODER_LAYERS, decoder_layers
from ..errors import QtoolError

# Every architecture of arch.DECODER_LAYERS passes the same extra arguments to each block (mask, rotary cos/sin,
# position ids), which the walk captures from the model's own forward at the first block and replays for the others.
ARCHITECTURES = DECODER_LAYERS


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise QtoolError("transformers", "calibration needs the optional extra: pip install 'qtool[calib]'") from None
    return transformers


def model_type(ckpt) -> str:
    config = ckpt.config
    if not config:
        raise QtoolError(ckpt.path, "calibration needs the model's config.json beside its weights")
    mt = config.get("model_type")
    if mt not in ARCHITECTURES:
        raise QtoolError(ckpt.path, f"cannot walk architecture {mt!r} layer by layer; supported: {supported()}")
    return mt


def layer_prefix(ckpt) -> tuple[str, dict[int, list[str]]]:
    """('model.' or '' or ..., {layer index: its tensor names}) from the checkpoint's names alone."""
    path = ARCHITECTURES[model_type(ckpt)]
    found = decoder_layers(ckpt.tensors, path)
    if found is None:
        raise QtoolError(ckpt.path, f"no tensors named like '{path}.N.*' for a {model_type(ckpt)} model")
    return found


def _materialize_buffers(model) -> None:
    """Buffers built on meta get real CPU storage and transformers' own initial values (rotary inv_freq,
    BERT position ids): the same step transformers takes after building a model on meta."""
    owners = {}
    for name, buf in list(model.named_buffers()):
        mod_name, _, buf_name = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if buf.is_meta:
            mod._buffers[buf_name] = torch.zeros_like(buf, device="cpu")
            owners[mod_name] = mod
    for mod in owners.values():
        model._init_weights(mod)


def build_skeleton(ckpt):
    """transformers' base model for the checkpoint's config, parameters on meta, buffers real."""
    transformers = require_transformers()
    cfg = dict(ckpt.config)
    mt = cfg.pop("model_type")
    for key in ("quantization_config", "architectures", "auto_map"):
        cfg.pop(key, None)
    try:
        config = transformers.AutoConfig.for_model(mt, **cfg)
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config)
    except Exception as e:  # a config transformers cannot build
        raise QtoolError(ckpt.root / "config.json", f"transformers cannot build a {mt} model from it ({type(e).__name__}: {e})") from None
    if mt == "qwen2" and len(set(getattr(config, "layer_types", None) or ["full_attention"])) > 1:
        raise QtoolError(ckpt.path, "qwen2 with mixed sliding-window layers is not supported by the layer walk")
    model.eval()
    model.requires_grad_(False)
    _materialize_buffers(model)
    return model


def layers_of(model, mt: str) -> nn.ModuleList:
    return model.get_submodule(ARCHITECTURES[mt])


def load_module(module: nn.Module, ckpt, prefix: str, device: torch.device, dtype: torch.dtype,
                skip: str | None = None) -> None:
    """Fill a module's parameters (and buffers the checkpoint has) from the checkpoint, onto `device`.

    Names under `skip.` (the block list, filled one block at a time) are left on meta.
    """
    state = {}
    params = dict(module.named_parameters())
    for name, t in list(params.items()) + list(module.named_buffers()):
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        full = prefix + name
        if full not in ckpt.tensors:
            if name in params:
                raise QtoolError(ckpt.path, f"tensor {full!r} is missing (the {type(module).__name__} needs it)")
            continue  # a buffer transformers computes itself
        value = ckpt.get(full)
        if tuple(value.shape) != tuple(t.shape):
            raise QtoolError(full, f"shape {tuple(value.shape)} does not match the config's {tuple(t.shape)}")
        if value.is_floating_point():
            value = value.to(dtype)
        state[name] = value.to(device)
    module.load_state_dict(state, strict=False, assign=True)
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta and buf.device != device:
            mod_name, _, buf_name = name.rpartition(".")
            module.get_submodule(mod_name)._buffers[buf_name] = buf.to(device)


def free_module(module: nn.Module) -> None:
    """Drop a module's weights (back to meta) once the walk has passed it."""
    for mod in module.modules():
        for k, p in mod._parameters.items():
            if p is not None:
                mod._parameters[k] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """nn.Linear and GPT-2's Conv1D modules of a block, by their name inside it."""
    from transformers.pytorch_utils import Conv1D
    return {n: m for n, m in layer.named_modules() if isinstance(m, (nn.Linear, Conv1D))}

