"""Render a report: rich tables for people, one JSON document for machines."""
from __future__ import annotations

import json
import math
import sys

from rich.console import Console
from rich.table import Table


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _num(x, fmt="{:.4g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return fmt.format(x)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False, allow_nan=False, default=str) + "\n"


def write_json(report: dict, path) -> None:
    """Write the report atomically (checkpoint.outputs): complete, or no file at all."""
    from ..checkpoint.outputs import REPORT, output_file
    from ..errors import QtoolError
    try:
        with output_file(path, REPORT) as tmp:
            tmp.write_text(to_json(report), encoding="utf-8")
    except OSError as e:
        raise QtoolError(path, f"cannot write the report: {e.strerror or e}; no report file was left") from None


def render(report: dict, top: int = 10, console: Console | None = None) -> None:
    """Print the summary tables of a report, as its `kind` calls for (inspect, quantize, dequantize, merge, eval)."""
    # Logs are not terminals: give tables room so tensor names are never cut.
    console = console or Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
    if report["kind"] == "eval":   # about two models' outputs, not one checkpoint's tensors
        return _eval(report, top, console)
    console.print(_head(report))
    console.print(_dtypes(report))
    console.print(_estimates(report))
    _BODIES[report["kind"]](report, top, console)
    _render_allocation(report, console)
    _render_gate(report, console)


def _render_allocation(report: dict, console: Console) -> None:
    """quantize --target-bits/--max-size: the budget, what was reached, and which SPEC went where."""
    a = report.get("allocation")
    if not a:
        return
    bits = a["target_kind"] == "bits_per_weight"
    target = f"{a['target']:g} bits per weight" if bits else f"{human_bytes(a['target'])} ({a['target']:,} bytes)"
    at = Table(title=f"allocation: {target}, from {', '.join(a['candidates'])}", title_justify="left")
    for c in ("scheme", "modules", "first modules"):
        at.add_column(c, justify="right" if c == "modules" else "left")
    for spec, modules in a["by_spec"].items():
        at.add_row(spec, str(len(modules)), ", ".join(modules[:3]) + (", …" if len(modules) > 3 else ""))
    console.print(at)
    console.print(f"achieved {a['achieved_bits']:.4f} bits per weight, {human_bytes(a['achieved_bytes'])} "
                  f"({a['achieved_bytes']:,} bytes); predicted error {_num(a['predicted_error'])} "
                  f"(lower bound {_num(a['solver']['lower_bound'])}, {a['solver']['groups']} fused groups)")


def _scaling(s) -> str:
    if isinstance(s, dict):
        return f"{_num(min(s.values()))}–{_num(max(s.values()))} by module"
    if isinstance(s, list):
        return ", ".join(_scaling(x) for x in s)
    return _num(s)


def _head(report: dict) -> Table:
    head = Table(title=f"qtool {report['qtool_version']}: {report['source']}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("format", str(report["format"]))
    head.add_row("tensors", f"{report['tensors']:,}")
    head.add_row("parameters", f"{report['parameters']:,}")
    head.add_row("size", f"{human_bytes(report['bytes'])} ({report['bytes']:,} bytes)")
    head.add_row("bits per parameter", _num(report["bits_per_parameter"], "{:.3f}"))
    q = report.get("quantization")
    if q:
        scheme = (f"int{q['bits']} {'symmetric' if q['symmetric'] else 'asymmetric'}, group size {q['group_size']}"
                  if q["bits"] is not None else "schemes differ by module")
        head.add_row("quantization", f"{scheme}, {q.get('format')}" + (f", method {q['method']}" if q.get("method") else ""))
        if q.get("bits_per_weight") is not None:
            head.add_row("bits per quantized weight", f"{q['bits_per_weight']:.3f} ({q.get('quantized_tensors')} tensors)")
        if q.get("schemes"):
            head.add_row("schemes", ", ".join(f"{name} {100 * d['share']:.1f}% ({d['modules']} modules)"
                                              for name, d in q["schemes"].items()))
        if q.get("vllm_servable") is False:
            head.add_row("note", f"group size {q['group_size']}: valid compressed-tensors, but vLLM will not serve it "
                                 "(its weight-only kernels take groups of 32, 64 or 128 columns, or per channel)")
    lora = report.get("lora")
    if lora:
        head.add_row("LoRA", f"rank {lora['rank']}, alpha {lora['alpha']}, scaling {_scaling(lora.get('scaling'))}")
        head.add_row("LoRA targets", ", ".join(lora["targets"]))
        frac = lora.get("fraction_of_base")
        head.add_row("adapter parameters", f"{lora['parameters']:,}" + (f" ({100 * frac:.3f}% of the base)" if frac is not None else ""))
    lt = report.get("lora_training")
    if lt:
        acts = (f" + activations {human_bytes(lt['activation_bytes'])} for {lt['tokens']:,} tokens"
                if lt.get("tokens") and lt.get("activation_bytes_per_token") else "")
        head.add_row(f"LoRA fine-tune, rank {lt['rank']}",
                     f"{human_bytes(lt['total_bytes'])}: base {human_bytes(lt['base_bytes'])} + adapter {lt['adapter_parameters']:,} "
                     f"parameters on {lt['targets']} layers ×(weights, gradients, 2 Adam states) in float32{acts}")
    t = report.get("timing")
    if t:
        head.add_row("time", f"{t['seconds']:.2f} s ({_num(t.get('input_gb_per_s'), '{:.2f}')} GB/s of input)")
    return head


def _dtypes(report: dict) -> Table:
    dt = Table(title="by dtype", title_justify="left")
    for c in ("dtype", "tensors", "parameters", "bytes"):
        dt.add_column(c, justify="left" if c == "dtype" else "right")
    for name, d in report["dtypes"].items():
        dt.add_row(name, f"{d['tensors']:,}", f"{d['parameters']:,}", human_bytes(d["bytes"]))
    return dt


def _estimates(report: dict) -> Table:
    est = Table(title="the same model at other widths", title_justify="left")
    for c in report["estimates"]:
        est.add_column(c, justify="right")
    est.add_row(*(human_bytes(v) for v in report["estimates"].values()))
    return est


def _merged(report: dict, top: int, console: Console) -> None:
    """merge-lora: the merged tensors that changed most."""
    merged = [r for r in report["layers"] if r.get("delta_rel_norm") is not None]
    if not merged:
        return _largest(report, top, console)
    big = sorted(merged, key=lambda r: -r["delta_rel_norm"])[:top]
    mt = Table(title=f"largest changes: {len(big)} of {len(merged)} merged tensors", title_justify="left")
    for c in ("tensor", "how", "‖ΔW‖/‖W‖", "requant rel_error"):
        mt.add_column(c, justify="left" if c in ("tensor", "how") else "right")
    for r in big:
        mt.add_row(r["name"], str(r.get("reason") or ""), _num(r["delta_rel_norm"]),
                   _num(r["error"]["rel_error"]) if r.get("error") else "-")
    console.print(mt)


def _errors(report: dict, top: int, console: Console) -> None:
    """quantize, inspect --against: the tensors that lost most; inspect alone: the largest tensors."""
    with_error = [r for r in report["layers"] if r.get("error")]
    if not with_error:
        return _largest(report, top, console)
    worst = sorted(with_error, key=lambda r: -r["error"]["rel_error"])[:top]
    mixed = any("scheme" in r for r in worst)  # a mixed-precision run says which SPEC each got
    et = Table(title=f"worst {len(worst)} of {len(with_error)} tensors by relative error", title_justify="left")
    for c in ("tensor", "shape") + (("scheme",) if mixed else ()) + ("rel_error", "SQNR dB", "max |err|", "cosine"):
        et.add_column(c, justify="left" if c in ("tensor", "scheme") else "right")
    for r in worst:
        e = r["error"]
        et.add_row(r["name"], "×".join(map(str, r["shape"])), *((r.get("scheme", "-"),) if mixed else ()),
                   _num(e["rel_error"]), _num(e["sqnr_db"], "{:.2f}"), _num(e["max_abs"]), _num(e["cosine"], "{:.6f}"))
    console.print(et)
    s = report.get("summary") or {}
    if s:
        console.print(f"rel_error mean {_num(s.get('rel_error_mean'))}, max {_num(s.get('rel_error_max'))}; "
                      f"SQNR min {_num(s.get('sqnr_db_min'), '{:.2f}')} dB")


def _largest(report: dict, top: int, console: Console) -> None:
    """dequantize, inspect: the largest tensors."""
    layers = report["layers"]
    big = sorted(layers, key=lambda r: -r["bytes"])[:top]
    lt = Table(title=f"largest {len(big)} of {len(layers)} tensors", title_justify="left")
    for c in ("tensor", "shape", "dtype", "bytes"):
        lt.add_column(c, justify="right" if c == "bytes" else "left")
    for r in big:
        lt.add_row(r["name"], "×".join(map(str, r["shape"])), r["dtype"], human_bytes(r["bytes"]))
    console.print(lt)


_BODIES = {"inspect": _errors, "quantize": _errors, "dequantize": _largest, "merge": _merged}


def _render_gate(report: dict, console: Console) -> None:
    """The report's last lines: its rel_error gate and, after `--eval`, the evaluation of the output."""
    g = report.get("gate")
    if g:
        verdict = "[green]passed[/]" if g["passed"] else f"[red]FAILED[/] ({len(g['failed'])} tensors: {', '.join(g['failed'][:5])}{'…' if len(g['failed']) > 5 else ''})"
        console.print(f"quality gate max_rel_error {g['max_rel_error']}: {verdict}")
    if report.get("eval"):
        _eval(report["eval"], 10, console)


# -- eval ---------------------------------------------------------------------------------------------------

def _eval(report: dict, top: int, console: Console) -> None:
    """eval: perplexity, KL statistics, agreement; the blocks where the hidden-state error grew most; the gate."""
    console.print(_eval_head(report))
    if report.get("blocks"):
        console.print(_eval_blocks(report["blocks"], top))
    g = report.get("gate")
    if g:
        limits = ", ".join(f"{k} {g[k]}" for k in ("max_kld", "max_ppl_ratio", "min_top1") if g[k] is not None)
        verdict = "[green]passed[/]" if g["passed"] else f"[red]FAILED[/] ({', '.join(g['failed'])})"
        console.print(f"eval gate {limits}: {verdict}")


def _eval_head(report: dict) -> Table:
    title = f"qtool eval: {report['model']}" + (f" against {report['ref']}" if report["ref"] else "")
    head = Table(title=title, show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("data", f"{report['data']}: {report['windows']:,} windows of at most {report['seq_len']} tokens, "
                         f"{report['tokens']:,} tokens ({report['predicted']:,} predicted)")
    ppl = _num(report["ppl"], "{:.6g}")
    if report["ref"]:
        ppl += f" (ref {_num(report['ref_ppl'], '{:.6g}')}, ratio {_num(report['ppl_ratio'], '{:.5f}')})"
    head.add_row("perplexity", ppl)
    k = report.get("kld")
    if k:
        head.add_row("KL divergence (nats)", ", ".join(f"{s} {_num(k[s], '{:.6g}')}" for s in k))
    if report.get("top1_agreement") is not None:
        head.add_row("top-1 agreement", f"{100 * report['top1_agreement']:.3f}%")
    t = report["timing"]
    head.add_row("time", f"{t['seconds']:.2f} s ({_num(t['tokens_per_s'], '{:.1f}')} tokens/s), {report['device']}")
    return head


def _eval_blocks(blocks: list[dict], top: int) -> Table:
    """Where the loss enters: the blocks whose output error grew the most over the block before."""
    errors = [b["hidden_rel_error"] or 0.0 for b in blocks]
    steps = [(b, e - (errors[i - 1] if i else 0.0)) for i, (b, e) in enumerate(zip(blocks, errors))]
    shown = sorted(sorted(steps, key=lambda s: -s[1])[:top], key=lambda s: s[0]["index"])
    bt = Table(title=f"hidden-state error by block ({len(shown)} of {len(blocks)})", title_justify="left")
    for c in ("block", "‖h − h_ref‖/‖h_ref‖", "increase"):
        bt.add_column(c, justify="right")
    for b, inc in shown:
        bt.add_row(str(b["index"]), _num(b["hidden_rel_error"], "{:.5f}"), f"{inc:+.5f}")
    return bt
