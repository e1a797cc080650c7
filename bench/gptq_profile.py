#!/usr/bin/env python
"""Where single-process `qtool quantize --method gptq` spends its CPU seconds, by phase (measurement only).

    python bench/gptq_profile.py [--model bench/_work/llama-1GB-2L] [--samples 16] [--seq-len 256]
                                 [--threads 1] [--cprofile FILE] [--json FILE]

Runs `qtool.jobs.quantize.quantize` in this process (int4 sym g128, gptq, damp 0.01, --device cpu) on the same
token ids as bench/gptq_vs_llmcompressor.py, with timers wrapped around qtool's own functions (monkey-patched
here; qtool is not changed). Each timer records the main thread's CPU seconds (time.thread_time) and wall
seconds, *exclusive* of nested timed calls, so the rows add up to the main thread's total. CPU seconds of the
other threads (the writer's file thread, the reader's prefetch, MKL/OpenMP workers) are the process's minus the
main thread's, one row. Phases:

  load calibration ids      qtool.calib.layerwise._samples (reads/tokenizes the data)
  skeleton + embeddings     LayerWalk.__init__: meta model, embeddings loaded, every sample run up to block 0
  block load / free         walk.load_module / walk.free_module + release_host_memory
  forward 1 (calibration)   LayerWalk.run(keep=False), hooks excluded
  hooks: XᵀX + Σx² + max|x| InputStats.add (the Hessian addmm dominates: see --cprofile's `addmm_` line)
  forward 2 (quantized)     LayerWalk.run(keep=True): outputs with the quantized weights → next block's inputs
  gptq: group scales        mse_qparams as called by gptq_quantize (importance-weighted clipping search)
  gptq: inverse Cholesky    _inverse_cholesky (damped H, Cholesky, inverse, Cholesky; since issue 16 one
                            Cholesky of the reversed matrix and a triangular inverse)
  gptq: column loop         the rest of gptq_quantize (act-order permutation, per-column quantize, lazy updates)
  error stats (report)      output_error(s) (before and after) + the RTN reference for "before" + reconstruct
  encode: error stats+pack  per emitted weight: the report's weight error (error_stats) and ct.compress
  write                     CheckpointWriter.write on the main thread (dense tensors too); the file thread's
                            own work is in "other threads"
  finish (report, config)   size report, config, side files after the walk
  other (main thread)       everything not inside a timer (imports before the run are excluded)

With --cprofile FILE the same run also goes under cProfile (slower; the table's figures then include its
overhead) and the 30 functions with the most own time are printed.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))


class Phases:
    """Exclusive CPU/wall time per phase: time inside a nested timed call belongs to the inner phase only."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [phase, cpu start, wall start, nested cpu, nested wall]

    @contextlib.contextmanager
    def phase(self, name: str):
        c0, w0 = time.thread_time(), time.perf_counter()
        self._stack.append([name, c0, w0, 0.0, 0.0])
        try:
            yield
        finally:
            _, c0, w0, nc, nw = self._stack.pop()
            dc, dw = time.thread_time() - c0, time.perf_counter() - w0
            self.cpu[name] = self.cpu.get(name, 0.0) + dc - nc
            self.wall[name] = self.wall.get(name, 0.0) + dw - nw
            self.calls[name] = self.calls.get(name, 0) + 1
            if self._stack:
                self._stack[-1][3] += dc
                self._stack[-1][4] += dw

    def wrap(self, owner, attr: str, name, pick=None):
        """Replace owner.attr with a timed version; `name` may be a function of the call's arguments."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if threading_main() is False:
                return fn(*args, **kwargs)  # only the main thread's time goes into the phases
            with self.phase(name(*args, **kwargs) if callable(name) else name):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)
        return fn


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# (where the function lives, at cae8ac3 or after the refactor on main, "module:attr" or "module:Class.attr"), phase
TARGETS = [
    (["qtool.calib.layerwise:_samples"], "load calibration ids"),
    (["qtool.calib.walk:LayerWalk.__init__"], "skeleton + embeddings"),
    (["qtool.calib.model:load_module", "qtool.calib.layout:Layout.load"], "block load / free"),
    (["qtool.calib.model:free_module"], "block load / free"),
    (["qtool.runtime:release_host_memory", "qtool.calib.device:release_host_memory"], "block load / free"),
    (["qtool.calib.walk:LayerWalk.run"],
     lambda self, layer, keep: "forward 2 (quantized)" if keep else "forward 1 (calibration)"),
    (["qtool.calib.collect:InputStats.add"], "hooks: XᵀX + Σx² + max|x|"),
    (["qtool.quant.qparams:mse_qparams", "qtool.quant.search:mse_qparams"], "gptq: group scales"),
    (["qtool.quant.gptq:_inverse_cholesky"], "gptq: inverse Cholesky"),
    (["qtool.quant.gptq:gptq_quantize"], "gptq: column loop"),
    (["qtool.quant.gptq:output_error"], "error stats (report)"),
    (["qtool.quant.gptq:output_errors"], "error stats (report)", "optional"),  # issue 16: before and after at once
    (["qtool.calib.methods:reconstruct"], "error stats (report)", "optional"),  # gone after the refactor
    (["qtool.jobs.quantize:dequantize"], "encode: error stats + pack", "here only"),  # not reconstruct's
    (["qtool.quant.core:error_stats"], "encode: error stats + pack"),
    (["qtool.formats.compressed_tensors:compress", "qtool.formats.compressed_tensors:PackedModule.from_weight"],
     "encode: error stats + pack"),
    (["qtool.checkpoint.writer:CheckpointWriter.write"], "write (hand bytes to the file thread)"),
    (["qtool.report.size:size_report"], "finish (report, config)"),
    (["qtool.jobs.common:copy_side_files"], "finish (report, config)"),
]


def _find(spec: str):
    import importlib
    mod_name, _, attr = spec.partition(":")
    try:
        owner = importlib.import_module(mod_name)
    except ImportError:
        return None
    *path, last = attr.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return (owner, last) if hasattr(owner, last) else None


def _rebind(orig, timed) -> None:
    """Every qtool module that imported the function by name (`from x import f`) gets the timed one too."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("qtool") and mod is not None:
            for attr, val in list(vars(mod).items()):
                if val is orig:
                    setattr(mod, attr, timed)


