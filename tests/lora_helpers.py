"""Shared builders for the LoRA merge tests: tiny transformers models, PEFT adapters, PEFT's own merge.

Imported by tests/test_merge_*.py (not a conftest, so other test modules do not pay for transformers/peft).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file



def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     vocab_size=96, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg)


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def save_base(arch: str, folder: Path, dtype=torch.float32, **save_kw) -> Path:
    """A base checkpoint folder (model weights randomised so nothing is trivially zero)."""
    model = BUILDERS[arch]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(dtype).save_pretrained(folder, **save_kw)
    return folder


def load_base(arch: str, folder: Path, dtype=torch.float32):
    cls = type(BUILDERS[arch]())
    return cls.from_pretrained(folder, dtype=dtype)


def make_adapter(arch: str, base_dir: Path, out: Path, seed: int = 1, **lora_kw) -> Path:
    """A PEFT adapter trained-looking: init_lora_weights=False, then every trainable tensor perturbed
    (so DoRA magnitudes, lora biases, saved biases and modules_to_save all differ from the base)."""
    from peft import LoraConfig, get_peft_model
    model = load_base(arch, base_dir)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    return out


def peft_merged(arch: str, base_dir: Path, adapter_dir: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """PEFT's own answer: load the base and the saved adapter, merge_and_unload()."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(load_base(arch, base_dir, dtype), adapter_dir)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def rewrite_adapter(src: Path, dst: Path, rename=None, config=None, tensors=None) -> Path:
    """Copy an adapter, renaming keys, editing the config, or replacing tensors."""
    dst.mkdir(parents=True, exist_ok=True)
    sd = read_folder(src)
    if tensors:
        sd.update(tensors)
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    save_file(sd, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst
