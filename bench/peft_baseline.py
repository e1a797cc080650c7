"""The transformers + PEFT merge path qtool's merge-lora is compared with (peer-baselines.md's last row).

    python bench/peft_baseline.py BASE ADAPTER OUT

Load the base in bf16, attach the adapter, merge_and_unload, save_pretrained with 500MB shards.
"""
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main(base: str, adapter: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size="500MB")


if __name__ == "__main__":
    main(*sys.argv[1:4])
