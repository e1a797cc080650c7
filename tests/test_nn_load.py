"""qtool.load against transformers loading the same folder with CompressedTensorsConfig(dequantize=True).

Checkpoints are written by `qtool quantize` (qtool.jobs.quantize) from tiny bf16 Llamas, tied and untied.
Tolerance on bf16 logits: one bf16 ulp at |logit| ≈ 1 (the two paths sum in a different order).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

from qtool.errors import QtoolError
from qtool.formats import compressed_tensors as ct
from qtool.jobs.quantize import quantize
from qtool.nn import QuantLinear, load, memory_footprint
from qtool.quant.spec import QuantSpec
from safetensors.torch import save_file

from .conftest import decompress, packed_module


warnings.filterwarnings("ignore")
SPECS = [QuantSpec(4, True, 32, "rtn"), QuantSpec(4, False, 32, "rtn"), QuantSpec(8, True, -1, "rtn"),
         QuantSpec(8, False, -1, "rtn")]
LOGIT_TOL = dict(rtol=0, atol=8e-3)


def _llama(folder, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("nn_load")
    out = {}
    for tie in (False, True):
        base = _llama(root / f"base-{tie}", tie)
        for spec in SPECS:
            q = root / f"q-{tie}-{spec.bits}-{spec.symmetric}"
            quantize(str(base), str(q), spec, device="cpu")
            out[(tie, spec)] = q
    return out


def _reference(folder):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"int{s.bits}-{'sym' if s.symmetric else 'asym'}")
def test_logits_match_transformers_dequantized(quantized, tie, spec):
    folder = quantized[(tie, spec)]
    model = load(folder)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model(ids).logits, _reference(folder)(ids).logits
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, **LOGIT_TOL)
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quant == set(ct.packed_modules(json_names(folder))) and len(quant) == 14
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    assert not model.training


def json_names(folder):
    from qtool.checkpoint import open_checkpoint
    return open_checkpoint(folder).tensors


def test_memory_is_the_packed_size(quantized):
    """Loaded model bytes == the checkpoint's bytes (+ rotary frequencies, which are not stored)."""
    from qtool.checkpoint import open_checkpoint
    folder = quantized[(True, SPECS[0])]
    model = load(folder)
    stored = sum(i.nbytes for i in open_checkpoint(folder).tensors.values())
    rotary = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary" in n)
    fp = memory_footprint(model)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    # the CPU int4 kernel adds its scales and zeros in bfloat16: 4 bytes per group of 32 columns
    extra = sum(m.out_features * m.in_features // 32 * 4 for m in layers if m.path.name == "cpu-int4")
    assert fp["bytes"] == stored + rotary + extra
    assert sum(m.weight_nbytes - m.stored_nbytes for m in layers) == extra
    assert set(fp["dtypes"]) == {"bfloat16", "float32", "int4"}


def test_into_a_user_transformers_model(quantized):
    from transformers import LlamaForCausalLM
    folder = quantized[(False, SPECS[1])]
    ids = torch.randint(0, 96, (1, 6))
    auto = load(folder)
    given = LlamaForCausalLM._from_config(auto.config, dtype=torch.bfloat16)  # real, random weights
    assert load(folder, model=given) is given
    with torch.no_grad():
        torch.testing.assert_close(given(ids).logits, auto(ids).logits, rtol=0, atol=0)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 96, bias=True)
        self.down = nn.Linear(96, 32, bias=False)
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def _tiny_checkpoint(folder, spec):
    """A compressed-tensors folder for Tiny written with qtool's quant + format functions (no transformers)."""
    from qtool.quant import minmax_qparams, quantize as q_codes
    torch.manual_seed(3)
    dense = Tiny()
    sd = {"norm.weight": dense.norm.weight.detach() + 0.5, "norm.bias": dense.norm.bias.detach(),
          "up.bias": dense.up.bias.detach()}
    for name in ("up", "down"):
        w = getattr(dense, name).weight.detach()
        scale, zp = minmax_qparams(w, spec)
        sd.update(packed_module(q_codes(w, scale, zp, spec), scale, zp, spec).named(name))
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"quantization_config": ct.Scheme.of(spec, []).to_config()}))
    return folder, sd


def test_into_a_plain_module_on_meta(tmp_path):
    spec = QuantSpec(4, False, 32, "rtn")
    folder, sd = _tiny_checkpoint(tmp_path / "tiny", spec)
    with torch.device("meta"):
        model = Tiny()
    load(folder, model=model)
    assert isinstance(model.up, QuantLinear) and isinstance(model.down, QuantLinear)
    x = torch.randn(3, 64)
    up = decompress({k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("up.w")}, spec)
    down = decompress({k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("down.w")}, spec)
    h = torch.nn.functional.layer_norm(x, (64,), sd["norm.weight"], sd["norm.bias"])
    ref = torch.relu(h @ up.T + sd["up.bias"]) @ down.T
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_errors(tmp_path, quantized):
    spec = QuantSpec(4, False, 32, "rtn")
    folder, _ = _tiny_checkpoint(tmp_path / "tiny", spec)

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(64, 96)
            self.norm = nn.LayerNorm(64)

    with pytest.raises(QtoolError, match="quantizes a module the model does not have"):
        load(folder, model=Other())

    class Wrong(Tiny):
        def __init__(self):
            super().__init__()
            self.down = nn.Linear(96, 16, bias=False)

    with pytest.raises(QtoolError, match=r"\[32, 96\].*\[16, 96\]"):
        load(folder, model=Wrong())
    with torch.device("meta"):
        extra = Tiny()
    extra.head = nn.Linear(32, 4, device="meta")
    with pytest.raises(QtoolError, match="lacks 2 of the model's parameters"):
        load(folder, model=extra)
    (folder / "config.json").unlink()
    with pytest.raises(QtoolError, match="no compressed-tensors quantization_config"):
        load(folder, model=Tiny())
