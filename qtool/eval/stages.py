"""One causal LM as eval walks it: the calibration walk's stages (qtool.calib.walk.LayerWalk), re-captured on each
batch of windows, then its blocks in turn, then from its tail the input of the output embeddings and the head.

Everything the model does before, between and after its blocks is the walk's (its own forward replayed: masks,
rotary tables, final norm, tied weights, mixture-of-experts layers), so eval runs every architecture the walk
supports. Any checkpoint qtool reads walks: compressed-tensors pack-quantized modules are read through
formats.dense.DenseView, dequantized in their scale dtype exactly as transformers' `dequantize=True` load does.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..calib.model import build_architecture, free_module
from ..calib.walk import LayerWalk
from ..errors import QtoolError
from ..formats.dense import DenseView
from .head import Head, logit_transform

class ModelStages:
    """The stages of one checkpoint's causal LM on `device`; each stage's weights live only while it runs."""

    def __init__(self, ckpt, device: torch.device):
        self.view = DenseView(ckpt)   # packed modules read as their dequantized .weight
        self.device = device
        self.arch = build_architecture(self.view)
        if not self.arch.causal:
            raise QtoolError(ckpt.path, f"a {self.arch.model_type} model is not a causal LM: it has no next-token "
                                        "distribution to evaluate")
        # the values the model runs with, transformers' defaults included
        self.transform = logit_transform(self.arch.model.config.get_text_config())
        self.vocab_size, self.hidden_size = self.arch.model.get_output_embeddings().weight.shape
        self.num_blocks = len(self.arch.blocks)
        self._walk: LayerWalk | None = None

    def capture(self, ids: torch.Tensor) -> None:
        """A batch of windows [B, L] (right-padded, no mask: causal) becomes the first block's input."""
        if self._walk is None:
            self._walk = LayerWalk(self.view, [ids], self.device, arch=self.arch)
        else:
            self._walk.capture([ids])

    def blocks(self):
        """Each block loaded in turn (freed when the next is asked for, or when the generator is closed)."""
        return self._walk.blocks()

    def run(self, block) -> None:
        self._walk.run(block, keep=True)

    @property
    def hidden(self) -> torch.Tensor:
        """The current block input (after the last block: its output) of the batch, [B, L, hidden]."""
        return self._walk.inputs[0].hidden

    @contextmanager
    def head(self):
        """(final hidden states [B, L, hidden]: the input of the output embeddings, Head) with the tail loaded."""
        with self._walk.tail() as tail:
            final = tail.head_input(0, self.hidden)
            self._walk.inputs[0].hidden = None   # the last block's output is not needed any more
            embedding = self.arch.model.get_input_embeddings()
            if embedding.weight is not tail.head.weight:   # untied: the input embedding's part is done
                free_module(embedding)
            yield final, Head(tail.head.weight, tail.head.bias, self.transform)
