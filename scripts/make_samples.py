#!/usr/bin/env python
"""Regenerate qtool's bundled samples byte for byte.

Inputs (hand-written, committed as is): samples/sample.txt (training prose), samples/adapter.txt
(a recipe-style text for the LoRA adapter), samples/eval.txt (held-out sentences).

Outputs (written into --out, default samples/):
  calib.txt          128 lines of sample.txt, one calibration sample per line
  calib.jsonl        32 other lines of sample.txt as {"text": ...}
  tiny-llama/        a 2-layer LlamaForCausalLM (bf16, two safetensors shards + index), its
                     config, generation config and a byte-level BPE tokenizer trained on sample.txt
  tiny-llama-lora/   a PEFT LoRA adapter (r=8, alpha=16, all linear projections) trained on adapter.txt

Everything is built in a temporary folder inside --out and renamed into place when complete.
Same inputs and library versions give the same bytes: fixed seeds, one thread, deterministic kernels,
and JSON rewritten canonically without absolute paths.

  python scripts/make_samples.py [--out DIR] [--skip-train]

--skip-train writes only the parts that need no training (calib files, tokenizer, config.json,
generation_config.json): the fast test regenerates those and compares their bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Tokenizer training and torch must not depend on thread scheduling for the bytes to reproduce.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "samples"

# Model shape: multiples of 128 so int4 group 128 divides every input dimension; 2 kv heads for GQA.
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama's order plus a pad token
MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    unk_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
SEED = 1234
SEQ_LEN = 128
BASE_STEPS, BASE_BATCH, BASE_LR = 300, 16, 1e-3
LORA_STEPS, LORA_BATCH, LORA_LR = 150, 16, 3e-3
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_CALIB, N_CALIB_JSONL = 128, 32
PROMPTS = ["The river", "In winter", "Recipe for"]
OUTPUTS = ["calib.txt", "calib.jsonl", "tiny-llama", "tiny-llama-lora"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


# ---------------------------------------------------------------- calibration text
def write_calib(out: Path, lines: list[str], eval_lines: list[str]) -> None:
    # Spread over every topic: every third line for calib.txt, a disjoint strided pick for the JSONL.
    calib = lines[0::3][:N_CALIB]
    calib_jsonl = lines[1::3][::3][:N_CALIB_JSONL]
    assert len(calib) == N_CALIB and len(calib_jsonl) == N_CALIB_JSONL
    assert not set(calib) & set(eval_lines) and not set(calib_jsonl) & set(eval_lines)
    (out / "calib.txt").write_text("\n".join(calib) + "\n", encoding="utf-8")
    with open(out / "calib.jsonl", "w", encoding="utf-8") as f:
        for text in calib_jsonl:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(lines: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    # Like Llama: encoding a text prepends <s>, so calibration code that calls tokenizer(text) gets it.
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def encode_stream(tokenizer, lines: list[str]) -> torch.Tensor:
    # Each line as <s> ... </s>, concatenated: training windows then see sentence starts and ends.
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(lines)["input_ids"]:
        ids.extend(enc + [eos])
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------- training
def train(model, stream: torch.Tensor, steps: int, batch: int, lr: float, seed: int, tag: str) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    # Linear warmup then cosine decay to 10%.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    model.train()
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, stream.numel() - SEQ_LEN, (batch,), generator=gen)
        x = stream[starts[:, None] + torch.arange(SEQ_LEN)]
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"  {tag} step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return losses


@torch.no_grad()
def eval_loss(model, tokenizer, lines: list[str]) -> float:
    """Mean next-token cross-entropy over the lines, each encoded as <s> text </s>."""
    total, count = 0.0, 0
    for ids in tokenizer(lines)["input_ids"]:
        x = torch.tensor([ids + [tokenizer.eos_token_id]])
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        total += loss.item()
        count += x.shape[1] - 1
    return total / count


@torch.no_grad()
def sample_generation(model, tokenizer, prompt: str, n: int = 30) -> str:
    x = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ---------------------------------------------------------------- canonical files
def canonical_json(path: Path, drop: tuple[str, ...] = (), set_: dict | None = None) -> None:
    """Rewrite a JSON file with sorted keys and a final newline; drop or set top-level keys."""
    data = json.loads(path.read_text(encoding="utf-8"))
    for k in drop:
        data.pop(k, None)
    data.update(set_ or {})
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def generation_config():
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=MODEL_CONFIG["bos_token_id"],
        eos_token_id=MODEL_CONFIG["eos_token_id"],
        pad_token_id=MODEL_CONFIG["pad_token_id"],
        do_sample=False,
        max_new_tokens=64,
    )


def save_base(model, tokenizer, folder: Path) -> None:
    model.generation_config = generation_config()
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # About 60% of the model per shard: greedy splitting then yields exactly two shards.
    model.save_pretrained(folder, max_shard_size=int(n_bytes * 0.6))
    tokenizer.save_pretrained(folder)
    finish_base_folder(folder)


def finish_base_folder(folder: Path) -> None:
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) == 2, f"expected two shards, got {[s.name for s in shards]}"
    canonical_configs(folder, ["config.json", "generation_config.json", "tokenizer_config.json",
                               "model.safetensors.index.json"])


def canonical_configs(folder: Path, names: list[str]) -> None:
    for name in names:
        # The generic class name loads with transformers 4.x as well as 5.x (which writes its own backend name).
        extra = {"tokenizer_class": "PreTrainedTokenizerFast"} if name == "tokenizer_config.json" else None
        canonical_json(folder / name, drop=("_name_or_path", "name_or_path"), set_=extra)


def finish_adapter_folder(folder: Path) -> None:
    # PEFT's model card is a template naming the base path; the adapter is the two files.
    (folder / "README.md").unlink(missing_ok=True)
    # Relative to the adapter folder, so the committed samples stay valid wherever the repo lives.
    # PEFT keeps target_modules as a set, so its saved order follows string hashing: sort it.
    cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    canonical_json(folder / "adapter_config.json", set_={"base_model_name_or_path": "../tiny-llama",
                                                         "target_modules": sorted(cfg["target_modules"])})


# ---------------------------------------------------------------- main
def build(out_tmp: Path, skip_train: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    stats: dict = {}

    lines = read_lines(SOURCES / "sample.txt")
    eval_lines = read_lines(SOURCES / "eval.txt")
    write_calib(out_tmp, lines, eval_lines)

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(lines)
    stats["vocab_size"] = len(tokenizer)
    stats["tokenizer_s"] = round(time.perf_counter() - t0, 2)

    config = LlamaConfig(vocab_size=len(tokenizer), **MODEL_CONFIG)
    config.dtype = torch.bfloat16
    config.architectures = ["LlamaForCausalLM"]
    base_dir = out_tmp / "tiny-llama"
    if skip_train:
        # The files that need no weights, produced by the same code path as a full run.
        base_dir.mkdir()
        config.save_pretrained(base_dir)
        generation_config().save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        canonical_configs(base_dir, ["config.json", "generation_config.json", "tokenizer_config.json"])
        return stats

    stream = encode_stream(tokenizer, lines)
    stats["train_tokens"] = stream.numel()
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float()
    stats["parameters"] = sum(p.numel() for p in model.parameters())
    stats["eval_loss_init"] = eval_loss(model, tokenizer, eval_lines)
    t0 = time.perf_counter()
    losses = train(model, stream, BASE_STEPS, BASE_BATCH, BASE_LR, SEED, "base")
    stats["base_train_s"] = round(time.perf_counter() - t0, 1)
    stats["base_loss_first_last"] = (losses[0], sum(losses[-20:]) / 20)

    model = model.to(torch.bfloat16)
    save_base(model, tokenizer, base_dir)

    # The adapter trains against the base exactly as saved (bf16 weights, computed in float32).
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    base.eval()
    stats["eval_loss_base"] = eval_loss(base, tokenizer, eval_lines)
    stats["generation_base"] = [sample_generation(base, tokenizer, p) for p in PROMPTS]
    adapter_lines = read_lines(SOURCES / "adapter.txt")
    stats["adapter_loss_base"] = eval_loss(base, tokenizer, adapter_lines)

    torch.manual_seed(SEED + 1)
    lora_cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none",
                          task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, lora_cfg)
    t0 = time.perf_counter()
    lora_losses = train(peft_model, encode_stream(tokenizer, adapter_lines), LORA_STEPS, LORA_BATCH, LORA_LR,
                        SEED + 1, "lora")
    stats["lora_train_s"] = round(time.perf_counter() - t0, 1)
    stats["lora_loss_first_last"] = (lora_losses[0], sum(lora_losses[-20:]) / 20)
    stats["adapter_loss_lora"] = eval_loss(peft_model, tokenizer, adapter_lines)
    stats["eval_loss_lora"] = eval_loss(peft_model, tokenizer, eval_lines)
    stats["generation_lora"] = [sample_generation(peft_model, tokenizer, p) for p in PROMPTS]
    lora_dir = out_tmp / "tiny-llama-lora"
    peft_model.save_pretrained(lora_dir)
    finish_adapter_folder(lora_dir)
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=SOURCES, help="folder to write into (default samples/)")
    ap.add_argument("--skip-train", action="store_true", help="only calib files, tokenizer and configs")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".make_samples-", dir=out) as tmp:
        stats = build(Path(tmp), args.skip_train)
        # Swap each output into place only once all were built.
        for name in OUTPUTS:
            src = Path(tmp) / name
            if not src.exists():
                continue
            for f in [src, *src.rglob("*")]:
                f.chmod(0o755 if f.is_dir() else 0o644)  # safetensors and tempfile write owner-only modes
            dst = out / name
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            os.replace(src, dst)
    stats["total_s"] = round(time.perf_counter() - t0, 1)
    for k, v in stats.items():
        log(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
