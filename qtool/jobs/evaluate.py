"""`qtool eval`: what MODEL lost against REF, measured on its next-token distributions, streaming.

open both → cut DATA into windows (REF's tokenizer, else MODEL's) → walk both block by block in lockstep, batch by
batch (qtool.eval.lockstep) → per-position NLL, KL and argmax from the heads in vocabulary chunks → report and
gate. `quantize`, `merge-lora` and `dequantize` call `attach` to evaluate their output against their input.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from .. import runtime
from ..checkpoint import open_checkpoint
from ..checkpoint.outputs import REPORT, guarded
from ..errors import QtoolError
from ..progress import NullProgress
from ..report.evaluation import eval_report
from ..report.render import write_json
from ..report.schema import EvalReport
from .arguments import checked


@dataclass(frozen=True)
class EvalOptions:
    """`--eval DATA` of quantize / merge-lora / dequantize, with its gates."""
    data: str
    seq_len: int = 512
    samples: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    max_kld: float | None = None
    max_ppl_ratio: float | None = None
    min_top1: float | None = None


def _folder(ckpt):
    return ckpt.root if ckpt is not None and ckpt.is_folder else None


def _check_pair(model, ref, mck, rck, windows) -> None:
    top = max(int(w.max()) for w in windows)
    for stages, ck in ((model, mck), (ref, rck)):
        if stages is not None and top >= stages.vocab_size:
            raise QtoolError(ck.path, f"token id {top} of the data is outside its vocabulary of {stages.vocab_size}")
    if ref is None:
        return
    for what in ("vocab_size", "num_blocks", "hidden_size"):
        a, b = getattr(model, what), getattr(ref, what)
        if a != b:
            raise QtoolError(mck.path, f"{what.replace('_', ' ')} {a} differs from REF's {b}: "
                                       "the two models cannot be compared block by block")


@checked
@guarded(inputs=("model", "ref", "data"), outputs={"report_path": REPORT})
def evaluate(model, data, ref=None, *, seq_len: int = 512, samples: int | None = None, batch_size: int | None = None,
             device="auto", max_kld: float | None = None, max_ppl_ratio: float | None = None,
             min_top1: float | None = None, report_path=None, overwrite: bool = False, revision: str | None = None,
             ref_revision: str | None = None, progress=None) -> EvalReport:
    """Evaluate MODEL (against REF when given) on DATA; returns the report (kind "eval"). Gates do not raise: the
    report's `gate` says whether they passed (the CLI exits 3 when not). overwrite: replace an existing report."""
    from ..eval import lockstep
    from ..eval.data import load_windows
    from ..eval.stages import ModelStages

    start = time.perf_counter()
    limits = {"kld": max_kld, "ppl_ratio": max_ppl_ratio, "top1_agreement": min_top1}
    if ref is None and any(v is not None for v in limits.values()):
        raise QtoolError(str(model), "--max-kld, --max-ppl-ratio and --min-top1 compare against a reference: pass --ref")
    mck = open_checkpoint(model, revision)
    rck = open_checkpoint(ref, ref_revision) if ref is not None else None
    windows = load_windows(data, [_folder(rck), _folder(mck)], seq_len=seq_len, samples=samples)
    with runtime.session(device, parallel=False) as rt:   # one worker with every thread, TF32 off, GC frozen
        dev, group = rt.device, rt.group
        # under torchrun each process walks a contiguous share of the windows; rank 0 gathers what they measured
        mine = [windows[i] for i in group.share(len(windows), "evaluation windows")]
        m = ModelStages(mck, dev)
        r = ModelStages(rck, dev) if rck is not None else None
        _check_pair(m, r, mck, rck, windows)
        walked = lockstep.gathered(group, lockstep.walk(m, r, mine, batch_size or lockstep.default_batch_size(seq_len),
                                                        progress or NullProgress()))
    report = None
    if group.root:   # rank 0 alone reports; every process returns its report, so all decide the gates alike
        report = eval_report(model=str(model), ref=None if ref is None else str(ref), data=str(data),
                             seq_len=seq_len, lengths=[int(w.numel()) for w in windows], nll=walked.cat("nll"),
                             nll_ref=walked.cat("nll_ref"), kld=walked.cat("kld"), agree=walked.cat("agree"),
                             hidden_errors=walked.hidden_rel_errors(), limits=limits, device=str(dev),
                             seconds=time.perf_counter() - start, processes=group.world)
        if report_path is not None:
            write_json(report, report_path)
    return group.broadcast_object(report, src=0)


def attach(report: dict | None, out, source, options: EvalOptions | None, *, revision=None, progress=None) -> dict | None:
    """A job's `--eval`: evaluate OUT against SOURCE and put the eval report under `report["eval"]`. Under torchrun
    every process calls it (each walks its share of the windows); only rank 0's `report` is a dict."""
    if options is not None:
        evaluated = evaluate(out, options.data, ref=source, seq_len=options.seq_len, samples=options.samples,
                                  batch_size=options.batch_size, device=options.device, max_kld=options.max_kld,
                                  max_ppl_ratio=options.max_ppl_ratio, min_top1=options.min_top1,
                                  ref_revision=revision, progress=progress)
        if report is not None:
            report["eval"] = evaluated
    return report
