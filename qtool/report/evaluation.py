"""Tables of an eval report (kind "eval"), alone or as the `eval` block of a quantize/merge/dequantize report."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _f(x, fmt="{:.6g}") -> str:
    return "-" if x is None else fmt.format(x)


def render_eval(report: dict, console: Console, top: int = 10) -> None:
    head = Table(title=f"qtool eval: {report['model']}" + (f" against {report['ref']}" if report["ref"] else ""),
                 show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    head.add_row("data", f"{report['data']}: {report['windows']:,} windows of at most {report['seq_len']} tokens, "
                         f"{report['tokens']:,} tokens ({report['predicted']:,} predicted)")
    ppl = _f(report["ppl"])
    if report["ref"]:
        ppl += f" (ref {_f(report['ref_ppl'])}, ratio {_f(report['ppl_ratio'], '{:.5f}')})"
    head.add_row("perplexity", ppl)
    k = report.get("kld")
    if k:
        head.add_row("KL divergence (nats)", f"mean {_f(k['mean'])}, median {_f(k['median'])}, p90 {_f(k['p90'])}, "
                                             f"p99 {_f(k['p99'])}, max {_f(k['max'])}")
    if report.get("top1_agreement") is not None:
        head.add_row("top-1 agreement", f"{100 * report['top1_agreement']:.3f}%")
    t = report.get("timing") or {}
    if t:
        head.add_row("time", f"{t['seconds']:.2f} s ({_f(t.get('tokens_per_s'), '{:.1f}')} tokens/s), {report['device']}")
    console.print(head)
    blocks = report.get("blocks") or []
    if blocks:
        # Where the loss enters: the blocks whose output error grew the most over the block before.
        steps = [(b, (b["hidden_rel_error"] or 0) - (blocks[i - 1]["hidden_rel_error"] or 0 if i else 0))
                 for i, b in enumerate(blocks)]
        shown = sorted(sorted(steps, key=lambda s: -s[1])[:top], key=lambda s: s[0]["index"])
        bt = Table(title=f"hidden-state error by block ({len(shown)} of {len(blocks)})", title_justify="left")
        for c in ("block", "‖h − h_ref‖/‖h_ref‖", "increase"):
            bt.add_column(c, justify="right")
        for b, inc in shown:
            bt.add_row(str(b["index"]), _f(b["hidden_rel_error"], "{:.5f}"), f"{inc:+.5f}")
        console.print(bt)
    g = report.get("gate")
    if g:
        limits = ", ".join(f"{k} {g[k]}" for k in ("max_kld", "max_ppl_ratio", "min_top1") if g[k] is not None)
        verdict = "[green]passed[/]" if g["passed"] else f"[red]FAILED[/] ({', '.join(g['failed'])})"
        console.print(f"eval gate {limits}: {verdict}")
