"""One causal LM's forward cut into the stages eval walks: embedding, each block, final norm, LM head.

Built on the calibration walk's pieces (qtool.calib.model: a transformers skeleton on the meta device, filled one
part at a time from the checkpoint, freed after use). Any checkpoint qtool reads walks: compressed-tensors
pack-quantized modules are read through a dense view, dequantized in their scale dtype exactly as transformers'
`dequantize=True` load does. The stages are reusable: eval walks batch after batch of windows through them.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import is_head, module_of, tied_embeddings
from ..errors import QtoolError
from ..formats.dense import DenseView
from ..runtime import release_host_memory
from .head import Head
from ..calib.model import ARCHITECTURES, build_skeleton, free_module, layer_prefix, layers_of, load_module, model_type
from ..calib.walk import _Catcher, _Caught, _compute_dtype

# Where the base model keeps the step after its blocks; the first one present is the final norm.
FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "norm_f")
# Config keys of logit post-processing (softcapping, scaling) the head here does not apply: refused, not ignored.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
ENCODERS = {"bert"}


@dataclass
class BlockInputs:
    hidden: torch.Tensor     # [B, L, hidden] in the compute dtype, on the device
    args: tuple              # the other positional arguments the model passes to each block
    kwargs: dict             # mask, rotary cos/sin, position ids, cache off


class ModelStages:
    """The stages of one checkpoint's causal LM on `device`; each stage's weights live only while it runs."""

    def __init__(self, ckpt, device: torch.device):
        self.ckpt = DenseView(ckpt)   # packed modules read as their dequantized .weight
        self.packed = self.ckpt.packed
        self.device = device
        self.mt = model_type(self.ckpt)
        if self.mt in ENCODERS:
            raise QtoolError(ckpt.path, f"a {self.mt} model is an encoder: it has no next-token distribution to evaluate")
        for key in LOGIT_TRANSFORMS:
            if (ckpt.config or {}).get(key) not in (None, 1, 1.0):
                raise QtoolError(ckpt.root / "config.json", f"{key} is set: eval does not apply that logit transform")
        self.outer, layer_names = layer_prefix(self.ckpt)
        self.path = ARCHITECTURES[self.mt]
        self.model = build_skeleton(self.ckpt)
        self.layers = layers_of(self.model, self.mt)
        self.dtype = _compute_dtype(self.ckpt, layer_names.get(0, []))
        self.norm_name = next((n for n in FINAL_NORMS if isinstance(getattr(self.model, n, None), nn.Module)), None)
        self.head_name, self.head_bias = self._head_names()
        self.vocab_size, self.hidden_size = self.ckpt.tensors[self.head_name].shape
        self._extra = {"use_cache": False} if "use_cache" in inspect.signature(self.model.forward).parameters else {}

    def _head_names(self) -> tuple[str, str | None]:
        """The LM head's weight (the input embedding when tied and not stored) and bias names."""
        names = self.ckpt.tensors
        stored = [n for n in names if n.count(".") == 1 and n.endswith(".weight") and is_head(module_of(n))]
        if stored:
            bias = f"{module_of(stored[0])}.bias"
            return stored[0], bias if bias in names else None
        emb = self.model.get_input_embeddings()
        local = next(n for n, m in self.model.named_modules() if m is emb)
        if tied_embeddings(self.ckpt.config) and f"{self.outer}{local}.weight" in names:
            return f"{self.outer}{local}.weight", None
        raise QtoolError(self.ckpt.path, "has no lm_head.weight and does not tie its embeddings: not a causal LM")

    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> BlockInputs:
        """The first block's inputs for `ids` [B, L], captured from the model's own forward."""
        load_module(self.model, self.ckpt, self.outer, self.device, self.dtype, skip=self.path)
        store: list = []
        real = self.layers[0]
        self.layers[0] = _Catcher(real, store)
        try:
            self.model(input_ids=ids.to(self.device), **self._extra)
        except _Caught:
            pass
        finally:
            self.layers[0] = real
            free_module(self.model)
        args, kwargs = store[0]
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return BlockInputs(hidden.to(self.dtype), tuple(args[1:]), kwargs)

    @contextmanager
    def block(self, i: int):
        layer = self.layers[i]
        load_module(layer, self.ckpt, f"{self.outer}{self.path}.{i}.", self.device, self.dtype)
        try:
            yield layer
        finally:
            free_module(layer)
            release_host_memory()

    @torch.no_grad()
    def run(self, layer: nn.Module, x: BlockInputs) -> None:
        """One block on the current hidden states; its output becomes the next block's input."""
        out = layer(x.hidden, *x.args, **x.kwargs)
        x.hidden = (out[0] if isinstance(out, (tuple, list)) else out).to(self.dtype)

    @torch.no_grad()
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.norm_name is None:
            return hidden
        norm = getattr(self.model, self.norm_name)
        load_module(norm, self.ckpt, f"{self.outer}{self.norm_name}.", self.device, self.dtype)
        try:
            return norm(hidden)
        finally:
            free_module(norm)

    def head(self) -> Head:
        """The LM head. A dense stored weight is mapped again for each chunk, so at most a chunk of it is resident;
        a packed one is dequantized once (it is then one block's worth of memory)."""
        if self.head_name in self.packed:
            return Head(self.ckpt.get(self.head_name), self.ckpt.get(self.head_bias) if self.head_bias else None)
        return _MappedHead(self.ckpt, self.head_name, self.head_bias)


class _MappedHead(Head):
    def __init__(self, ckpt, weight: str, bias: str | None):
        self.ckpt, self.names = ckpt, (weight, bias)
        self.vocab, self.hidden = ckpt.tensors[weight].shape
        self.dtype = ckpt.tensors[weight].dtype

    def _tensors(self):
        w, b = self.names
        return self.ckpt.get(w), None if b is None else self.ckpt.get(b)
