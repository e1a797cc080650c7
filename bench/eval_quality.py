"""Model-level quality of qtool's methods: ppl, ppl ratio, KL divergence and top-1 agreement against the source.

    python bench/eval_quality.py MODEL --data EVAL.txt --calib CALIB [--seq-len 512] [--samples N] [--json]
    python bench/eval_quality.py samples/tiny-llama --data samples/eval.txt --calib samples/calib.txt --seq-len 128

Each method is one `qtool quantize MODEL -o OUT ... --eval DATA --seq-len L --json` (the CLI a release pipeline
runs) and its report's "eval" block is read:
  rtn        int4 symmetric g128, min-max (llm-compressor's RTN bytes)
  mse        int4 g128, per-group clipping search
  mse+stats  the same search weighted by `qtool calibrate MODEL --calib CALIB` statistics
  gptq       int4 g128, GPTQ with CALIB (damp 0.01, act-order with static groups)
  int8       int8 per channel, mse
CALIB (one sample per line, as `--calib` reads a .txt) must not overlap DATA. Outputs go to bench/_work/quality-*.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QTOOL, WORK  # noqa: E402

METHODS = {
    "rtn": ["--method", "rtn"],
    "mse": ["--method", "mse"],
    "mse+stats": ["--method", "mse", "--calib", "{stats}"],
    "gptq": ["--method", "gptq", "--calib", "{calib}"],
    "int8": ["--bits", "8"],
}


def run(cmd: list[str]) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    return p.stdout


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    tag = Path(a.model).name
    WORK.mkdir(exist_ok=True)
    stats = WORK / f"quality-{tag}-stats.safetensors"
    if "mse+stats" in a.methods:
        run([QTOOL, "calibrate", a.model, "--calib", a.calib, "-o", str(stats), "--calib-samples", str(a.calib_samples),
             "--seq-len", str(a.seq_len), "--overwrite", "--quiet"])
    src = json.loads(run([QTOOL, "eval", a.model, "--data", a.data, "--seq-len", str(a.seq_len), "--json"]))
    rows = [{"method": "source", "bits_per_weight": None, "ppl": src["ppl"], "ppl_ratio": 1.0, "kld_mean": 0.0,
             "kld_p99": 0.0, "top1": 1.0, "tokens": src["tokens"]}]
    for name in a.methods.split(","):
        out = WORK / f"quality-{tag}-{name.replace('+', '-')}"
        extra = [x.format(stats=stats, calib=a.calib) for x in METHODS[name]]
        if "--calib" in extra and name == "gptq":
            extra += ["--calib-samples", str(a.calib_samples)]
        rep = json.loads(run([QTOOL, "quantize", a.model, "-o", str(out), *extra, "--seq-len", str(a.seq_len),
                              "--eval", a.data, "--overwrite", "--json"]))
        ev = rep["eval"]
        rows.append({"method": name, "bits_per_weight": rep["quantization"].get("bits_per_weight"), "ppl": ev["ppl"],
                     "ppl_ratio": ev["ppl_ratio"], "kld_mean": ev["kld"]["mean"], "kld_p99": ev["kld"]["p99"],
                     "top1": ev["top1_agreement"], "tokens": ev["tokens"]})
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{a.model} on {a.data}: {src['windows']} windows of {a.seq_len}, {src['tokens']} tokens")
    print("| method | bits/weight | ppl | ppl_ratio | mean KLD | p99 KLD | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        bpw = "dense" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        print(f"| {r['method']} | {bpw} | {r['ppl']:.4f} | {r['ppl_ratio']:.5f} | {r['kld_mean']:.5f} | "
              f"{r['kld_p99']:.4f} | {r['top1']:.4f} |")


if __name__ == "__main__":
    main()
