#!/usr/bin/env python
"""qtool's GPTQ against llm-compressor's on the same model and token ids, alternating, each in its own process.

    bash bench/peers/setup.sh                                     # once: the bench-only peers venv
    python bench/gptq_vs_llmcompressor.py [--layers 2|8] [--samples 16] [--seq-len 256] [--rounds 3]
                                          [--threads N] [--damp 0.01] [--json FILE]

Model: the synthetic bf16 Llama of bench/synth.py (hidden 2048, intermediate 5632, 16 heads, vocab 32000);
`--layers 2` (default) is a 2-layer slice of the 1 GB model — synth.py draws every tensor from its own seed by
position, so its two blocks hold exactly the 1 GB model's first two — built in _work/llama-1GB-2L; `--layers 8`
is the 1 GB model itself (_work/llama-1GB). Data: `--samples` rows of `--seq-len` random token ids (seed 0),
one safetensors file both tools read (`input_ids`).

Jobs, W4A16: int4 symmetric, group 128, every decoder linear, lm_head and embeddings kept; damping 0.01 of the
mean Hessian diagonal; block 128; act-order (qtool: static groups; llm-compressor: its default `static`); both
walk one decoder layer at a time and recompute each layer's outputs with its quantized weights:
  qtool           qtool quantize MODEL -o OUT --method gptq --calib IDS --calib-samples N --seq-len L --device cpu
  llm-compressor  bench/peers/llmc_gptq.py MODEL IDS OUT (oneshot, GPTQModifier, pipeline="sequential")
Each round runs both, in alternating order (qtool first in even rounds), under /usr/bin/time -v: wall seconds,
CPU seconds (user+sys of the child) and peak RSS. Figures: median over rounds of each, and the median of the
per-round ratios qtool ÷ llm-compressor. After the rounds both outputs are decompressed by compressed-tensors
(this venv's, model-free `CompressedTensorsDequantizer`) and each is run through transformers on the
calibration ids and on as many other random ids: relative error of the last hidden state against the bf16
source's, computed in float32.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import QTOOL, WORK, clean, env_info, loadavg, measure, median, warm  # noqa: E402

PEERS_PY = WORK / "peers-venv" / "bin" / "python"
LLMC = BENCH / "peers" / "llmc_gptq.py"


def ensure_model(layers: int) -> Path:
    """The 1 GB synthetic model (8 layers) or its slice of `layers` blocks, built by synth.py when missing."""
    import synth

    out = WORK / ("llama-1GB" if layers == 8 else f"llama-1GB-{layers}L")
    if not (out / "config.json").exists():
        synth.write_model(out, layers, seed=0)
    return out


def ensure_ids(model: Path, samples: int, seq_len: int, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    path = WORK / f"gptq-ids-{samples}x{seq_len}-vocab{vocab}-seed{seed}.safetensors"
    if not path.exists():
        ids = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))
        save_file({"input_ids": ids}, str(path))
    return path


def commands(model: Path, ids: Path, samples: int, seq_len: int, damp: float, tag: str) -> dict:
    out_q, out_l = WORK / f"gptq-qtool-{tag}", WORK / f"gptq-llmc-{tag}"
    return {
        "qtool": ([QTOOL, "quantize", str(model), "-o", str(out_q), "--method", "gptq", "--calib", str(ids),
                   "--calib-samples", str(samples), "--seq-len", str(seq_len), "--damp", str(damp),
                   "--device", "cpu", "--quiet"], out_q),
        "llm-compressor": ([str(PEERS_PY), str(LLMC), str(model), str(ids), str(out_l), "--damp", str(damp)], out_l),
    }


def rounds(jobs: dict, n: int, env: dict) -> dict[str, list]:
    runs: dict[str, list] = {k: [] for k in jobs}
    names = list(jobs)
    for r in range(n):
        for name in (names if r % 2 == 0 else names[::-1]):
            cmd, out = jobs[name]
            load = loadavg()
            res = measure(cmd, out=out, env=env)
            runs[name].append(res)
            print(f"round {r + 1} {name:15s} wall {res.wall_s:7.1f} s  CPU {res.cpu_s:7.1f} s  "
                  f"RSS {res.rss_gib:.2f} GiB  (load {load:.1f})", file=sys.stderr, flush=True)
    return runs


# ---------------------------------------------------------------- checks
def decompressed(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a compressed-tensors checkpoint, quantized weights decompressed by compressed-tensors."""
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
    from safetensors.torch import load_file

    sd: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    return CompressedTensorsDequantizer(folder, dtype=torch.bfloat16).process(sd)


def last_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.model(input_ids=row[None]).last_hidden_state[0].float() for row in ids])


