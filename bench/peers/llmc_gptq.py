#!/usr/bin/env python
"""llm-compressor's GPTQ on a local checkpoint and a token-id file: run with the peers venv's python.

    bench/_work/peers-venv/bin/python bench/peers/llmc_gptq.py MODEL IDS.safetensors OUT [--damp 0.01]

W4A16 (int4 symmetric, group 128, scales in the weight dtype) on every Linear but lm_head, GPTQModifier with
block 128, static act-order (its default), damping as given, the sequential pipeline (one decoder layer at a
time, each layer's outputs recomputed with its quantized weights), samples in file order (no shuffle), and
`save_pretrained(save_compressed=True)`: compressed-tensors pack-quantized, like `qtool quantize --method gptq`.
IDS holds `input_ids` [n, L] (the same file qtool reads); every row is one sample of L tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def token_id_processor(model_dir: str):
    """The model's tokenizer, or (a checkpoint without one, like the synthetic bench model) a one-word stand-in.

    oneshot insists on a processor whenever a dataset is given, even one of token ids that it never encodes;
    the stand-in only lets it start (it pads nothing: every sample has the same length)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, TypeError):
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                       unk_token="<unk>", pad_token="<unk>")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("ids")
    ap.add_argument("out")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--pipeline", default="sequential")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(a.ids)["input_ids"].long()
    n, seq = ids.shape
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t_import = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="auto")
    t_load = time.perf_counter()
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], block_size=128,
                          dampening_frac=a.damp, actorder="static")
    oneshot(model=model, processor=token_id_processor(a.model), dataset=data, recipe=recipe, num_calibration_samples=n, max_seq_length=seq,
            shuffle_calibration_samples=False, pipeline=a.pipeline)
    t_cal = time.perf_counter()
    model.save_pretrained(a.out, save_compressed=True)
    t_end = time.perf_counter()
    print(f"llmc-gptq: imports+data {t_import - t0:.1f} s, load {t_load - t_import:.1f} s, "
          f"oneshot {t_cal - t_load:.1f} s, save {t_end - t_cal:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
