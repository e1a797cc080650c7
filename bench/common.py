"""Shared helpers of the bench scripts: where files go, sizes, and running one command under /usr/bin/time -v.

Every measured command is its own process, so wall time and peak RSS are the whole process's (imports included),
as in /work/shared/reference/peer-baselines.md.
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
WORK = BENCH / "_work"  # git-ignored
REPO = BENCH.parent
PY = sys.executable
QTOOL = str(Path(PY).parent / "qtool")  # the venv's console script: what a user runs

# num_hidden_layers per size name; hidden 2048 / intermediate 5632 / vocab 32000 as in peer-baselines.md.
LAYERS = {"1GB": 8, "4GB": 36}  # 8 -> 1.084 GB, 36 -> 3.96 GB of bf16


def model_dir(size: str) -> Path:
    return WORK / f"llama-{size}"


def adapter_dir(size: str) -> Path:
    return WORK / f"llama-{size}-lora-r16"


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def warm(path: Path) -> None:
    """Read every file once so the page cache holds the source (the runs compare warm-cache work)."""
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def clean(path: Path) -> None:
    if Path(path).exists():
        shutil.rmtree(path)


@dataclass
class Run:
    wall_s: float
    rss_gib: float
    cpu_s: float  # user + sys: less sensitive than wall time to other processes sharing the 2 cores
    stdout: str


_RSS = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")
_CPU = re.compile(r"(?:User|System) time \(seconds\):\s*([\d.]+)")


def measure(cmd: list[str], *, out: Path | None = None, env: dict | None = None) -> Run:
    """Run CMD as its own process under /usr/bin/time -v; wall time from this side, peak RSS from time(1).

    OUT is removed before the run; dirty pages of earlier runs are flushed first (`sync`) so one run's writeback
    does not land in the next one's time.
    """
    if out is not None:
        clean(out)
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    m = _RSS.search(p.stderr)
    if p.returncode != 0 or m is None:
        tail = "\n".join(p.stderr.splitlines()[-25:])
        raise RuntimeError(f"command failed (rc {p.returncode}): {' '.join(cmd)}\n{tail}")
    return Run(wall, int(m.group(1)) / 2**20, sum(float(x) for x in _CPU.findall(p.stderr)), p.stdout)


def loadavg() -> float:
    return os.getloadavg()[0]


def median(xs):
    return statistics.median(xs)


def floor_cmd(src: Path, out: Path) -> list[str]:
    return [PY, str(BENCH / "floor.py"), str(src), str(out)]


def env_info() -> str:
    import platform

    import torch

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
