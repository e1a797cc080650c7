"""Build a synthetic Llama-shaped bf16 checkpoint (fixed seed, 500MB shards) and an r=16 all-linear LoRA adapter.

    python bench/synth.py --size 1GB            # bench/_work/llama-1GB (+ llama-1GB-lora-r16)
    python bench/synth.py --size 4GB            # 36 layers, 3.96 GB
    python bench/synth.py --layers 2 --out /tmp/x  # any depth

The model is built on the meta device (no init cost) only to get transformers' own tensor names, order and
shapes; each tensor is then drawn from its own seeded torch.Generator (normal * 0.02, norms = 1) and written shard
by shard, so memory stays at one shard and the bytes do not depend on the machine's thread count. The layout is
what `save_pretrained(max_shard_size="500MB")` writes: `model-0000i-of-0000n.safetensors`, an index with
`metadata.total_size`, config.json. The adapter's key names and adapter_config.json come from peft itself
(get_peft_model on the meta model, target_modules="all-linear"); its tensors are float32 as peft saves them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LAYERS, adapter_dir, dir_bytes, model_dir  # noqa: E402

SHARD_BYTES = 500 * 10**6  # "500MB" in huggingface_hub's decimal units


def llama_config(layers: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=16,
                      vocab_size=32000)
    cfg.dtype = torch.bfloat16
    return cfg


def meta_model(cfg):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def draw(shape, seed: int, std: float, dtype=torch.bfloat16) -> torch.Tensor:
    # normal_ straight into the target dtype: one pass, no float32 copy (the slow part of building 4 GB).
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))


def shard_plan(names_sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """huggingface_hub's rule: walk in state-dict order, start a new shard when the next tensor would overflow."""
    shards, cur, cur_bytes = [], [], 0
    for name, n in names_sizes:
        if cur and cur_bytes + n > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def write_model(out: Path, layers: int, seed: int) -> None:
    cfg = llama_config(layers)
    model = meta_model(cfg)
    sd = model.state_dict()
    index = {n: i for i, n in enumerate(sd)}
    sizes = [(n, t.numel() * 2) for n, t in sd.items()]
    shards = shard_plan(sizes, SHARD_BYTES)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        tensors = {}
        for n in names:
            shape = tuple(sd[n].shape)
            # Norm weights start at one, as Llama's init does; everything else is a small normal.
            tensors[n] = torch.ones(shape, dtype=torch.bfloat16) if "norm" in n else draw(shape, seed * 100003 + index[n], 0.02)
            weight_map[n] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(s for _, s in sizes)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_parameters": total // 2, "total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    cfg.save_pretrained(out)


def write_adapter(out: Path, base: Path, layers: int, seed: int, rank: int = 16, alpha: int = 32) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    cfg = llama_config(layers)
    with torch.device("meta"):
        peft_model = get_peft_model(meta_model(cfg), LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    sd = get_peft_model_state_dict(peft_model)
    tensors = {}
    for i, (n, t) in enumerate(sd.items()):
        # A ~ 1/sqrt(in) like kaiming; B non-zero (peft starts it at zero) so a merge changes every target weight.
        std = t.shape[1] ** -0.5 if ".lora_A." in n else 0.01
        tensors[n] = draw(tuple(t.shape), seed * 100003 + 7919 + i, std, torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    pc = peft_model.peft_config["default"]
    pc.base_model_name_or_path = str(base)
    pc.target_modules = sorted(pc.target_modules)  # peft keeps a set: sort so the file is the same every run
    pc.save_pretrained(str(out))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(LAYERS), default="1GB")
    ap.add_argument("--layers", type=int, help="override num_hidden_layers (then pass --out)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-adapter", action="store_true")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    a = ap.parse_args(argv)
    layers = a.layers or LAYERS[a.size]
    out = a.out or model_dir(a.size)
    adapter = out.parent / f"{out.name}-lora-r16" if a.out else adapter_dir(a.size)
    t0 = time.perf_counter()
    if a.force or not (out / "config.json").exists():
        write_model(out, layers, a.seed)
    if not a.no_adapter and (a.force or not (adapter / "adapter_config.json").exists()):
        write_adapter(adapter, out, layers, a.seed)
    print(f"{out}: {dir_bytes(out) / 1e9:.3f} GB; {adapter}: {dir_bytes(adapter) / 1e6:.1f} MB "
          f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
