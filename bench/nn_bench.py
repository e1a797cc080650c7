"""qtool.nn: QuantLinear forward speed against dense bf16, one QLoRA training step's peak memory against
`qtool inspect --lora-rank 16`'s estimate, and the peak memory of loading a quantized 1 GB Llama.

    python bench/nn_bench.py [--only speed,train,load] [--threads N] [--repeats N] [--rounds N]
                             [--tokens 128,512] [--device cpu|cuda]

Speed (paired, in one process): one layer of each Llama MLP shape ([5632, 2048] gate/up, [2048, 5632] down),
int4 sym g128 and int8 sym per channel, bf16 input of batch 1 and 64. Each repeat times, in turn, QuantLinear on
its picked path (torch's int4/int8 kernel up to its batch limit, else tiles), QuantLinear on the tiled path
(kernels=False), the same with float32 tiles (the code before the kernels: "before"), nn.Linear holding the
dequantized weight in bf16 and in float32; each variant is called until 20 ms have passed and timed per call.
Reported: the median over repeats of the per-repeat ratios (dense bf16 ÷ QuantLinear: the speed-up;
QuantLinear ÷ before), and the median per-call time. CPU time of this process (other processes
sharing the cores do not count) and wall time; 1 torch thread by default (with 2, OpenMP threads spinning on a
shared machine make CPU time meaningless).

Train: the synthetic bf16 Llama of bench/synth.py (hidden 2048, intermediate 5632, 8 layers, vocab 32000,
1.08 GB) quantized with `qtool quantize --method rtn` (int4 sym g128) into bench/_work/nn-llama-1GB-int4. Each
round runs, each in its own process under /usr/bin/time -v: the floor (imports + the model built on the meta
device, no data) and, per token count T, one training step: qtool.load, add_adapter(r=16, alpha=32,
targets="all-linear"), AdamW, forward + backward + optimizer step on one sequence of T random tokens. Peak RSS of
the step minus the floor's is compared with `qtool inspect SRC --lora-rank 16 --lora-tokens T --json`'s
lora_training.total_bytes. Medians over rounds.

Load: each loader in its own process; the same floor subtracted from both:
  qtool.load                 builds the model on the meta device, QuantLinear layers hold the packed tensors;
  transformers dequantize    AutoModelForCausalLM.from_pretrained(..., CompressedTensorsConfig(dequantize=True)).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PY, QTOOL, REPO, WORK, env_info, loadavg, measure, median, model_dir  # noqa: E402

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
TRAIN_STEP = """
import sys, json, time, torch, qtool.nn as q
path, tokens, threads, device, live = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
torch.set_num_threads(threads)
torch.manual_seed(0)
m = q.load(path, device=device)
q.add_adapter(m, r=16, alpha=32, targets="all-linear")
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, m.config.vocab_size, (1, tokens), device=device)
m.train()
prof = None
if live:  # torch's own allocation events, integrated in time order: the peak of live tensor bytes
    from torch.profiler import profile, ProfilerActivity
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True).__enter__()
held = q.memory_footprint(m)["bytes"] + sum(p.numel() * p.element_size() for p in opt.param_groups[0]["params"])
t = time.perf_counter()
loss = m(input_ids=ids, labels=ids).loss
loss.backward()
opt.step()
step_s = time.perf_counter() - t
peak = None
if prof is not None:
    prof.__exit__(None, None, None)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    cur = peak = 0
    for _, nb in events:
        cur += nb
        peak = max(peak, cur)
    peak += held
