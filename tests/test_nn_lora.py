"""LoRALinear and attach_adapter against PEFT 0.21.2's own forward, on dense and quantized bases.

Bases and adapters come from tests/lora_helpers.py (float32 tiny Llama / GPT-2, adapters with every trainable
tensor perturbed). The quantized base is `qtool quantize`'s output; PEFT's reference runs on the same folder
loaded by transformers with CompressedTensorsConfig(dequantize=True). Tolerance: float32, 2e-6 absolute on
logits of magnitude ~1 (DoRA's row norm and the tiled matmul sum in another order than PEFT).
"""
from __future__ import annotations

import time
import warnings

import pytest
import torch

from qtool.errors import QtoolError
from qtool.jobs.merge import merge_lora
from qtool.jobs.quantize import quantize
from qtool.nn import LoRALinear, QuantLinear, attach_adapter, detach_adapter, load, set_adapter
from qtool.quant.spec import QuantSpec

from .lora_helpers import load_base, make_adapter, save_base

warnings.filterwarnings("ignore")
TOL = dict(rtol=0, atol=2e-6)
IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))

LLAMA_KINDS = {
    "plain": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora-dora": dict(r=4, lora_alpha=8, use_rslora=True, use_dora=True, target_modules=["q_proj", "down_proj"]),
    "patterns-bias": dict(r=4, lora_alpha=8, lora_bias=True, rank_pattern={"q_proj": 2},
                          alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj", "up_proj"]),
}
GPT2_KINDS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
    "rslora-dora": dict(r=4, lora_alpha=8, use_rslora=True, use_dora=True, target_modules=["c_attn", "c_fc"]),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nn_lora")
    save_base("llama", root / "llama")
    save_base("gpt2", root / "gpt2")
    quantize(str(root / "llama"), str(root / "llama-q"), QuantSpec(4, False, 32, "rtn"), device="cpu")
    for arch, kinds in (("llama", LLAMA_KINDS), ("gpt2", GPT2_KINDS)):
        for i, (kind, kw) in enumerate(kinds.items()):
            make_adapter(arch, root / arch, root / f"{arch}-{kind}", seed=10 + i, **kw)
    return root


def _peft(base_model, adapter):
    from peft import PeftModel
    return PeftModel.from_pretrained(base_model, adapter).eval()


def _dequantized(folder):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch,kind", [("llama", k) for k in LLAMA_KINDS] + [("gpt2", k) for k in GPT2_KINDS])
def test_dense_base_matches_peft(root, arch, kind):
    model = load(root / arch)
    name = attach_adapter(model, root / f"{arch}-{kind}")
    assert name == "default"
    ref = _peft(load_base(arch, root / arch), root / f"{arch}-{kind}")
    torch.testing.assert_close(_logits(model), _logits(ref), **TOL)


@pytest.mark.parametrize("kind", ["plain", "rslora-dora"])
def test_quantized_base_matches_peft_on_dequantized(root, kind):
    model = load(root / "llama-q")
    attach_adapter(model, root / f"llama-{kind}")
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert wrapped and all(isinstance(m.base, QuantLinear) for m in wrapped)
    ref = _peft(_dequantized(root / "llama-q"), root / f"llama-{kind}")
    torch.testing.assert_close(_logits(model), _logits(ref), **TOL)


def test_swaps_give_each_adapters_output_and_leave_the_base_alone(root):
    model = load(root / "llama-q")
    base_logits = _logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = attach_adapter(model, root / "llama-plain")
    start = time.perf_counter()
    b = attach_adapter(model, root / "llama-patterns-bias", name="b")
    attach_ms = (time.perf_counter() - start) * 1e3
    assert (a, b) == ("default", "b")
    deq = _dequantized(root / "llama-q")
    want_a = _logits(_peft(deq, root / "llama-plain"))
    want_b = _logits(_peft(_dequantized(root / "llama-q"), root / "llama-patterns-bias"))
    for name, want in ((a, want_a), (b, want_b), (a, want_a)):
        start = time.perf_counter()
        set_adapter(model, name)
        swap_ms = (time.perf_counter() - start) * 1e3
        torch.testing.assert_close(_logits(model), want, **TOL)
    set_adapter(model, None)
    torch.testing.assert_close(_logits(model), base_logits, rtol=0, atol=0)
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".adapters." not in k}
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert swap_ms < 50 and attach_ms < 2000  # a swap only changes which adapters run


def test_weighted_mix_equals_merge_lora(root, tmp_path):
    second = make_adapter("llama", root / "llama", tmp_path / "rs", seed=5, r=2, lora_alpha=4, use_rslora=True,
                          target_modules=["q_proj", "v_proj"])  # merge-lora refuses lora_bias on a bias-free base
    model = load(root / "llama")
    attach_adapter(model, root / "llama-plain", name="a")
    attach_adapter(model, second, name="b")
    set_adapter(model, {"a": 0.5, "b": -1.5})
    merged = tmp_path / "merged"
    merge_lora(str(root / "llama"), [str(root / "llama-plain"), str(second)], str(merged), weights=[0.5, -1.5])
    torch.testing.assert_close(_logits(model), _logits(load_base("llama", merged)), rtol=0, atol=1e-5)


def test_adapter_gradients_through_a_quantized_base(root):
    """Training an adapter on a QuantLinear base gives the gradients of the same adapter on the dense
    dequantized base (the backward pass re-dequantizes tiles)."""
    grads = []
    for quantized in (True, False):
        model = load(root / "llama-q")
        if not quantized:
            for name, m in list(model.named_modules()):
                if isinstance(m, QuantLinear):
                    dense = torch.nn.Linear(m.in_features, m.out_features, bias=False)
                    dense.weight.data = m.dequantize(torch.float32)
                    parent, _, leaf = name.rpartition(".")
                    setattr(model.get_submodule(parent), leaf, dense)
        attach_adapter(model, root / "llama-rslora-dora")
        params = [p for n, p in model.named_parameters() if ".adapters." in n]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model(IDS).logits.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_refusals(root, tmp_path):
    model = load(root / "llama")
    attach_adapter(model, root / "llama-plain", name="a")
    attach_adapter(model, root / "llama-rslora-dora", name="d", activate=False)
    with pytest.raises(QtoolError, match="already attached"):
        attach_adapter(model, root / "llama-plain", name="a")
    with pytest.raises(QtoolError, match="DoRA adapter runs only alone"):
        set_adapter(model, {"a": 1.0, "d": 1.0})
    with pytest.raises(QtoolError, match="no adapter of this name"):
        set_adapter(model, "nope")
    saved = make_adapter("llama", root / "llama", tmp_path / "mts", r=2, lora_alpha=2, target_modules=["q_proj"],
                         modules_to_save=["lm_head"])
    with pytest.raises(QtoolError, match="replaces base tensors"):
        attach_adapter(model, saved)
    gpt2 = load(root / "gpt2")
    with pytest.raises(QtoolError, match="no module|not selected"):
        attach_adapter(gpt2, root / "llama-plain")
    assert not any(isinstance(m, LoRALinear) for m in gpt2.modules())  # nothing half-attached
    detach_adapter(model, "a")
    set_adapter(model, "d")
    with pytest.raises(QtoolError, match="no adapter of this name"):
        set_adapter(model, "a")
