#!/usr/bin/env python
"""qtool's GPTQ (or AWQ, or eval) with 1 and with N processes (torchrun, gloo, 1 thread each) on the same model and
ids, alternating.

    python bench/gptq_torchrun.py [--job gptq|awq|eval] [--layers 2] [--procs 1 2] [--rounds 2] [--samples 16] [--seq-len 256]

The model and ids are bench/gptq_vs_llmcompressor.py's (2-layer slice of the 1 GB synthetic Llama, 16 × 256 random
ids; `--layers 8` the whole model). `--job eval` evaluates the model's data-free rtn output (made once, int4 g128)
against the model on the ids as evaluation windows. Each run is its own command under /usr/bin/time -v (wall from
this side, CPU = user + sys of every process, the launcher included); each qtool process records its own peak RSS
and CPU seconds (bench/rank_usage.py). Speed-up = median over rounds of (1-process wall ÷ N-process wall).
Afterwards each N-process report's figures are compared with the 1-process run's: per-layer output errors
(`output_error_after`), or for eval ppl, ref_ppl, the KLD statistics, top-1 agreement and the blocks' errors.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from common import PY, WORK, env_info, loadavg, measure, median  # noqa: E402
from gptq_vs_llmcompressor import ensure_ids, ensure_model  # noqa: E402


def rtn_output(model: Path) -> Path:
    """The model's data-free int4 g128 rtn output, made once (what --job eval evaluates)."""
    out = WORK / f"{model.name}-rtn"
    if not (out / "config.json").exists():
        subprocess.run([PY, "-m", "qtool", "quantize", str(model), "-o", str(out), "--quiet", "--overwrite"], check=True)
    return out


def command(model: Path, ids: Path, out: Path, report: Path, procs: int, a) -> list[str]:
    common = [str(ids), "--seq-len", str(a.seq_len), "--device", "cpu", "--quiet", "--report", str(report)]
    if a.job == "eval":
        qtool = [str(BENCH / "rank_usage.py"), "eval", str(rtn_output(model)), "--ref", str(model), "--data", *common,
                 "--samples", str(a.samples)]
    else:
        qtool = [str(BENCH / "rank_usage.py"), "quantize", str(model), "-o", str(out), "--method", a.job, "--calib",
                 *common, "--calib-samples", str(a.samples)]
    if procs == 1:
        return [PY, *qtool]
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *qtool]


def figures(report: dict) -> dict[str, float]:
    """What is compared across process counts: layer output errors, or an eval report's metrics."""
    if report["kind"] == "eval":
        got = {k: report[k] for k in ("ppl", "ref_ppl", "top1_agreement")}
        got.update({f"kld.{k}": v for k, v in report["kld"].items()})
        return got | {f"block {b['index']}": b["hidden_rel_error"] for b in report["blocks"]}
    return {r["name"]: r["output_error_after"] for r in report["layers"] if r.get("output_error_after") is not None}


def one_run(model, ids, procs: int, a, env) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as usage:
        out, report = WORK / f"{a.job}-torchrun-{procs}p", Path(usage) / "report.json"
        load = loadavg()
        res = measure(command(model, ids, out, report, procs, a), out=out, env={**env, "QTOOL_BENCH_USAGE_DIR": usage})
        ranks = [json.loads((Path(usage) / f"rank{r}.json").read_text()) for r in range(procs)]
        errors = figures(json.loads(report.read_text()))
    print(f"{procs} process(es): wall {res.wall_s:7.1f} s  CPU {res.cpu_s:7.1f} s  RSS per rank "
          f"{', '.join('%.2f' % r['rss_gib'] for r in ranks)} GiB  (load {load:.1f})", file=sys.stderr, flush=True)
    return {"wall_s": res.wall_s, "cpu_s": res.cpu_s, "ranks": ranks, "errors": errors}


def render(runs: dict[int, list], base: int) -> str:
    lines = ["| processes | wall s | CPU s (all) | speed-up (wall) | peak RSS per rank GiB | CPU s per rank | "
             "max rel. diff of its figures vs 1 |", "|---:|---:|---:|---:|---|---|---:|"]
    for n, rs in runs.items():
        speed = median([b["wall_s"] / r["wall_s"] for b, r in zip(runs[base], rs)])
        rss = [max(r["ranks"][k]["rss_gib"] for r in rs) for k in range(n)]
        cpu = [median([r["ranks"][k]["cpu_s"] for r in rs]) for k in range(n)]
        e1, en = runs[base][0]["errors"], rs[0]["errors"]
        diff = max(abs(en[k] - e1[k]) / abs(e1[k]) if e1[k] else abs(en[k]) for k in e1) if e1 else float("nan")
        lines.append(f"| {n} | {median([r['wall_s'] for r in rs]):.1f} | {median([r['cpu_s'] for r in rs]):.1f} | "
                     f"{speed:.2f} | {', '.join(f'{x:.2f}' for x in rss)} | {', '.join(f'{x:.1f}' for x in cpu)} | "
                     f"{diff:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--job", choices=["gptq", "awq", "awq+gptq", "eval"], default="gptq")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--model", type=Path, help="any Llama-shaped folder instead (then --layers is ignored)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if 1 not in a.procs:
        a.procs = [1, *a.procs]
    model = a.model or ensure_model(a.layers)
    ids = ensure_ids(model, a.samples, a.seq_len)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs: dict[int, list] = {n: [] for n in a.procs}
    for r in range(a.rounds):
        for n in (a.procs if r % 2 == 0 else a.procs[::-1]):
            runs[n].append(one_run(model, ids, n, a, env))
    print(env_info())
    print(f"{a.job}, model {model.name}, {a.samples} x {a.seq_len} ids, {a.rounds} rounds, 1 thread per process")
    print(render(runs, 1))
    if a.json:
        a.json.write_text(json.dumps({str(n): rs for n, rs in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
