"""Run qtool's jobs against the I/O floor (and PEFT's merge path) and print markdown tables.

    python bench/run.py                                  # everything: 1GB and 4GB, 3 rounds
    python bench/run.py --sizes 1GB --only quantize      # one group
    python bench/run.py --rounds 5 --peft-4gb            # more rounds; PEFT baseline on 4GB too

Each round runs, one process after the other under /usr/bin/time -v with a warm page cache: the floor
(bench/floor.py), then each job of the group. A job's ratio is median over rounds of (job wall / same round's
floor wall); merge's speed-up over PEFT is the median of per-round (PEFT wall / qtool wall). Peak RSS is the
largest over the rounds. Results also land in bench/_work/results.json and results.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (BENCH, PY, QTOOL, WORK, adapter_dir, clean, dir_bytes, env_info, floor_cmd, loadavg,  # noqa: E402
                    measure, median, model_dir, warm)

TARGETS = {  # job -> (max time ÷ floor, max RSS over floor in MiB)
    "quantize rtn": (1.25, 512), "quantize mse": (3.0, 512), "merge-lora": (1.25, 512),
}


def quantize_cmd(src, out, method):
    return [QTOOL, "quantize", str(src), "-o", str(out), "--method", method, "--bits", "4", "--group-size", "128",
            "--quiet"]


def groups(sizes, only, peft_4gb, methods=("rtn", "mse")):
    """(group name, size, [(job name, cmd, out dir)]) — the floor is added to every group."""
    out = []
    for size in sizes:
        src, ad = model_dir(size), adapter_dir(size)
        if "quantize" in only:
            out.append(("quantize", size, [(f"quantize {m}", quantize_cmd(src, WORK / f"out-{m}", m), WORK / f"out-{m}")
                                           for m in methods]))
        if "merge" in only:
            jobs = [("merge-lora", [QTOOL, "merge-lora", str(src), str(ad), "-o", str(WORK / "out-merge"), "--quiet"],
                     WORK / "out-merge")]
            if size == "1GB" or peft_4gb:
                jobs.append(("transformers+PEFT merge", [PY, str(BENCH / "peft_baseline.py"), str(src), str(ad),
                                                         str(WORK / "out-peft")], WORK / "out-peft"))
            out.append(("merge", size, jobs))
    return out


def run_group(name, size, jobs, rounds, warmup=1):
    src = model_dir(size)
    floor_out = WORK / "out-floor"
    rows = {j: [] for j, _, _ in jobs}
    floors, loads = [], []
    outputs = {}
    # Untimed warm-up: on this VM a process that writes GBs into memory nobody touched lately pays for it in system
    # time (the hypervisor backs the pages again); after one round every command reuses the pages its own previous
    # output freed, the floor included, so the timed rounds compare like with like.
    for _ in range(warmup):
        measure(floor_cmd(src, floor_out), out=floor_out)
        for _, cmd, out in jobs:
            measure(cmd, out=out)
    for r in range(rounds):
        loads.append(loadavg())
        f = measure(floor_cmd(src, floor_out), out=floor_out)
        floors.append(f)
        line = [f"floor {f.wall_s:.2f}s {f.rss_gib:.2f}GiB"]
        for j, cmd, out in jobs:
            m = measure(cmd, out=out)
            rows[j].append(m)
            outputs[j] = dir_bytes(out)
            line.append(f"{j} {m.wall_s:.2f}s {m.rss_gib:.2f}GiB")
        print(f"  [{name} {size} round {r + 1}] " + " | ".join(line), file=sys.stderr, flush=True)
    res = {"floor": {"wall_s": [f.wall_s for f in floors], "cpu_s": [f.cpu_s for f in floors],
                     "rss_gib": [f.rss_gib for f in floors], "out_bytes": dir_bytes(floor_out), "loadavg": loads}}
    for j, runs in rows.items():
        res[j] = {"wall_s": [m.wall_s for m in runs], "cpu_s": [m.cpu_s for m in runs],
                  "rss_gib": [m.rss_gib for m in runs],
                  "ratio": [m.wall_s / f.wall_s for m, f in zip(runs, floors)],
                  "cpu_ratio": [m.cpu_s / f.cpu_s for m, f in zip(runs, floors)], "out_bytes": outputs[j]}
    if "transformers+PEFT merge" in rows:
        res["merge-lora"]["speedup_vs_peft"] = [p.wall_s / q.wall_s for p, q in
                                                zip(rows["transformers+PEFT merge"], rows["merge-lora"])]
    for _, _, out in jobs:
        clean(out)
    clean(floor_out)
    return res


def run_inspect(sizes, rounds):
    """inspect --json per size, paired with the bare start-up (python importing the CLI and the inspect job)."""
    startup = [PY, "-c", "import qtool.cli, qtool.jobs.inspect"]
    res = {"startup": {"wall_s": [], "rss_gib": []}}
    for size in sizes:
        res[size] = {"wall_s": [], "rss_gib": [], "own_s": [], "reported_s": None}
    for r in range(rounds):
        s = measure(startup)
        res["startup"]["wall_s"].append(s.wall_s)
        res["startup"]["rss_gib"].append(s.rss_gib)
        for size in sizes:
            m = measure([QTOOL, "inspect", str(model_dir(size)), "--json"])
            res[size]["wall_s"].append(m.wall_s)
            res[size]["rss_gib"].append(m.rss_gib)
            res[size]["own_s"].append(m.wall_s - s.wall_s)
            try:
                res[size]["reported_s"] = (json.loads(m.stdout).get("timing") or {}).get("seconds")
            except (ValueError, AttributeError):
                pass
        print(f"  [inspect round {r + 1}] startup {s.wall_s:.2f}s "
              + " ".join(f"{z} {res[z]['wall_s'][-1]:.2f}s" for z in sizes), file=sys.stderr, flush=True)
    return res


def verdict(ok):
    return "yes" if ok else "**no**"


def markdown(results, rounds) -> str:
    loads = [x for res in results["groups"].values() for x in res["floor"]["loadavg"]]
    lines = [f"Machine: {results['machine']}. {rounds} rounds per group; medians; RSS = largest of the rounds; "
             + (f"1-min load average at round starts {min(loads):.1f}–{max(loads):.1f}." if loads else ""), ""]
    if results["groups"]:
        lines += ["| job | size | floor s | job s | time ÷ floor | CPU s ÷ floor's | target | floor RSS GiB "
                  "| job RSS GiB | RSS − floor MiB | output MB | meets target |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for key, res in results["groups"].items():
        name, size = key.split(" ", 1)
        fl = res["floor"]
        fw, frss = median(fl["wall_s"]), max(fl["rss_gib"])
        for j, r in res.items():
            if j == "floor":
                continue
            ratio, rss = median(r["ratio"]), max(r["rss_gib"])
            over = (rss - frss) * 1024
            t = TARGETS.get(j)
            tgt = f"≤ {t[0]}×, RSS ≤ floor + {t[1]} MiB" if t else "—"
            ok = "—"
            if t:
                ok = verdict(ratio <= t[0] and over <= t[1])
                if "speedup_vs_peft" in r:
                    sp = median(r["speedup_vs_peft"])
                    tgt += ", ≥ 3× PEFT"
                    ok = verdict(ratio <= t[0] and over <= t[1] and sp >= 3) + f" ({sp:.2f}× faster than PEFT)"
            lines.append(f"| {j} | {size} | {fw:.2f} | {median(r['wall_s']):.2f} | {ratio:.2f} | {median(r['cpu_ratio']):.2f} "
                         f"| {tgt} | {frss:.2f} "
                         f"| {rss:.2f} | {over:+.0f} | {r['out_bytes'] / 1e6:.0f} | {ok} |")
    # Peak RSS must not grow with model size.
    by_job = {}
    for key, res in results["groups"].items():
        _, size = key.split(" ", 1)
        for j, r in res.items():
            by_job.setdefault(j, {})[size] = max(r["rss_gib"])
    flat = [(j, v) for j, v in by_job.items() if len(v) > 1]
    if flat:
        lines += ["", "| job | " + " | ".join(f"RSS GiB {s}" for s in flat[0][1]) + " | growth MiB |",
                  "|---|" + "---:|" * (len(flat[0][1]) + 1)]
        for j, v in flat:
            vals = list(v.values())
            lines.append(f"| {j} | " + " | ".join(f"{x:.2f}" for x in vals) + f" | {(vals[-1] - vals[0]) * 1024:+.0f} |")
    if "inspect" in results:
        ins = results["inspect"]
        sizes = [k for k in ins if k != "startup"]
        su = median(ins["startup"]["wall_s"])
        lines += ["", "| inspect --json | wall s | own work s (wall − start-up) | seconds in its report | peak RSS GiB |",
                  "|---|---:|---:|---:|---:|",
                  f"| start-up only (`python -c 'import qtool.cli, qtool.jobs.inspect'`) | {su:.2f} | — | — | "
                  f"{max(ins['startup']['rss_gib']):.2f} |"]
        for s in sizes:
            r = ins[s]
            rep = "—" if r["reported_s"] is None else f"{r['reported_s']:.3f}"
            lines.append(f"| {s} sharded folder | {median(r['wall_s']):.2f} | {median(r['own_s']):.2f} | {rep} "
                         f"| {max(r['rss_gib']):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["1GB", "4GB"])
    ap.add_argument("--only", default="quantize,merge,inspect", help="comma list of quantize, merge, inspect")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds per group before the timed ones")
    ap.add_argument("--methods", default="rtn,mse", help="quantize methods to run (comma list)")
    ap.add_argument("--out", type=Path, help="results name stem in bench/_work (default: results)")
    ap.add_argument("--peft-4gb", action="store_true", help="also run the PEFT baseline on 4GB (slow)")
    a = ap.parse_args(argv)
    only = set(a.only.split(","))
    WORK.mkdir(parents=True, exist_ok=True)
    for size in a.sizes:
        if not (model_dir(size) / "config.json").exists() or not (adapter_dir(size) / "adapter_config.json").exists():
            subprocess.run([PY, str(BENCH / "synth.py"), "--size", size], check=True)
        warm(model_dir(size))
        warm(adapter_dir(size))
    # One untimed floor run so the first round's floor pays no cold start (bytecode, shared libraries).
    measure(floor_cmd(model_dir(a.sizes[0]), WORK / "out-floor"), out=WORK / "out-floor")
    results = {"machine": env_info(), "rounds": a.rounds, "groups": {}}
    for name, size, jobs in groups(a.sizes, only, a.peft_4gb, a.methods.split(",")):
        results["groups"][f"{name} {size}"] = run_group(name, size, jobs, a.rounds, a.warmup)
    if "inspect" in only:
        results["inspect"] = run_inspect(a.sizes, a.rounds)
    md = markdown(results, a.rounds)
    stem = str(a.out or "results")
    (WORK / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (WORK / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
