#!/usr/bin/env python
"""What an allocation costs: `qtool quantize --target-bits B` against a uniform `mse` run, data-free, paired.

    python bench/mixed_time.py [--model bench/_work/llama-1GB] [--bits 4.5] [--rounds 2]

The model defaults to the 1.08 GB synthetic Llama of `python bench/synth.py --size 1GB`. Each round runs the
uniform run (int4 g128, mse) and the allocated one (--target-bits B over the default candidates, mse), in
alternating order, each as its own `qtool quantize` process (wall seconds, and the allocation's own phases from
its report: the measuring pass reads the model once more and rounds every tensor to nearest once per candidate).
Prints one table; the ratio is mixed ÷ uniform per round.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def one(model: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "qtool", "quantize", str(model), "-o", str(out), "--quiet", "--overwrite",
           "--report", str(report), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0, json.loads(report.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=BENCH / "_work" / "llama-1GB")
    ap.add_argument("--bits", default="4.5")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)
    if not a.model.exists():
        sys.exit(f"{a.model} is missing: run `python bench/synth.py --size 1GB` first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qtool-mixed-time-", dir=BENCH / "_work") as tmp:
        for r in range(a.rounds):
            runs = [("uniform", []), ("mixed", ["--target-bits", a.bits])]
            got = {}
            for label, extra in (runs if r % 2 == 0 else runs[::-1]):
                got[label] = one(a.model, Path(tmp) / label, extra)
            alloc = got["mixed"][1]["allocation"]
            rows.append((r, got["uniform"][0], got["mixed"][0], alloc["achieved_bits"],
                         {k: len(v) for k, v in alloc["by_spec"].items()}))
    print(f"{a.model.name}: uniform int4 g128 mse vs --target-bits {a.bits} (mse), wall seconds per process")
    print("| round | uniform s | mixed s | mixed ÷ uniform | achieved bits | schemes |")
    print("|---:|---:|---:|---:|---:|---|")
    for r, u, m, bits, by in rows:
        print(f"| {r} | {u:.1f} | {m:.1f} | {m / u:.2f}× | {bits:.4f} | {by} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
