#!/usr/bin/env python
"""Train a small Llama-shaped causal LM here, for model-level quality numbers (perplexity, KL divergence).

    python bench/train_lm.py [--out bench/_work/causal-lm] [--steps 200] [--threads 1]

Corpus: English technical prose that ships with Python itself (PSF licence), nothing downloaded — the language
reference's topics (`pydoc_data.topics`) and the docstrings of the standard library's modules (parsed with
`ast`, never imported; tests, idlelib, lib2to3 and site-packages skipped), one document per topic or module,
exact duplicates dropped. Documents are split by a hash of their name into train (84 %), calibration (8 %) and
evaluation (8 %), so the three texts share no document. Documents are joined by a blank line; no special token
is ever inserted (`.txt` evaluation tokenizes without them).

Written (OUT = --out):
  OUT/model/          LlamaForCausalLM fp32 safetensors, config.json, generation_config.json, tokenizer
                      (byte-level BPE trained on the train split; encoding adds no special tokens)
  OUT/train.txt       the training text
  OUT/calib.txt       calibration text, one text (for --calib, qtool reads a .txt one sample per line: use
  OUT/calib.jsonl     the same text cut into 512-token records {"text": ...} or
  OUT/calib.safetensors  input_ids [n, 512], consecutive windows of the calibration text (exact ids)
  OUT/eval.txt        evaluation text, one text (perplexity over consecutive 512-token windows)
  OUT/manifest.json   shapes, seed, corpus hash, token counts, training loss, fp32 eval perplexity, timings

Shape: hidden 256, intermediate 768, 4 layers, 4 heads of 64 with 2 kv heads (GQA), vocab 512, untied head,
rope; every linear input width (256, 768) is a multiple of 128 so int4 g128 applies everywhere. Trained on
512-token windows (the default `--seq-len` of qtool's calibration and evaluation), AdamW, warmup + cosine,
matmuls under bf16 autocast. Why a 512-token vocabulary: a few CPU minutes buy ~0.8 M training tokens; with 4096
tokens a model of this size is still near the unigram/bigram stage there and its blocks barely matter (int4 g128
rtn of every decoder linear moved eval ppl by 0.01 %), with 512 the blocks carry the prediction (0.2 %, and mse
below rtn). manifest.json records that check (`eval_ppl_ratio_after_rtn`).
Deterministic: fixed seeds, one torch thread by default and deterministic algorithms, tokenizer trained on one
thread; the same Python, library versions and --threads give the same bytes. Everything is built in a
temporary folder beside OUT and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "scripts"))
from make_samples import canonical_json  # noqa: E402

VOCAB = 512
SEQ = 512
SEED = 0
SPECIAL = "<|endoftext|>"  # id 0: eos/pad for generation; never inserted into any text
MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
SPLITS = (("eval", 8), ("calib", 8), ("train", 84))  # percent of documents, by hash of the document's name


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- corpus
def docstring_text(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
    return "\n\n".join(d.strip() for d in docs if d and d.strip())


def documents() -> list[tuple[str, str]]:
    """(name, text) of every document, in a fixed order, exact duplicate texts dropped."""
    import pydoc_data.topics

    docs = [(f"topic:{k}", v.strip()) for k, v in sorted(pydoc_data.topics.topics.items())]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for root, dirs, files in os.walk(lib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            if f.endswith(".py"):
                p = Path(root, f)
                docs.append((f"module:{p.relative_to(lib).as_posix()}", docstring_text(p)))
    seen, out = set(), []
    for name, text in docs:
        if text and text not in seen:
            seen.add(text)
            out.append((name, text))
    return out


def split_of(name: str) -> str:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") % 100
    for split, pct in SPLITS:
        if h < pct:
            return split
        h -= pct
    raise AssertionError


def corpus() -> dict[str, str]:
    parts: dict[str, list[str]] = {s: [] for s, _ in SPLITS}
    for name, text in documents():
        parts[split_of(name)].append(text)
    return {s: "\n\n".join(texts) + "\n" for s, texts in parts.items()}


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL, pad_token=SPECIAL, bos_token=SPECIAL,
                                   model_max_length=MODEL["max_position_embeddings"],
                                   clean_up_tokenization_spaces=False)


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, seq: int = SEQ) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows; a shorter last one is kept if it has >= 2 tokens."""
    out = [ids[i:i + seq] for i in range(0, ids.numel(), seq)]
    return [w for w in out if w.numel() >= 2]


# ---------------------------------------------------------------- training
def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def batches(stream: torch.Tensor, batch: int, gen: torch.Generator):
    """Endless batches of SEQ-token windows: each pass over the text at a random offset, in a random order."""
    while True:
        offset = int(torch.randint(0, SEQ, (1,), generator=gen))
        n = (stream.numel() - offset) // SEQ
        rows = stream[offset:offset + n * SEQ].view(n, SEQ)
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield rows[order[i:i + batch]]


