"""Peak memory of calibrating a ≥1 GB synthetic Llama on the CPU, layer by layer, against the model's size.

    python bench/calib_memory.py [--model bench/_work/llama-1GB] [--samples 8] [--seq-len 128]

Runs `qtool calibrate` and `qtool quantize --method gptq` on random token ids (the synthetic model has no
tokenizer; ids are data like any other), each as its own process under /usr/bin/time, and prints peak RSS
beside the checkpoint's bytes and one decoder layer's bytes.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import measure  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bench/_work/llama-1GB")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    model = Path(a.model)
    cfg = json.loads((model / "config.json").read_text())
    from qtool.checkpoint import open_checkpoint
    ckpt = open_checkpoint(model)
    total = sum(i.nbytes for i in ckpt.tensors.values())
    layer0 = sum(i.nbytes for n, i in ckpt.tensors.items() if n.startswith("model.layers.0."))
    work = Path(tempfile.mkdtemp(prefix="calib-mem-"))
    ids = torch.randint(0, cfg["vocab_size"], (a.samples, a.seq_len), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, work / "ids.safetensors")
    rows = []
    for label, cmd in (
        ("calibrate (statistics)", ["qtool", "calibrate", str(model), "--calib", str(work / "ids.safetensors"),
                                    "-o", str(work / "stats.safetensors"), "--quiet", "--device", "cpu"]),
        ("quantize --method gptq", ["qtool", "quantize", str(model), "-o", str(work / "gptq"), "--method", "gptq",
                                    "--calib", str(work / "ids.safetensors"), "--quiet", "--device", "cpu"]),
    ):
        r = measure(cmd)
        rows.append((label, r))
    shutil.rmtree(work, ignore_errors=True)
    gib = 2**30
    print(f"model {model}: {total / 1e9:.3f} GB on disk, one decoder layer {layer0 / 1e6:.1f} MB (bf16); "
          f"{a.samples} samples x {a.seq_len} tokens\n")
    print("| job | wall s | peak RSS GiB | RSS ÷ model bytes |")
    print("|---|---:|---:|---:|")
    for label, r in rows:
        print(f"| {label} | {r.wall_s:.1f} | {r.rss_gib:.2f} | {r.rss_gib * gib / total:.2f} |")


if __name__ == "__main__":
    main()
