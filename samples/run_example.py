#!/usr/bin/env python
"""Run what qtool writes: quantize the sample model, load it as QuantLinear layers, attach the sample LoRA
adapter on top of the shared int4 base, and generate a few tokens with and without the adapter.

  python samples/run_example.py [--model samples/tiny-llama] [--adapter samples/tiny-llama-lora]
                                [--prompt TEXT] [--tokens N] [--device cpu|cuda]

Needs transformers (to build the model from config.json and to tokenize).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import torch  # noqa: E402

import qtool.nn as qnn  # noqa: E402
from qtool.jobs.quantize import quantize  # noqa: E402
from qtool.quant.spec import QuantSpec  # noqa: E402


def generate(model, tokenizer, prompt: str, tokens: int, device) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE / "tiny-llama"))
    ap.add_argument("--adapter", default=str(HERE / "tiny-llama-lora"))
    ap.add_argument("--prompt", default="The recipe starts with")
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "int4"
        quantize(args.model, str(folder), QuantSpec(bits=4, method="rtn"), device="cpu")
        model = qnn.load(folder, device=args.device)
        fp = qnn.memory_footprint(model)
        base_text = generate(model, tokenizer, args.prompt, args.tokens, args.device)
        name = qnn.attach_adapter(model, args.adapter)
        lora_text = generate(model, tokenizer, args.prompt, args.tokens, args.device)
        qnn.set_adapter(model, None)
        again = generate(model, tokenizer, args.prompt, args.tokens, args.device)
    by_dtype = ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in fp["dtypes"].items())
    print(f"model: {fp['bytes'] / 1e6:.2f} MB in memory ({by_dtype})")
    print(f"prompt:           {args.prompt!r}")
    print(f"int4 base:        {base_text!r}")
    print(f"+ adapter {name!r}: {lora_text!r}")
    print(f"adapter off:      {again!r}")
    return {"base": base_text, "lora": lora_text, "off": again, "footprint": fp, "adapter": name}


if __name__ == "__main__":
    main()