paths = sorted({x.path.name for x in m.modules() if isinstance(x, q.QuantLinear)})
print(json.dumps({"step_s": step_s, "loss": float(loss), "paths": paths, "held_bytes": held, "live_peak_bytes": peak}))
"""


def ensure_models() -> tuple[Path, Path]:
    src = model_dir("1GB")
    if not src.exists():
        subprocess.run([PY, str(REPO / "bench" / "synth.py"), "--size", "1GB"], check=True, cwd=REPO)
    if not (QUANT / "config.json").exists():
        subprocess.run([QTOOL, "quantize", str(src), "-o", str(QUANT), "--method", "rtn", "--overwrite", "--quiet"],
                       check=True, cwd=REPO)
    return src, QUANT


# ---- speed ------------------------------------------------------------------------------------------------
def _per_call_ms(fn, budget_s: float = 0.02) -> tuple[float, float]:
    """(CPU ms, wall ms) per call of fn, calling it until `budget_s` of wall time has passed."""
    fn()
    n, c0, w0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - w0 < budget_s or n < 3:
        fn()
        n += 1
    return (time.process_time() - c0) * 1e3 / n, (time.perf_counter() - w0) * 1e3 / n


def _variants(out_f: int, in_f: int, spec, device):
    import torch

    from qtool.nn import QuantLinear

    g = torch.Generator().manual_seed(out_f + spec.bits)
    lin = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = torch.nn.Parameter((torch.randn(out_f, in_f, generator=g) * 0.02).to(torch.bfloat16),
                                    requires_grad=False)
    fast = QuantLinear.from_linear(lin, spec).to(device)
    tiled = QuantLinear.from_linear(lin, spec, kernels=False).to(device)
    dense16 = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16, device=device)
    dense16.weight.data = fast.dequantize(torch.bfloat16)
    dense32 = torch.nn.Linear(in_f, out_f, bias=False, device=device)
    dense32.weight.data = fast.dequantize(torch.float32)
    return fast, {"quant": fast, "tiled": tiled, "today": _float32_tiles(tiled), "dense_bf16": dense16,
                  "dense_fp32": lambda x: dense32(x.float())}


def _float32_tiles(layer):
    """The tiled path as it was before the kernels: compressed-tensors' words, tiles multiplied in float32."""
    import qtool.nn.kernels as kn

    def run(x):
        native, kn.native_bf16 = kn.native_bf16, (lambda: False)
        try:
            return layer(x)
        finally:
            kn.native_bf16 = native
    return run


def bench_speed(repeats: int, device: str) -> list[dict]:
    import torch

    from qtool.quant.spec import QuantSpec

    rows = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for out_f, in_f in ((5632, 2048), (2048, 5632)):
        for spec in (QuantSpec(4, True, 128, "rtn"), QuantSpec(8, True, -1, "rtn")):
            fast, layers = _variants(out_f, in_f, spec, device)
            for batch in (1, 64):
                x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(batch)).to(torch.bfloat16)
                x = x.to(device)
                times = {k: [] for k in layers}
                with torch.no_grad():
                    for _ in range(repeats):
                        for k, layer in layers.items():
                            times[k].append(_per_call_ms(lambda: (layer(x), sync())))
                rows.append(_speed_row(out_f, in_f, spec, batch, fast, times))
    return rows


def _speed_row(out_f, in_f, spec, batch, fast, times) -> dict:
    import torch

    probe = torch.empty(batch, in_f, dtype=torch.bfloat16, device=fast.device)  # the kernel's batch limit
    row = {"shape": [out_f, in_f], "scheme": f"int{spec.bits} " + ("g128" if spec.group_size > 0 else "channel"),
           "batch": batch, "path": fast.path.name if fast.path.serves(probe) else f"{fast.path.name} (tiles)"}
    for i, clock in enumerate(("cpu", "wall")):
        for k, ts in times.items():
            row[f"{k}_{clock}_ms"] = median([t[i] for t in ts])
        row[f"speedup_vs_bf16_{clock}"] = median([d[i] / q[i] for d, q in zip(times["dense_bf16"], times["quant"])])
        row[f"vs_today_{clock}"] = median([q[i] / t[i] for q, t in zip(times["quant"], times["today"])])
    return row


# ---- one training step ------------------------------------------------------------------------------------
def bench_train(rounds: int, tokens: list[int], threads: int, device: str) -> dict:
    """Per round: the floor, then per token count one step under glibc's default malloc and one with a fixed
    mmap threshold (MALLOC_MMAP_THRESHOLD_=131072: freed buffers go back to the OS at once, so RSS follows the
    live tensors); once per token count the live tensor peak from torch's profiler."""
    import os

    _, q = ensure_models()
    estimates = {t: _estimate(q, t) for t in tokens}
    fixed = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = {"floor": [], **{(t, k): [] for t in tokens for k in ("default", "fixed")}}
    for _ in range(rounds):
        runs["floor"].append(measure([PY, "-c", IDLE, str(q)]))
        for t in tokens:
            for kind, env in (("default", None), ("fixed", fixed)):
                runs[(t, kind)].append(measure([PY, "-c", TRAIN_STEP, str(q), str(t), str(threads), device, "0"],
                                               env=env))
    gib = 2 ** 30
    floor = median([r.rss_gib for r in runs["floor"]])
    result = {"floor_rss_gib": floor, "steps": []}
    for t in tokens:
        live = _last_json(measure([PY, "-c", TRAIN_STEP, str(q), str(t), str(threads), device, "1"]))
        est = estimates[t]["total_bytes"] / gib
        step = {"tokens": t, "estimate_gib": est, "estimate": estimates[t], "live_peak_gib": live["live_peak_bytes"] / gib,
                "held_gib": live["held_bytes"] / gib, "paths": live["paths"],
                "step_s": median([_last_json(r)["step_s"] for r in runs[(t, "default")]])}
        for kind in ("default", "fixed"):
            peak = median([r.rss_gib for r in runs[(t, kind)]])
            step[f"rss_{kind}_gib"] = peak - floor
        step["ratios"] = {k: step[f"{k}_gib"] / est for k in ("live_peak", "rss_default", "rss_fixed")}
        result["steps"].append(step)
    return result


