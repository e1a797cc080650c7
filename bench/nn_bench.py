"""qtool.nn: peak memory of loading a quantized 1 GB Llama, and QuantLinear speed against a dense nn.Linear.

    python bench/nn_bench.py [--skip-load] [--skip-speed] [--threads N] [--repeats N]

Load: the synthetic bf16 Llama of bench/synth.py (hidden 2048, intermediate 5632, 8 layers, 16 heads, vocab 32000,
1.08 GB) is quantized once with `qtool quantize --method rtn` (int4 sym group 128) into bench/_work/nn-llama-1GB-int4.
Each loader then runs in its own process under /usr/bin/time -v (peak RSS includes imports); an idle process that
imports torch, transformers and qtool.nn and builds the model on the meta device (no data) gives the floor
subtracted from both:
  qtool.load                 builds the model on the meta device, QuantLinear layers hold the packed tensors;
  transformers dequantize    AutoModelForCausalLM.from_pretrained(..., CompressedTensorsConfig(dequantize=True)).
Speed: one layer of each Llama MLP shape, int4 g128 and int8 channel, bf16 input, batch 1 and 64; the CPU time of
the forward (process time, min over repeats: other processes sharing the cores do not count) against nn.Linear
holding the dequantized weight, in bf16 and in float32.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, QTOOL, REPO, WORK, env_info, loadavg, measure, model_dir  # noqa: E402

QUANT = WORK / "nn-llama-1GB-int4"
# the floor: imports plus the model built on the meta device (transformers' modeling code), no tensor data
IDLE = ("import sys, torch, qtool.nn; from qtool.checkpoint import open_checkpoint; "
        "from qtool.nn.load import _build_transformers; _build_transformers(open_checkpoint(sys.argv[1]), None)")
QTOOL_LOAD = ("import sys, qtool.nn as q; m = q.load(sys.argv[1]); "
              "print(q.memory_footprint(m)['bytes'])")
HF_LOAD = ("import sys, warnings; warnings.filterwarnings('ignore'); "
           "from transformers import AutoModelForCausalLM; "
           "from transformers.utils.quantization_config import CompressedTensorsConfig as C; "
           "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=C(dequantize=True)); "
           "print(sum(p.numel() * p.element_size() for p in m.parameters()))")


def ensure_models() -> tuple[Path, Path]:
    src = model_dir("1GB")
    if not src.exists():
        subprocess.run([PY, str(REPO / "bench" / "synth.py"), "--size", "1GB"], check=True, cwd=REPO)
    if not (QUANT / "config.json").exists():
        subprocess.run([QTOOL, "quantize", str(src), "-o", str(QUANT), "--method", "rtn", "--overwrite", "--quiet"],
                       check=True, cwd=REPO)
    return src, QUANT


def bench_load() -> dict:
    from qtool.checkpoint import open_checkpoint

    src, q = ensure_models()
    dense = sum(i.nbytes for i in open_checkpoint(src).tensors.values())
    packed = sum(i.nbytes for i in open_checkpoint(q).tensors.values())
    idle = measure([PY, "-c", IDLE, str(q)])
    ours = measure([PY, "-c", QTOOL_LOAD, str(q)])
    hf = measure([PY, "-c", HF_LOAD, str(q)])
    gib = 2**30
    return {
        "dense_bf16_gib": dense / gib, "packed_gib": packed / gib, "idle_rss_gib": idle.rss_gib,
        "qtool_load": {"peak_rss_gib": ours.rss_gib, "above_idle_gib": ours.rss_gib - idle.rss_gib,
                       "model_bytes_gib": int(ours.stdout.strip()) / gib, "wall_s": ours.wall_s, "cpu_s": ours.cpu_s},
        "transformers_dequantize": {"peak_rss_gib": hf.rss_gib, "above_idle_gib": hf.rss_gib - idle.rss_gib,
                                    "model_bytes_gib": int(hf.stdout.strip()) / gib, "wall_s": hf.wall_s,
                                    "cpu_s": hf.cpu_s},
    }


def _cpu_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best * 1e3


def bench_speed(repeats: int) -> list[dict]:
    import torch

    from qtool.nn import QuantLinear
    from qtool.quant.spec import QuantSpec

    rows = []
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in ((5632, 2048), (2048, 5632)):
        w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16)
        for spec in (QuantSpec(4, True, 128, "rtn"), QuantSpec(8, True, -1, "rtn")):
            layer = QuantLinear.from_linear(_linear(w), spec)
            dense16 = _linear(layer.dequantize(torch.bfloat16))
            dense32 = _linear(layer.dequantize(torch.float32))
            for batch in (1, 64):
                x = torch.randn(batch, in_f, generator=g).to(torch.bfloat16)
                with torch.no_grad():
                    q_ms = _cpu_ms(lambda: layer(x), repeats)
                    d16 = _cpu_ms(lambda: dense16(x), repeats)
                    d32 = _cpu_ms(lambda: dense32(x.float()), repeats)
                rows.append({"shape": [out_f, in_f], "scheme": f"int{spec.bits} "
                             + ("g128" if spec.group_size > 0 else "channel"), "batch": batch,
                             "quant_ms": q_ms, "dense_bf16_ms": d16, "dense_fp32_ms": d32,
                             "packed_mb": layer.weight_nbytes / 1e6, "dense_bf16_mb": w.numel() * 2 / 1e6})
    return rows


def _linear(w):
    import torch

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    return lin


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the speed runs (default: torch's)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"env": env_info(), "loadavg_start": loadavg(), "threads": torch.get_num_threads()}
    if not args.skip_load:
        result["load"] = bench_load()
        ld = result["load"]
        print(f"dense bf16 {ld['dense_bf16_gib']:.3f} GiB, packed {ld['packed_gib']:.3f} GiB, "
              f"idle process {ld['idle_rss_gib']:.3f} GiB")
        for k in ("qtool_load", "transformers_dequantize"):
            r = ld[k]
            print(f"{k:24s} peak RSS {r['peak_rss_gib']:.3f} GiB, above idle {r['above_idle_gib']:.3f} GiB "
                  f"({r['above_idle_gib'] / ld['packed_gib']:.2f}x packed, {r['above_idle_gib'] / ld['dense_bf16_gib']:.2f}x"
                  f" dense), model {r['model_bytes_gib']:.3f} GiB, {r['wall_s']:.1f} s wall")
    if not args.skip_speed:
        result["speed"] = bench_speed(args.repeats)
        print(f"\nforward CPU ms (min of {args.repeats}), {result['threads']} threads, bf16 input")
        print("| shape [out, in] | scheme | batch | QuantLinear | dense bf16 | dense fp32 | vs bf16 | vs fp32 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["speed"]:
            print(f"| {r['shape']} | {r['scheme']} | {r['batch']} | {r['quant_ms']:.2f} | {r['dense_bf16_ms']:.2f} | "
                  f"{r['dense_fp32_ms']:.2f} | {r['quant_ms'] / r['dense_bf16_ms']:.2f}x | "
                  f"{r['quant_ms'] / r['dense_fp32_ms']:.2f}x |")
    result["loadavg_end"] = loadavg()
    WORK.mkdir(exist_ok=True)
    (WORK / "nn_bench.json").write_text(json.dumps(result, indent=1))
    print(f"\nload average {result['loadavg_start']:.1f} -> {result['loadavg_end']:.1f}; "
          f"written {WORK / 'nn_bench.json'}")


if __name__ == "__main__":
    main()
