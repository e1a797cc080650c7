"""`qtool eval` against the plain transformers way (bench/eval_plain.py), paired in the same run.

    python bench/eval_bench.py [--sizes 1GB,4GB] [--windows 4] [--seq-len 512] [--rounds 3]

For each size: the synthetic bf16 Llama of synth.py and its int4 rtn quantization (`qtool quantize --method rtn`,
group 128), `--windows` rows of random token ids (fixed seed). Each round runs `qtool eval Q --ref SRC --data IDS
--json` and `python bench/eval_plain.py Q SRC IDS` as separate processes under /usr/bin/time -v, alternating which
goes first, after one untimed warm-up of each; the page cache holds both models (read once before). The two must
agree (ppl to 1e-5 relative, every KLD statistic and hidden error to 1e-5 absolute, top-1 exactly); the table gives
median wall and CPU time, their ratios, and peak RSS. Results also go to bench/_work/eval_bench.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, PY, QTOOL, WORK, env_info, loadavg, measure, median, model_dir, warm  # noqa: E402


def prepare(size: str, windows: int, seq_len: int) -> tuple[Path, Path, Path]:
    src = model_dir(size)
    if not (src / "config.json").exists():
        subprocess.run([PY, str(BENCH / "synth.py"), "--size", size, "--no-adapter"], check=True)
    q = WORK / f"llama-{size}-int4-rtn"
    if not (q / "config.json").exists():
        subprocess.run([QTOOL, "quantize", str(src), "-o", str(q), "--method", "rtn", "--quiet"], check=True)
    data = WORK / f"eval-ids-{windows}x{seq_len}.safetensors"
    if not data.exists():
        import torch
        from safetensors.torch import save_file
        g = torch.Generator().manual_seed(0)
        save_file({"input_ids": torch.randint(0, 32000, (windows, seq_len), generator=g)}, str(data))
    return src, q, data


def agree(a: dict, b: dict) -> None:
    """qtool's numbers against the plain script's: raise when they are not the same numbers."""
    problems = []
    if abs(a["ppl"] / b["ppl"] - 1) > 1e-5 or abs(a["ppl_ratio"] / b["ppl_ratio"] - 1) > 1e-5:
        problems.append(f"ppl {a['ppl']} vs {b['ppl']}")
    problems += [f"kld {k} {a['kld'][k]} vs {v}" for k, v in b["kld"].items() if abs(a["kld"][k] - v) > 1e-5]
    if a["top1_agreement"] != b["top1_agreement"]:
        problems.append(f"top1 {a['top1_agreement']} vs {b['top1_agreement']}")
    problems += [f"block {x['index']} {x['hidden_rel_error']} vs {y['hidden_rel_error']}"
                 for x, y in zip(a["blocks"], b["blocks"]) if abs(x["hidden_rel_error"] - y["hidden_rel_error"]) > 1e-5]
    if problems:
        raise SystemExit("qtool eval and the plain script disagree: " + "; ".join(problems))


def bench(size: str, windows: int, seq_len: int, rounds: int) -> dict:
    src, q, data = prepare(size, windows, seq_len)
    warm(src)
    warm(q)
    cmds = {
        "qtool": [QTOOL, "eval", str(q), "--ref", str(src), "--data", str(data), "--seq-len", str(seq_len), "--json"],
        "plain": [PY, str(BENCH / "eval_plain.py"), str(q), str(src), str(data), "--seq-len", str(seq_len)],
    }
    runs: dict[str, list] = {k: [] for k in cmds}
    for k, c in cmds.items():   # warm-up, untimed
        measure(c)
    for r in range(rounds):
        for k in (("qtool", "plain") if r % 2 == 0 else ("plain", "qtool")):
            runs[k].append(measure(cmds[k]))
            print(f"  {size} {k}: {runs[k][-1].wall_s:.1f} s wall, {runs[k][-1].cpu_s:.1f} s cpu, "
                  f"{runs[k][-1].rss_gib:.2f} GiB (load {loadavg():.1f})", file=sys.stderr)
    out_q, out_p = json.loads(runs["qtool"][-1].stdout), json.loads(runs["plain"][-1].stdout)
    agree(out_q, out_p)
    row = {"size": size, "tokens": out_q["tokens"], "ppl": out_q["ppl"], "kld_mean": out_q["kld"]["mean"],
           "top1": out_q["top1_agreement"]}
    for k, rs in runs.items():
        row[k] = {"wall_s": median([x.wall_s for x in rs]), "cpu_s": median([x.cpu_s for x in rs]),
                  "rss_gib": max(x.rss_gib for x in rs), "walls": [round(x.wall_s, 2) for x in rs]}
    row["wall_ratio"] = row["qtool"]["wall_s"] / row["plain"]["wall_s"]
    row["cpu_ratio"] = row["qtool"]["cpu_s"] / row["plain"]["cpu_s"]
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1GB,4GB")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    print(env_info(), file=sys.stderr)
    rows = [bench(s, a.windows, a.seq_len, a.rounds) for s in a.sizes.split(",")]
    print(f"| model | tokens | qtool eval wall / cpu | plain wall / cpu | wall ratio | cpu ratio | peak RSS qtool | peak RSS plain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['size']} | {r['tokens']} | {r['qtool']['wall_s']:.1f} s / {r['qtool']['cpu_s']:.1f} s | "
              f"{r['plain']['wall_s']:.1f} s / {r['plain']['cpu_s']:.1f} s | {r['wall_ratio']:.2f}x | {r['cpu_ratio']:.2f}x | "
              f"{r['qtool']['rss_gib']:.2f} GiB | {r['plain']['rss_gib']:.2f} GiB |")
    WORK.mkdir(exist_ok=True)
    (WORK / "eval_bench.json").write_text(json.dumps({"env": env_info(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
