"""QLoRA on qtool's modules against PEFT 0.21.2: new adapters initialised as get_peft_model does, gradients of
the factors on a QuantLinear base equal PEFT's on the dequantized dense base (float32, 1e-5), saved adapters
that PEFT loads and merge-lora merges as merge_and_unload does, and transformers' Trainer.

Bases: tests/lora_helpers.py's float32 tiny Llama, quantized by `qtool quantize` (int4 asymmetric g32: zero
points exercise the kernels' zero form); PEFT's reference runs on the same folder loaded by transformers with
CompressedTensorsConfig(dequantize=True).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from qtool.errors import QtoolError
from qtool.jobs.dequantize import dequantize
from qtool.jobs.merge import merge_lora
from qtool.jobs.quantize import quantize
from qtool.nn import (LoRALinear, QuantLinear, add_adapter, attach_adapter, load, parameter_counts, save_adapter,
                      set_trainable)
from qtool.quant.spec import QuantSpec

from .lora_helpers import load_base, make_adapter, save_base

warnings.filterwarnings("ignore")
IDS = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
KINDS = {
    "plain": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora-dora-dropout": dict(r=4, lora_alpha=8, use_rslora=True, use_dora=True, lora_dropout=0.1,
                                target_modules=["q_proj", "v_proj", "down_proj"]),
    "bias-patterns": dict(r=4, lora_alpha=8, lora_bias=True, rank_pattern={"q_proj": 2}, alpha_pattern={"up_proj": 3},
                          target_modules=["q_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nn_train")
    save_base("llama", root / "llama")
    save_base("llama", root / "llama-bf16", torch.bfloat16)
    quantize(str(root / "llama"), str(root / "q"), QuantSpec(4, False, 32, "rtn"), device="cpu")
    quantize(str(root / "llama-bf16"), str(root / "q-bf16"), QuantSpec(4, False, 32, "rtn"), device="cpu")
    return root


def _dequantized(folder):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=CompressedTensorsConfig(dequantize=True))


def _peft_kwargs(kw: dict) -> dict:
    """add_adapter's names for LoraConfig's."""
    names = {"lora_alpha": "alpha", "target_modules": "targets", "lora_dropout": "dropout"}
    return {names.get(k, k): v for k, v in kw.items()}


def _factors(model) -> dict[str, torch.Tensor]:
    """module.role -> tensor of every LoRA factor, in PEFT's naming, for ours and PEFT's models alike."""
    out = {}
    for name, p in model.named_parameters():
        for ours, theirs in ((".adapters.default.A", ".lora_A.default.weight"),
                             (".adapters.default.B", ".lora_B.default.weight"),
                             (".adapters.default.bias", ".lora_B.default.bias"),
                             (".adapters.default.magnitude", ".lora_magnitude_vector.default.weight")):
            if name.endswith(ours) or name.endswith(theirs):
                base = name[: -len(ours)] if name.endswith(ours) else name[: -len(theirs)]
                out[base.removeprefix("base_model.model.") + theirs.split(".default")[0]] = p
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_add_adapter_initialises_like_get_peft_model(root, kind):
    from peft import LoraConfig, get_peft_model
    for folder, dense in (("q", "llama"), ("q-bf16", "llama-bf16")):  # bf16 bases: PEFT rounds its init to bf16
        torch.manual_seed(11)
        model = load(root / folder)
        add_adapter(model, **_peft_kwargs(KINDS[kind]))
        torch.manual_seed(11)
        ref = get_peft_model(_dequantized(root / folder), LoraConfig(**KINDS[kind]))
        ours, theirs = _factors(model), _factors(ref)
        assert set(ours) == set(theirs) and ours
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], rtol=0 if "magnitude" not in k else 1e-6, atol=0,
                                       msg=f"{folder} {k}")
        trainable, _ = ref.get_nb_trainable_parameters()
        assert parameter_counts(model)["trainable"] == trainable
        assert all(p.requires_grad == (".adapters." in n) for n, p in model.named_parameters())


def test_default_targets_are_peft_defaults(root):
    from peft import LoraConfig, get_peft_model
    model = load(root / "q")
    add_adapter(model)
    ref = get_peft_model(_dequantized(root / "q"), LoraConfig())
    assert set(_factors(model)) == set(_factors(ref))
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)} == {"q_proj", "v_proj"}


def _perturb(model, seed: int) -> None:
    """Trained-looking factors (B = 0 would make A's gradient zero), the same in both models by name."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in sorted(_factors(model).items()):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["tiled", "cpu-int4"])
def test_gradients_on_a_quantized_base_equal_peft_on_the_dequantized_base(root, kind, layout):
    """float32 model; `layout` is where the QuantLinear codes are held (the CPU int4 kernel's layout, read
    back by tiles in the backward pass, or compressed-tensors' own words)."""
    from peft import LoraConfig, get_peft_model
    model = load(root / "q")
    torch.manual_seed(1)
    add_adapter(model, **_peft_kwargs(KINDS[kind]))
    if layout == "cpu-int4":  # built for bf16 activations, so a float32 input runs tiles of the kernel layout
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.relayout(torch.bfloat16)
        if not all(m.path.name == layout for m in model.modules() if isinstance(m, QuantLinear)):
            pytest.skip("torch's CPU int4 kernel is not available here")
    torch.manual_seed(1)
    ref = get_peft_model(_dequantized(root / "q"), LoraConfig(**KINDS[kind]))
    _perturb(model, 3)
    _perturb(ref, 3)
    grads = []
    for m in (model, ref):
        m.train()
        torch.manual_seed(5)  # the same dropout masks: both draw them layer by layer in forward order
        m(IDS).logits.square().mean().backward()
        grads.append({k: p.grad for k, p in _factors(m).items()})
    assert set(grads[0]) == set(grads[1])
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-5, msg=k)
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapters." not in n)


