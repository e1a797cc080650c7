"""Walk a model one block at a time: embeddings once, then each block loaded, run on every sample, freed.

The arguments each block gets (attention mask, rotary cos/sin, position ids, cache off) are captured from the
model's own forward at the first block, so they are exactly what the full model passes; every supported
architecture passes the same ones to all of its blocks. Samples run one at a time (batch 1, no padding).
"""
from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ..runtime import release_host_memory
from .model import (ARCHITECTURES, build_skeleton, free_module, layer_prefix, layers_of, linear_modules,
                    load_module, model_type)


class _Caught(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for the first block: records what the model passes to it, then stops the forward."""

    def __init__(self, layer: nn.Module, store: list):
        super().__init__()
        self.layer = layer
        self._store = store

    def forward(self, *args, **kwargs):
        self._store.append((args, kwargs))
        raise _Caught

    def __getattr__(self, name):  # the model may read block attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


@dataclass
class Sample:
    hidden: torch.Tensor     # the block input, in the compute dtype, on the activation device
    args: tuple              # the other positional arguments
    kwargs: dict


def _compute_dtype(ckpt, names: list[str]) -> torch.dtype:
    dtypes = Counter(ckpt.tensors[n].dtype for n in names if ckpt.tensors[n].dtype.is_floating_point)
    return dtypes.most_common(1)[0][0] if dtypes else torch.float32


class LayerWalk:
    """Holds the skeleton and the current block inputs; `blocks()` yields (index, name prefix, block)."""

    def __init__(self, ckpt, samples: list[torch.Tensor], device: torch.device):
        self.ckpt = ckpt
        self.device = device
        self.mt = model_type(ckpt)
        self.outer, self.layer_names = layer_prefix(ckpt)
        self.path = ARCHITECTURES[self.mt]
        self.model = build_skeleton(ckpt)
        self.layers = layers_of(self.model, self.mt)
        first = self.layer_names.get(0, [])
        self.dtype = _compute_dtype(ckpt, first)
        self.tokens = sum(int(s.numel()) for s in samples)
        self.store_device = self._activation_device()
        self.inputs = self._capture(samples)

    def _activation_device(self) -> torch.device:
        """Activations stay on the device unless two copies of them would not fit in half its free memory."""
        if self.device.type != "cuda":
            return self.device
        hidden = int(self.ckpt.config.get("hidden_size") or self.ckpt.config.get("n_embd") or 0)
        need = 2 * self.tokens * hidden * torch.finfo(self.dtype).bits // 8
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.device if need < free // 2 else torch.device("cpu")

    def _capture(self, samples: list[torch.Tensor]) -> list[Sample]:
        load_module(self.model, self.ckpt, self.outer, self.device, self.dtype, skip=self.path)
        store: list = []
        real = self.layers[0]
        self.layers[0] = _Catcher(real, store)
        extra = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}
        try:
            with torch.no_grad():
                for ids in samples:
                    try:
                        self.model(input_ids=ids.unsqueeze(0).to(self.device), **extra)
                    except _Caught:
                        pass
        finally:
            self.layers[0] = real
            free_module(self.model)  # embeddings and final norm are not needed any more
        out = []
        for args, kwargs in store:
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            out.append(Sample(hidden.to(self.store_device, self.dtype), tuple(args[1:]), kwargs))
        return out

    def blocks(self):
        for i in range(len(self.layers)):
            prefix = f"{self.outer}{self.path}.{i}."
            layer = self.layers[i]
            load_module(layer, self.ckpt, prefix, self.device, self.dtype)
            try:
                yield i, prefix, layer
            finally:
                free_module(layer)
                release_host_memory()

    def linears(self, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        """The block's linear modules by their checkpoint module name."""
        return {prefix + name: m for name, m in linear_modules(layer).items()}

    @torch.no_grad()
    def run(self, layer: nn.Module, keep: bool) -> None:
        """Every sample through `layer`; with keep, its outputs become the next block's inputs."""
        for s in self.inputs:
            out = layer(s.hidden.to(self.device), *s.args, **s.kwargs)
            if keep:
                out = out[0] if isinstance(out, (tuple, list)) else out
                s.hidden = out.to(self.store_device, self.dtype)