def instrument(ph: Phases) -> None:
    """Timers around qtool's functions wherever they live now; a function not found is reported, not fatal."""
    import qtool.jobs.quantize  # noqa: F401  (loads every module the run uses, so _rebind sees them)
    import qtool.calib.layerwise, qtool.calib.walk, qtool.calib.collect  # noqa: E401,F401
    missing = []
    for homes, name, *only_here in TARGETS:
        found = next((f for f in map(_find, homes) if f), None)
        if found is None:
            if "optional" not in only_here:
                missing.append(homes[0])
            continue
        owner, attr = found
        orig = ph.wrap(owner, attr, name)
        if not isinstance(owner, type) and "here only" not in only_here:
            _rebind(orig, getattr(owner, attr))
    # The walk quantizes each weight twice: with the method, and with rtn for the report's "before" error.
    found = next((f for f in map(_find, ["qtool.quant.weight:quantize_weight", "qtool.calib.methods:quantize_weight"])
                  if f), None)
    if found:
        owner, attr = found
        orig = getattr(owner, attr)

        def qw(*args, **kw):
            method = args[2] if len(args) > 2 and isinstance(args[2], str) else getattr(args[1], "method", None)
            if method == "rtn":
                with ph.phase("error stats (report)"):
                    return orig(*args, **kw)
            return orig(*args, **kw)

        setattr(owner, attr, qw)
        _rebind(orig, qw)
    if missing:
        print(f"warning: not timed (not found): {', '.join(missing)}", file=sys.stderr)


