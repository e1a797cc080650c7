#!/usr/bin/env python
"""The QLoRA loop on the samples: quantize the sample model to int4, fine-tune the sample adapter on that int4
base for a few steps on the sample text, save it as a PEFT adapter, merge it into the dense base and quantize
the merged model.

  python samples/finetune_example.py [--model samples/tiny-llama] [--adapter samples/tiny-llama-lora]
                                     [--text samples/sample.txt] [--steps 8] [--batch 8] [--seq-len 64]
                                     [--lr 3e-3] [--out DIR] [--device cpu|cuda] [--threads 1]

The base stays frozen and packed (QuantLinear; its backward pass dequantizes tiles again, no dense weight is
stored); only the adapter's factors train, with a plain torch loop and AdamW. The loss is measured on the
training windows before and after. Without --out everything is written to a temporary folder. One torch
thread by default: the sample model is tiny, and on a shared machine threads that wait for each other make it
several times slower. Needs transformers (model and tokenizer).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402

import qtool.nn as qnn  # noqa: E402
from qtool.jobs.merge import merge_lora  # noqa: E402
from qtool.jobs.quantize import quantize  # noqa: E402
from qtool.quant.spec import QuantSpec  # noqa: E402


def windows(tokenizer, text_path: str, seq_len: int) -> torch.Tensor:
    """The text's token ids cut into [n, seq_len] windows (the tail dropped)."""
    ids = tokenizer(Path(text_path).read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def mean_loss(model, batches: list[torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(model(input_ids=b, labels=b).loss) for b in batches) / len(batches)


def fine_tune(model, data: torch.Tensor, steps: int, batch: int, lr: float, device) -> tuple[float, float]:
    """`steps` AdamW steps on consecutive batches of `data`; the mean loss on those batches before and after."""
    batches = [data[(i * batch) % len(data):][:batch].to(device) for i in range(steps)]
    before = mean_loss(model, batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for b in batches:
        model(input_ids=b, labels=b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return before, mean_loss(model, batches)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE / "tiny-llama"))
    ap.add_argument("--adapter", default=str(HERE / "tiny-llama-lora"))
    ap.add_argument("--text", default=str(HERE / "sample.txt"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=None, help="folder for int4/, adapter/, merged/, merged-int4/ (default: temporary)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run(args, AutoTokenizer.from_pretrained(args.model))
    finally:
        torch.set_num_threads(threads)
    result["seconds"] = time.perf_counter() - start
    print(f"fine-tuned adapter {result['adapter']!r} ({result['trainable']} trainable parameters) on the int4 base: "
          f"loss {result['loss_before']:.3f} -> {result['loss_after']:.3f} over {args.steps} steps of "
          f"{args.batch}x{args.seq_len} tokens")
    print(f"saved, merged into {args.model} and quantized again; {result['seconds']:.1f} s in all")
    return result


def run(args, tokenizer) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        rtn = QuantSpec.default(4, method="rtn")
        quantize(args.model, str(out / "int4"), rtn, device="cpu", overwrite=True)
        model = qnn.load(out / "int4", device=args.device)
        name = qnn.attach_adapter(model, args.adapter, trainable=True)
        data = windows(tokenizer, args.text, args.seq_len)
        before, after = fine_tune(model, data, args.steps, args.batch, args.lr, args.device)
        qnn.save_adapter(model, name, out / "adapter", overwrite=True)
        merge_lora(args.model, [str(out / "adapter")], str(out / "merged"), overwrite=True)
        report = quantize(str(out / "merged"), str(out / "merged-int4"), rtn, device="cpu", overwrite=True)
        return {"loss_before": before, "loss_after": after, "adapter": name,
                "trainable": qnn.parameter_counts(model)["trainable"], "merged_quantized": report["summary"],
                "adapter_files": sorted(p.name for p in (out / "adapter").iterdir())}


if __name__ == "__main__":
    main()
