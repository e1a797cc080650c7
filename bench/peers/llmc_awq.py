#!/usr/bin/env python
"""llm-compressor's AWQ (AWQModifier, then W4A16 round-to-nearest) on a local checkpoint: run with the peers venv.

    bench/_work/peers-venv/bin/python bench/peers/llmc_awq.py MODEL DATA OUT [--samples N] [--seq-len L]
        [--duo-scaling true|false|both] [--encoder]

DATA: a token-id file (`input_ids` [n, L], the same rows qtool reads; the first N are used) or a text file of one
sample per line (tokenized with the model's tokenizer, truncated to L). W4A16 = int4 symmetric, group 128, every
Linear but lm_head; the sequential pipeline; samples in file order; saved compressed (pack-quantized).
--encoder: a BERT-style encoder (AutoModel) with the one exact mapping of a post-LN block, attention.self.value →
attention.output.dense (llm-compressor has no default mappings for BERT).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def dataset(data: str, model_dir: str, samples: int, seq: int):
    import torch
    from datasets import Dataset

    if data.endswith(".safetensors"):
        from safetensors.torch import load_file
        ids = load_file(data)["input_ids"].long()[:samples, :seq]
        return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    lines = [s.strip() for s in Path(data).read_text(encoding="utf-8").splitlines() if s.strip()][:samples]
    enc = tok(lines, truncation=True, max_length=seq)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--duo-scaling", default="true", choices=["true", "false", "both"])
    ap.add_argument("--encoder", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    import cpu_fixes
    from llmc_gptq import token_id_processor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQMapping, AWQModifier
    from transformers import AutoModel, AutoModelForCausalLM

    cpu_fixes.apply()  # AWQ pins memory, which a CPU-only torch refuses
    data = dataset(a.data, a.model, a.samples, a.seq_len)
    cls = AutoModel if a.encoder else AutoModelForCausalLM
    model = cls.from_pretrained(a.model, dtype="auto")
    duo = {"true": True, "false": False, "both": "both"}[a.duo_scaling]
    mappings = [AWQMapping("re:.*attention.self.value$", ["re:.*attention.output.dense$"])] if a.encoder else None
    ignore = ["lm_head"] + (["re:.*pooler.*"] if a.encoder else [])
    recipe = [AWQModifier(mappings=mappings, duo_scaling=duo),
              QuantizationModifier(targets="Linear", scheme="W4A16", ignore=ignore)]
    oneshot(model=model, processor=token_id_processor(a.model), dataset=data, recipe=recipe,
            num_calibration_samples=len(data), max_seq_length=a.seq_len, shuffle_calibration_samples=False,
            pipeline="sequential")
    t_cal = time.perf_counter()
    model.save_pretrained(a.out, save_compressed=True)
    print(f"llmc-awq: {t_cal - t0:.1f} s to calibrate, {time.perf_counter() - t_cal:.1f} s to save", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
