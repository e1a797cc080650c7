"""One PEFT adapter, read: its settings, its LoRA modules and the full tensors it carries (bias="all"/"lora_only",
modules_to_save, saved embeddings). Every tensor is checked when the adapter is read; A and B are then read
again, as float32, only when a module is merged or attached, so memory does not grow with the adapter."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import QtoolError
from .config import LoraSettings, parse_adapter_config
from .targets import classify_key


@dataclass
class LoraModule:
    """The LoRA tensors of one module in one adapter. `A` and `B` read the adapter file on each access (float32);
    lora bias and DoRA magnitude (one value per output) are held."""

    module: str
    ckpt: object
    a_key: str
    b_key: str
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    embedding: bool = False
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    keys: tuple = ()

    @property
    def A(self) -> torch.Tensor:
        return _load(self.ckpt, self.a_key)

    @property
    def B(self) -> torch.Tensor:
        return _load(self.ckpt, self.b_key)

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def parameters(self) -> int:
        n = math.prod(self.a_shape) + math.prod(self.b_shape)
        return n + sum(t.numel() for t in (self.bias, self.magnitude) if t is not None)


@dataclass
class Adapter:
    source: str
    settings: LoraSettings
    ckpt: object                                        # qtool.checkpoint Checkpoint (for full tensors)
    modules: dict[str, LoraModule] = field(default_factory=dict)
    full: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key
    unprefixed: list[str] = field(default_factory=list)  # keys PEFT would ignore (no base_model.model.)

    @property
    def parameters(self) -> int:
        """LoRA parameters (A, B, lora bias, DoRA magnitude); full tensors are counted by the report separately."""
        return sum(m.parameters for m in self.modules.values())


_ROLE_NAMES = {"A": "lora_A", "B": "lora_B", "emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B",
               "B_bias": "lora_B.bias", "magnitude": "lora_magnitude_vector"}


def read_adapter(ckpt, source: str | None = None) -> Adapter:
    """Group an opened adapter checkpoint's tensors by module and check that each module is complete."""
    source = str(source if source is not None else ckpt.path)
    settings = parse_adapter_config(ckpt.adapter_config, source)
    roles: dict[str, dict[str, str]] = {}
    adapter = Adapter(source, settings, ckpt)
    for key in ckpt.tensors:
        k = classify_key(key)
        if k is None:
            adapter.unprefixed.append(key)
        elif k.role == "full":
            if k.target in adapter.full:
                raise QtoolError(key, f"the adapter holds two tensors for base tensor {k.target}")
            adapter.full[k.target] = key
        else:
            slot = roles.setdefault(k.target, {})
            if k.role in slot:
                raise QtoolError(key, f"the adapter holds two {_ROLE_NAMES[k.role]} tensors for {k.target}")
            slot[k.role] = key
    for module, slot in roles.items():
        adapter.modules[module] = _module(ckpt, module, slot)
    return adapter


def _module(ckpt, module: str, slot: dict[str, str]) -> LoraModule:
    embedding = "emb_A" in slot or "emb_B" in slot
    a_role, b_role = ("emb_A", "emb_B") if embedding else ("A", "B")
    for role in (a_role, b_role):
        if role not in slot:
            raise QtoolError(next(iter(slot.values())), f"{module} has no {_ROLE_NAMES[role]} tensor")
    if embedding and ("A" in slot or "B" in slot or "B_bias" in slot):
        raise QtoolError(slot[a_role], f"{module} mixes embedding and linear LoRA tensors")
    a_key, b_key = slot[a_role], slot[b_role]
    a_shape, b_shape = tuple(ckpt.tensors[a_key].shape), tuple(ckpt.tensors[b_key].shape)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise QtoolError(a_key, f"LoRA shapes do not fit: {_ROLE_NAMES[a_role]} {list(a_shape)}, "
                                f"{_ROLE_NAMES[b_role]} {list(b_shape)} (conv LoRA is not implemented)")
    for key in (a_key, b_key):
        _load(ckpt, key)  # checked now, so a bad value stops the job before anything is written; read again later
    small = {role: _load(ckpt, slot[role]) for role in ("B_bias", "magnitude") if role in slot}
    out = b_shape[0]
    for role, t in small.items():
        if tuple(t.shape) != (out,):
            raise QtoolError(slot[role], f"{_ROLE_NAMES[role]} has shape {list(t.shape)}, expected [{out}]")
    return LoraModule(module, ckpt, a_key, b_key, a_shape, b_shape, embedding, small.get("B_bias"),
                      small.get("magnitude"), tuple(slot.values()))


def _load(ckpt, key: str) -> torch.Tensor:
    info = ckpt.tensors[key]
    if not info.dtype.is_floating_point:
        raise QtoolError(key, f"adapter tensor has dtype {info.dtype}, expected a float type")
    t = ckpt.get(key).to(torch.float32, copy=True)  # owned: the reader maps the file
    if not torch.isfinite(t).all():
        raise QtoolError(key, "adapter tensor holds NaN or Inf")
    return t
