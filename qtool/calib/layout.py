"""Which checkpoint tensors make each parameter of the model transformers builds, and loading them into it.

transformers 5 loads a checkpoint through a weight-conversion mapping: renamings (Mixtral's `block_sparse_moe`
→ `mlp`, GPT-NeoX's `embed_out` → `lm_head`, legacy `gamma`/`beta`) and converters that merge several checkpoint
tensors into one parameter (an MoE layer's per-expert 2-D `experts.E.gate_proj/up_proj/down_proj` stacked into the
fused 3-D `experts.gate_up_proj` and `experts.down_proj`). The layout applies that same mapping, read from
transformers itself (`get_model_conversion_mapping`, `rename_source_key`, the converters' own `convert`), so a
module is filled exactly as `from_pretrained` would fill it, while qtool keeps speaking the checkpoint's names.
Every conversion is first run on meta tensors: the model names and shapes it yields are checked before any data is
read, and each source's slot (which expert of which fused parameter) is known up front.
"""
from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import QtoolError


@dataclass
class Entry:
    """One conversion: checkpoint tensors (by the source pattern that matched them, in merge order) → model tensors."""
    key: str                                   # the first model name it yields (transformers' key for it)
    converter: object | None                   # a WeightConverter template, or None for a plain rename
    sources: dict[str, list[str]] = field(default_factory=dict)
    targets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # model name → shape, from the meta run

    @property
    def names(self) -> list[str]:
        return [n for group in self.sources.values() for n in group]


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes: a whole model tensor, or row `index` of a stacked (per-expert) one."""
    target: str
    index: int | None


def _transforms(model):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming
    mapping = get_model_conversion_mapping(model)
    return ([t for t in mapping if isinstance(t, WeightRenaming)],
            [t for t in mapping if isinstance(t, WeightConverter)])


def _meta_like(shape, dtype):
    return lambda: torch.empty(shape, dtype=dtype, device="meta")


class Layout:
    """Checkpoint names ↔ model names for one (meta) model; `load` fills chosen model tensors from a checkpoint."""

    def __init__(self, model: nn.Module, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], path):
        from transformers.core_model_loading import dot_natural_key, rename_source_key
        self.model, self.path = model, path
        self.meta = model.state_dict()
        renamings, converters = _transforms(model)
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        self.entries: dict[str, Entry] = {}
        self.unused: list[str] = []          # checkpoint tensors the model has no place for
        prefix = model.base_model_prefix
        for name in sorted(shapes, key=dot_natural_key):
            key, pattern = rename_source_key(name, renamings, converters, prefix, self.meta)
            if key not in self.meta and name in self.meta:
                key, pattern = rename_source_key(name, [], [], base_model_prefix=prefix, meta_state_dict=self.meta)
            if key not in self.meta:
                self.unused.append(name)
                continue
            entry = self.entries.setdefault(key, Entry(key, by_pattern[pattern] if pattern else None))
            entry.sources.setdefault(pattern or name, []).append(name)
        for entry in self.entries.values():
            self._dry_run(entry, shapes, dtypes)
        self.entry_of = {n: e for e in self.entries.values() for n in e.names}
        self.producer = {t: e for e in self.entries.values() for t in e.targets}

    def _convert(self, entry: Entry, fetch) -> dict[str, torch.Tensor]:
        """Run transformers' conversion of one entry; fetch(name) returns a zero-argument loader of that tensor."""
        from transformers.core_model_loading import WeightRenaming
        conv = deepcopy(entry.converter) if entry.converter is not None else WeightRenaming(entry.names[0], entry.key)
        for pattern, names in entry.sources.items():
            for n in names:
                conv.add_tensor(entry.key, n, pattern, fetch(n))
        out = conv.convert(entry.key, model=self.model, config=self.model.config)
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}

    def _dry_run(self, entry: Entry, shapes, dtypes) -> None:
        try:
            out = self._convert(entry, lambda n: _meta_like(shapes[n], dtypes[n]))
        except Exception as e:  # a converter that cannot run on these shapes
            raise QtoolError(self.path, f"transformers cannot map {entry.names[0]!r} onto the model "
                                        f"({type(e).__name__}: {e})") from None
        for target, t in out.items():
            want = self.meta.get(target)
            if want is None:
                raise QtoolError(self.path, f"{entry.names[0]!r} maps to {target!r}, which the model does not have")
            if tuple(t.shape) != tuple(want.shape):
                raise QtoolError(entry.names[0], f"gives {target} the shape {tuple(t.shape)}; the config's model "
                                                 f"needs {tuple(want.shape)}")
            entry.targets[target] = tuple(t.shape)

    def slot(self, name: str) -> Slot:
        """A checkpoint tensor's place: its model tensor and, when several are stacked into it, its row."""
        entry = self.entry_of[name]
        target = next(iter(entry.targets)) if len(entry.targets) == 1 else None
        if target is None:
            raise QtoolError(name, f"is split over {sorted(entry.targets)} by transformers' conversion; "
                                   "the walk cannot give it one set of input statistics")
        for group in entry.sources.values():
            if name in group and len(entry.names) > 1:
                return Slot(target, group.index(name))
        return Slot(target, None)

    def entries_under(self, prefix: str | None, inside: bool = True) -> list[Entry]:
        """Entries whose model tensors sit under `prefix` (a module path), or (inside=False) all the others."""
        def under(t):
            return prefix is not None and t.startswith(prefix + ".")
        return [e for e in self.entries.values() if any(under(t) for t in e.targets) == inside]

    def missing(self, module_prefix: str, names: list[str]) -> list[str]:
        return [n for n in names if n.startswith(module_prefix) and n not in self.producer]

    def load(self, entries: list[Entry], get, device: torch.device, overrides: dict | None = None) -> None:
        """Fill the model tensors of `entries` from get(checkpoint name) (or `overrides[name]`), onto `device`,
        each in the dtype the model declares for it (float32 where transformers keeps a module in float32)."""
        overrides = overrides or {}
        for entry in entries:
            fetch = (lambda n: (lambda: overrides[n]) if n in overrides else (lambda: get(n)))
            for target, value in self._convert(entry, fetch).items():
                _assign(self.model, target, value, self.meta[target].dtype, device)


def _assign(model: nn.Module, target: str, value: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    module_name, _, leaf = target.rpartition(".")
    module = model.get_submodule(module_name)
    if value.is_floating_point():
        value = value.to(dtype)
    value = value.to(device)
    if leaf in module._buffers:
        module._buffers[leaf] = value.contiguous()
    else:
        module._parameters[leaf] = nn.Parameter(value.contiguous(), requires_grad=False)