def run(model: Path, ids: Path, samples: int, seq_len: int, out: Path, ph: Phases) -> dict:
    from qtool.jobs.quantize import quantize
    from qtool.quant.spec import QuantSpec

    spec = QuantSpec(bits=4, symmetric=True, group_size=128, method="gptq")
    return quantize(str(model), str(out), spec, calib=str(ids), calib_samples=samples, seq_len=seq_len, damp=0.01,
                    device="cpu")


def table(ph: Phases, total_cpu: float, main_cpu: float, wall: float) -> list[dict]:
    rows = [{"phase": k, "cpu_s": ph.cpu[k], "wall_s": ph.wall[k], "calls": ph.calls[k]}
            for k in sorted(ph.cpu, key=lambda k: -ph.cpu[k])]
    timed_cpu, timed_wall = sum(ph.cpu.values()), sum(ph.wall.values())
    rows.append({"phase": "other (main thread)", "cpu_s": main_cpu - timed_cpu, "wall_s": wall - timed_wall,
                 "calls": None})
    rows.append({"phase": "other threads (file thread, prefetch, BLAS workers)", "cpu_s": total_cpu - main_cpu,
                 "wall_s": None, "calls": None})
    for r in rows:
        r["cpu_share"] = r["cpu_s"] / total_cpu if total_cpu else 0.0
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine OpenMP's spinning makes CPU seconds "
                         "of 2 threads meaningless)")
    ap.add_argument("--cprofile", type=Path, help="also run under cProfile and write its stats here")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    from gptq_vs_llmcompressor import ensure_ids, ensure_model

    t_imp = time.perf_counter()
    import torch  # noqa: F401  (imports are not part of the profile; the paired bench counts them)
    import qtool.jobs.quantize  # noqa: F401
    import transformers  # noqa: F401
    import_s = time.perf_counter() - t_imp
    torch.set_num_threads(a.threads)
    model = a.model or ensure_model(2)
    ids = ensure_ids(model, a.samples, a.seq_len)
    ph = Phases()
    instrument(ph)
    with tempfile.TemporaryDirectory(prefix="gptq-profile-", dir=BENCH / "_work") as tmp:
        prof = None
        if a.cprofile:
            import cProfile
            prof = cProfile.Profile()
        p0, m0, w0 = time.process_time(), time.thread_time(), time.perf_counter()
        if prof:
            prof.enable()
        report = run(model, ids, a.samples, a.seq_len, Path(tmp) / "out", ph)
        if prof:
            prof.disable()
        total_cpu, main_cpu, wall = time.process_time() - p0, time.thread_time() - m0, time.perf_counter() - w0
    rows = table(ph, total_cpu, main_cpu, wall)
    print(f"model {model}, {a.samples} x {a.seq_len} ids, {os.cpu_count()} cores, "
          f"torch threads {torch.get_num_threads()}; imports before the run {import_s:.1f} s (not in the table)")
    summ = report.get("summary") or {}
    print(f"run: wall {wall:.1f} s, CPU {total_cpu:.1f} s (main thread {main_cpu:.1f} s); weight rel. error mean "
          f"{summ.get('rel_error_mean', float('nan')):.4f}, max {summ.get('rel_error_max', float('nan')):.4f}\n")
    print("| phase | CPU s | share of CPU | wall s | calls |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        wall_s = "" if r["wall_s"] is None else f"{r['wall_s']:.2f}"
        calls = "" if r["calls"] is None else r["calls"]
        print(f"| {r['phase']} | {r['cpu_s']:.2f} | {100 * r['cpu_share']:.1f} % | {wall_s} | {calls} |")
    if prof:
        import pstats
        prof.dump_stats(str(a.cprofile))
        print()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    if a.json:
        a.json.write_text(json.dumps({"model": str(model), "samples": a.samples, "seq_len": a.seq_len,
                                      "wall_s": wall, "cpu_s": total_cpu, "main_thread_cpu_s": main_cpu,
                                      "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