def check(model_dir: Path, outputs: dict[str, Path], calib_ids: Path) -> dict:
    """Decompress each output with compressed-tensors, run it, and compare hidden states with the source's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ids = load_file(str(calib_ids))["input_ids"]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    held = torch.randint(0, vocab, ids.shape, generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    source = {k: v.clone() for k, v in model.state_dict().items()}
    ref = {"calib": last_hidden(model, ids), "held-out": last_hidden(model, held)}
    linear = sorted(k for k in source if k.startswith("model.layers.") and k.endswith("_proj.weight"))
    out = {}
    for name, folder in outputs.items():
        sd = decompressed(folder)
        missing = [k for k in source if k not in sd]
        assert not missing, f"{name}: {len(missing)} tensors missing after decompression, e.g. {missing[:3]}"
        changed = [k for k in linear if not torch.equal(sd[k].float(), source[k])]
        assert len(changed) == len(linear), f"{name}: only {len(changed)} of {len(linear)} linears quantized"
        model.load_state_dict({k: v.float() for k, v in sd.items() if k in source}, strict=True)
        wrel = [float((sd[k].float() - source[k]).norm() / source[k].norm()) for k in linear]
        out[name] = {"linears_decompressed": len(linear), "mean_weight_rel_error": sum(wrel) / len(wrel),
                     **{f"hidden_rel_error_{k}": float((last_hidden(model, x) - ref[k]).norm() / ref[k].norm())
                        for k, x in (("calib", ids), ("held-out", held))}}
        model.load_state_dict(source, strict=True)
    return out


# ---------------------------------------------------------------- report
def summary(runs: dict[str, list]) -> dict:
    q, l = runs["qtool"], runs["llm-compressor"]
    s = {name: {"wall_s": median([r.wall_s for r in rs]), "cpu_s": median([r.cpu_s for r in rs]),
                "rss_gib": max(r.rss_gib for r in rs), "walls": [round(r.wall_s, 1) for r in rs],
                "cpus": [round(r.cpu_s, 1) for r in rs]} for name, rs in runs.items()}
    s["ratio"] = {"wall": median([a.wall_s / b.wall_s for a, b in zip(q, l)]),
                  "cpu": median([a.cpu_s / b.cpu_s for a, b in zip(q, l)]),
                  "rss": s["qtool"]["rss_gib"] / s["llm-compressor"]["rss_gib"]}
    return s


def render(s: dict, quality: dict | None) -> str:
    lines = ["| tool | wall s | CPU s | peak RSS GiB | walls per round | CPU s per round |",
             "|---|---:|---:|---:|---|---|"]
    for name in ("qtool", "llm-compressor"):
        r = s[name]
        lines.append(f"| {name} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rss_gib']:.2f} | "
                     f"{', '.join(map(str, r['walls']))} | {', '.join(map(str, r['cpus']))} |")
    x = s["ratio"]
    lines.append(f"| qtool ÷ llm-compressor (median of per-round ratios) | {x['wall']:.2f} | {x['cpu']:.2f} | "
                 f"{x['rss']:.2f} | | |")
    if quality:
        lines += ["", "| output | linears decompressed | mean weight rel. error | last hidden rel. error (calib ids) "
                  "| (held-out ids) |", "|---|---:|---:|---:|---:|"]
        for name, q in quality.items():
            lines.append(f"| {name} | {q['linears_decompressed']} | {q['mean_weight_rel_error']:.4f} | "
                         f"{q['hidden_rel_error_calib']:.4f} | {q['hidden_rel_error_held-out']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="2: slice of the 1 GB model; 8: the whole 1 GB model")
    ap.add_argument("--model", type=Path, help="any Llama-shaped folder instead (then --layers is ignored)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--threads", type=int, help="OMP/MKL threads of both children (default: torch's own)")
    ap.add_argument("--no-check", action="store_true", help="skip decompression and the hidden-state errors")
    ap.add_argument("--check-only", nargs=2, type=Path, metavar=("QTOOL_OUT", "LLMC_OUT"),
                    help="no runs: only the decompression check and errors of two existing outputs")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if not PEERS_PY.exists() and not a.check_only:
        sys.exit(f"error: {PEERS_PY}: no peers venv; run `bash bench/peers/setup.sh` first")
    model = a.model or ensure_model(a.layers)
    ids = ensure_ids(model, a.samples, a.seq_len)
    if a.check_only:
        quality = check(model, dict(zip(("qtool", "llm-compressor"), a.check_only)), ids)
        print(json.dumps(quality, indent=2))
        return 0
    warm(model)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if a.threads:
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    jobs = commands(model, ids, a.samples, a.seq_len, a.damp, model.name)
    print(f"{env_info()}; model {model} ({a.samples} x {a.seq_len} ids); {a.rounds} rounds", file=sys.stderr)
    s = summary(rounds(jobs, a.rounds, env))
    quality = None if a.no_check else check(model, {k: out for k, (_, out) in jobs.items()}, ids)
    print(render(s, quality))
    if a.json:
        a.json.write_text(json.dumps({"model": str(model), "samples": a.samples, "seq_len": a.seq_len,
                                      "rounds": a.rounds, "threads": a.threads, "env": env_info(), "summary": s,
                                      "quality": quality, "commands": {k: c for k, (c, _) in jobs.items()}},
                                     indent=2) + "\n")
    for _, out in jobs.values():
        clean(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
