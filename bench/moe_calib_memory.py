"""Peak memory of calibrating a ≥ 1 GB synthetic mixture-of-experts model on the CPU, against its size and one block.

    python bench/moe_calib_memory.py [--layers 2,8] [--experts 8] [--samples 8] [--seq-len 128] [--gptq] [--baseline]

Builds (once) `bench/_work/mixtral-<N>e-<L>l`: Mixtral-shaped bf16 checkpoints in the Hub's layout (per-expert 2-D
`block_sparse_moe.experts.E.w1/w2/w3`, names and shapes from transformers' own reverse conversion of the meta
model), hidden 1024, 8 experts of intermediate 2816, top-2, vocab 32000: 144 MB per block, 1.28 GB at 8 blocks,
0.42 GB at 2. For each depth, each as its own process under /usr/bin/time -v: a floor (imports and the meta model,
no data) and `qtool calibrate --moe-calib routed`; at the deepest also `--moe-calib all`, optionally
`qtool quantize --method gptq`, and optionally a plain transformers baseline that loads the whole model and runs
the same ids with hooks on it. A walk that holds one block has the same peak at every depth.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, QTOOL, WORK, dir_bytes, measure  # noqa: E402
from synth import SHARD_BYTES, draw, shard_plan  # noqa: E402

FLOOR = """import sys, torch, transformers
from qtool.checkpoint import open_checkpoint
from qtool.calib.model import build_architecture
build_architecture(open_checkpoint(sys.argv[1]))
"""

BASELINE = """import sys, torch, transformers
from safetensors.torch import load_file
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16).eval()
ids = load_file(sys.argv[2])["input_ids"]
seen = []
hooks = [x.register_forward_pre_hook(lambda mod, a: seen.append(a[0].float().square().sum(0)))
         for x in m.modules() if isinstance(x, torch.nn.Linear)]
with torch.no_grad():
    for row in ids:
        m(input_ids=row[None], use_cache=False)
"""


def mixtral_config(layers: int, experts: int):
    from transformers import MixtralConfig
    return MixtralConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=2, num_local_experts=experts, num_experts_per_tok=2, vocab_size=32000,
                         tie_word_embeddings=False, dtype=torch.bfloat16)


def hub_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The checkpoint names and shapes `save_pretrained` writes: transformers' reverse conversion of the meta model."""
    from transformers import MixtralForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    with torch.device("meta"):
        model = MixtralForCausalLM(cfg)
    return {n: tuple(t.shape) for n, t in revert_weight_conversion(model, model.state_dict()).items()}


def write_model(out: Path, layers: int, experts: int, seed: int = 0) -> None:
    cfg = mixtral_config(layers, experts)
    shapes = hub_shapes(cfg)
    names = sorted(shapes)
    out.mkdir(parents=True, exist_ok=True)
    shards = shard_plan([(n, 2 * torch.Size(shapes[n]).numel()) for n in names], SHARD_BYTES)
    weight_map = {}
    for k, part in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: torch.ones(shapes[n], dtype=torch.bfloat16) if "norm" in n else
                   draw(shapes[n], seed * 100003 + names.index(n), 0.02) for n in part}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        del tensors
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    cfg.save_pretrained(out)


def run_depth(layers: int, experts: int, a, work: Path) -> tuple[dict, list]:
    model = WORK / f"mixtral-{experts}e-{layers}l"
    if not (model / "config.json").exists():
        write_model(model, layers, experts)
    from qtool.checkpoint import open_checkpoint
    ckpt = open_checkpoint(model)
    facts = {"model": model, "bytes": sum(i.nbytes for i in ckpt.tensors.values()), "layers": layers,
             "block": sum(i.nbytes for n, i in ckpt.tensors.items() if n.startswith("model.layers.0."))}
    calib = ["--calib", str(work / "ids.safetensors"), "--calib-samples", str(a.samples), "--seq-len", str(a.seq_len),
             "--quiet", "--device", "cpu"]
    jobs = [("floor: imports + meta model", [PY, "-c", FLOOR, str(model)])]
    for mode in ("routed", "all") if layers == max(a.layers) else ("routed",):
        jobs.append((f"qtool calibrate --moe-calib {mode}",
                     [QTOOL, "calibrate", str(model), "-o", str(work / f"{mode}-{layers}.safetensors"), "--moe-calib", mode, *calib]))
    if a.gptq and layers == max(a.layers):
        jobs.append(("qtool quantize --method gptq", [QTOOL, "quantize", str(model), "-o", str(work / "gptq"),
                                                      "--method", "gptq", *calib]))
    if a.baseline and layers == max(a.layers):
        jobs.append(("transformers: whole model + hooks", [PY, "-c", BASELINE, str(model), str(work / "ids.safetensors")]))
    return facts, [(label, measure(cmd)) for label, cmd in jobs]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8],
                    help="model depths to run, comma-separated (the deepest also runs `all`, --gptq, --baseline)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--gptq", action="store_true", help="also time quantize --method gptq (slow on 2 cores)")
    ap.add_argument("--baseline", action="store_true", help="also run a whole-model transformers forward with hooks")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moe-calib-mem-"))
    ids = torch.randint(0, 32000, (a.samples, a.seq_len), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, work / "ids.safetensors")
    results = [run_depth(layers, a.experts, a, work) for layers in a.layers]
    shutil.rmtree(work, ignore_errors=True)
    gib = 2 ** 30
    print(f"{a.experts} experts per block (top-2), {a.samples} samples x {a.seq_len} tokens, --device cpu\n")
    print("| model | job | wall s | peak RSS GiB | above floor GiB | above floor ÷ one block | RSS ÷ model |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for facts, rows in results:
        floor = rows[0][1].rss_gib
        label0 = (f"{facts['layers']} blocks of {facts['block'] / 1e6:.0f} MB, {facts['bytes'] / 1e9:.2f} GB")
        for label, r in rows:
            above = r.rss_gib - floor
            print(f"| {label0} | {label} | {r.wall_s:.1f} | {r.rss_gib:.2f} | {above:.2f} | "
                  f"{above * gib / facts['block']:.2f} | {r.rss_gib * gib / facts['bytes']:.2f} |")


if __name__ == "__main__":
    main()