def train(model, stream: torch.Tensor, steps: int, batch: int, lr: float) -> list[float]:
    gen = torch.Generator().manual_seed(SEED + 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    model.train()
    losses, t0 = [], time.perf_counter()
    for step, x in zip(range(steps), batches(stream, batch, gen)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        # bf16 autocast: matmuls in bf16 (AMX on this CPU: ~10x float32's speed), weights and optimizer in float32
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            log(f"  step {step:4d} loss {loss.item():.3f} lr {lr_at(step, steps, lr, warmup):.2e} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> tuple[float, int]:
    """exp(mean NLL) over every predicted position of the consecutive SEQ-token windows, and their count."""
    nll, count = 0.0, 0
    for w in windows(ids):
        logits = model(input_ids=w[None]).logits[0].float()
        nll += torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count), count


def rtn_sensitivity(model, ids: torch.Tensor, base_ppl: float) -> dict:
    """ppl ratio after qtool's data-free rtn of every decoder linear (int4 sym g128, int8 channel): the blocks matter."""
    sys.path.insert(0, str(BENCH.parent))
    from qtool.quant.spec import QuantSpec
    from qtool.quant.weight import quantize_weight

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for label, spec in (("int4_g128_rtn", QuantSpec(4, True, 128, "rtn")), ("int8_channel_rtn", QuantSpec(8, True, -1, "rtn"))):
        model.load_state_dict({k: quantize_weight(w, spec).dequantize(torch.float32)
                               if k.startswith("model.layers.") and k.endswith("_proj.weight") else w
                               for k, w in sd.items()})
        out[label] = round(perplexity(model, ids)[0] / base_ppl, 5)
    model.load_state_dict(sd)
    return out


# ---------------------------------------------------------------- files
def write_texts(tmp: Path, texts: dict[str, str], tokenizer) -> dict:
    from safetensors.torch import save_file

    for split in ("train", "calib", "eval"):
        (tmp / f"{split}.txt").write_text(texts[split], encoding="utf-8")
    calib = [w for w in windows(encode(tokenizer, texts["calib"])) if w.numel() == SEQ]
    save_file({"input_ids": torch.stack(calib)}, str(tmp / "calib.safetensors"))
    with open(tmp / "calib.jsonl", "w", encoding="utf-8") as f:
        for w in calib:
            f.write(json.dumps({"text": tokenizer.decode(w)}, ensure_ascii=False) + "\n")
    return {"calib_windows": len(calib)}


def save_model(model, tokenizer, folder: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False,
                                               max_new_tokens=64)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        extra = {"tokenizer_class": "PreTrainedTokenizerFast"} if name == "tokenizer_config.json" else None
        canonical_json(folder / name, drop=("_name_or_path", "name_or_path"), set_=extra)


def build(tmp: Path, steps: int, batch: int, lr: float) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    t_start = time.perf_counter()
    texts = corpus()
    tokenizer = build_tokenizer(texts["train"])
    info = write_texts(tmp, texts, tokenizer)
    ids = {s: encode(tokenizer, texts[s]) for s in texts}
    info.update(corpus_sha256=hashlib.sha256("".join(texts[s] for s in ("train", "calib", "eval")).encode())
                .hexdigest(), python=sys.version.split()[0], torch=torch.__version__,
                chars={s: len(t) for s, t in texts.items()}, tokens={s: int(v.numel()) for s, v in ids.items()},
                prep_s=round(time.perf_counter() - t_start, 1))
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=len(tokenizer), **MODEL)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    t0, c0 = time.perf_counter(), time.process_time()
    losses = train(model, ids["train"], steps, batch, lr)
    info.update(steps=steps, batch=batch, seq_len=SEQ, lr=lr, train_tokens_seen=steps * batch * SEQ,
                train_s=round(time.perf_counter() - t0, 1), train_cpu_s=round(time.process_time() - c0, 1),
                loss_first=round(losses[0], 4), loss_last20=round(sum(losses[-20:]) / len(losses[-20:]), 4))
    ppl, n = perplexity(model, ids["eval"])
    info.update(eval_ppl_fp32=round(ppl, 4), eval_predicted_tokens=n,
                train_ppl_fp32_first_64k=round(perplexity(model, ids["train"][:64 * SEQ])[0], 4),
                eval_ppl_ratio_after_rtn=rtn_sensitivity(model, ids["eval"], ppl))
    save_model(model, tokenizer, tmp / "model")
    info["model_bytes"] = sum(f.stat().st_size for f in (tmp / "model").iterdir())
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=BENCH / "_work" / "causal-lm")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (bytes reproduce for the same count)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{a.out.name}-", dir=a.out.parent) as tmp:
        info = build(Path(tmp), a.steps, a.batch, a.lr)
        info.update(threads=a.threads, seed=SEED, model_config=MODEL, vocab_size=VOCAB,
                    total_s=round(time.perf_counter() - t0, 1))
        (Path(tmp) / "manifest.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for f in Path(tmp).rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        Path(tmp).chmod(0o755)
        if a.out.exists():
            shutil.rmtree(a.out)
        os.replace(tmp, a.out)
        Path(tmp).mkdir()  # TemporaryDirectory removes its (now moved) folder on exit
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