def _estimate(q: Path, tokens: int) -> dict:
    out = subprocess.run([QTOOL, "inspect", str(q), "--lora-rank", "16", "--lora-tokens", str(tokens), "--json"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(out)["lora_training"]


def _last_json(run) -> dict:
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---- load -------------------------------------------------------------------------------------------------
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


# ---- printing ---------------------------------------------------------------------------------------------
def print_speed(rows, repeats, threads) -> None:
    print(f"\nforward per call, median of {repeats} paired repeats, {threads} torch thread(s), bf16 input; "
          "speed-up = dense bf16 time / QuantLinear time")
    print("| shape [out, in] | scheme | batch | path | QuantLinear ms | tiled ms | before (fp32 tiles) ms "
          "| dense bf16 ms | dense fp32 ms | speed-up vs bf16 (CPU / wall) | time vs before (CPU / wall) |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['scheme']} | {r['batch']} | {r['path']} | {r['quant_cpu_ms']:.2f} | "
              f"{r['tiled_cpu_ms']:.2f} | {r['today_cpu_ms']:.2f} | {r['dense_bf16_cpu_ms']:.2f} | "
              f"{r['dense_fp32_cpu_ms']:.2f} | {r['speedup_vs_bf16_cpu']:.2f}x / {r['speedup_vs_bf16_wall']:.2f}x | "
              f"{r['vs_today_cpu']:.2f}x / {r['vs_today_wall']:.2f}x |")


def print_train(tr, rounds) -> None:
    print(f"\none QLoRA training step (r=16 all-linear, AdamW) against `qtool inspect --lora-rank 16 --lora-tokens T`;"
          f" RSS: median of {rounds} rounds minus the floor ({tr['floor_rss_gib']:.3f} GiB)")
    print("| tokens T | estimate GiB | live tensors peak GiB (÷ est.) | RSS, glibc default GiB (÷ est.) "
          "| RSS, fixed mmap threshold GiB (÷ est.) | step s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in tr["steps"]:
        r = s["ratios"]
        print(f"| {s['tokens']} | {s['estimate_gib']:.3f} | {s['live_peak_gib']:.3f} ({r['live_peak']:.2f}) | "
              f"{s['rss_default_gib']:.3f} ({r['rss_default']:.2f}) | {s['rss_fixed_gib']:.3f} ({r['rss_fixed']:.2f}) | "
              f"{s['step_s']:.1f} |")


def print_load(ld) -> None:
    print(f"\ndense bf16 {ld['dense_bf16_gib']:.3f} GiB, packed {ld['packed_gib']:.3f} GiB, "
          f"idle process {ld['idle_rss_gib']:.3f} GiB")
    for k in ("qtool_load", "transformers_dequantize"):
        r = ld[k]
        print(f"{k:24s} peak RSS {r['peak_rss_gib']:.3f} GiB, above idle {r['above_idle_gib']:.3f} GiB "
              f"({r['above_idle_gib'] / ld['packed_gib']:.2f}x packed, {r['above_idle_gib'] / ld['dense_bf16_gib']:.2f}x"
              f" dense), model {r['model_bytes_gib']:.3f} GiB, {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="speed,train,load", help="comma-separated: speed, train, load")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for speed and train (default 1)")
    ap.add_argument("--repeats", type=int, default=7, help="paired speed repeats")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the training-step processes")
    ap.add_argument("--tokens", default="128,512", help="tokens of the training step, comma-separated")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    import torch

    only = set(args.only.split(","))
    torch.set_num_threads(args.threads)
    result = {"env": env_info(), "loadavg_start": loadavg(), "threads": args.threads, "device": args.device}
    if "speed" in only:
        result["speed"] = bench_speed(args.repeats, args.device)
        print_speed(result["speed"], args.repeats, args.threads)
    if "train" in only:
        result["train"] = bench_train(args.rounds, [int(t) for t in args.tokens.split(",")], args.threads,
                                      args.device)
        print_train(result["train"], args.rounds)
    if "load" in only:
        result["load"] = bench_load()
        print_load(result["load"])
    result["loadavg_end"] = loadavg()
    WORK.mkdir(exist_ok=True)
    (WORK / "nn_bench.json").write_text(json.dumps(result, indent=1))
    print(f"\nload average {result['loadavg_start']:.1f} -> {result['loadavg_end']:.1f}; "
          f"written {WORK / 'nn_bench.json'}")


if __name__ == "__main__":
    main()