def test_saved_adapter_loads_in_peft_and_merges_like_merge_and_unload(root, tmp_path):
    from peft import PeftModel
    model = load(root / "q")
    add_adapter(model, r=4, alpha=16, targets="all-linear", use_dora=True, use_rslora=True)
    _perturb(model, 9)
    save_adapter(model, "default", tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] and cfg["use_rslora"] and len(cfg["target_modules"]) == 14
    model.eval()
    ref = PeftModel.from_pretrained(_dequantized(root / "q"), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=0, atol=2e-6)
    dequantize(str(root / "q"), str(tmp_path / "dense"))
    merge_lora(str(tmp_path / "dense"), [str(tmp_path / "ad")], str(tmp_path / "merged"))
    want = ref.merge_and_unload().state_dict()
    got = load_base("llama", tmp_path / "merged").state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
    with pytest.raises(QtoolError, match="already exists"):
        save_adapter(model, "default", tmp_path / "ad")
    _perturb(model, 10)
    save_adapter(model, "default", tmp_path / "ad", overwrite=True)  # an adapter folder may be replaced
    again = PeftModel.from_pretrained(_dequantized(root / "q"), tmp_path / "ad").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, again(IDS).logits, rtol=0, atol=2e-6)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(QtoolError, match="not part of a checkpoint"):
        save_adapter(model, "default", tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(QtoolError, match="no adapter of this name"):
        save_adapter(model, "other", tmp_path / "other")


def test_attach_trainable_and_refusals(root, tmp_path):
    adapter = make_adapter("llama", root / "llama", tmp_path / "a", r=2, lora_alpha=4, lora_dropout=0.2,
                           target_modules=["q_proj", "o_proj"])
    model = load(root / "q")
    name = attach_adapter(model, adapter, trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "embed_tokens" in n or "norm" in n)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.adapters[name].dropout.p == 0.2
    save_adapter(model, name, tmp_path / "again")  # its own config and tensors, unchanged
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["r"] == 2
    set_trainable(model, None)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(QtoolError, match="select a LlamaMLP"):
        add_adapter(model, targets=["mlp"], name="x")
    with pytest.raises(QtoolError, match="select no linear layer"):
        add_adapter(model, targets=["nope"], name="x")
    with pytest.raises(QtoolError, match="already attached"):
        add_adapter(model, targets=["v_proj"], name=name)
    with pytest.raises(QtoolError, match="positive integer"):
        add_adapter(model, r=0, name="x")


def test_transformers_trainer_fine_tunes_on_a_quantized_base(root, tmp_path):
    from transformers import Trainer, TrainingArguments
    model = load(root / "q-bf16")
    add_adapter(model, r=4, alpha=8, targets="all-linear", dropout=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(2))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters.default.A" in n or ".adapters.default.B" in n for n in changed)
