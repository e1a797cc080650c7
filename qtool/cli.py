"""The `qtool` command line: parse, call the pipeline, render. Nothing else lives here."""
from __future__ import annotations

import functools
import os
import sys

import click

from . import __version__, distributed, runtime
from .errors import ArgumentError, GateFailed, Interrupted, QtoolError
from .interrupts import stop_on_signals
from .jobs import arguments

DTYPES = click.Choice(["float16", "bfloat16", "float32"])


def _group_size(ctx, param, value: int | None) -> int | None:
    if value is not None and value < -1:
        raise click.BadParameter("must be N > 0, -1 (per channel) or 0 (per tensor)", param_hint="--group-size")
    return value


def _size_option(ctx, param, value):
    return None if value is None else parse_size(value, "--max-size")


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Map user-caused failures to one line on stderr and their exit code; never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        cli = arguments.CLI.set(True)  # errors name options (--overwrite), not the API's arguments
        try:
            with stop_on_signals():  # SIGINT/SIGTERM/SIGHUP unwind the job (outputs cleaned up), exit 128+signum
                return fn(*args, **kwargs)
        except QtoolError as e:
            _fail(str(e), e.exit_code)
        except MemoryError:
            _fail("out of memory")
        except Interrupted as e:
            _fail(e.message(), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted by SIGINT; nothing was written or replaced", 130)
        except BrokenPipeError:
            # stdout's reader went away (`qtool inspect ... | head`): the work is done, say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except OSError as e:
            _fail(f"{e.filename or 'I/O'}: {e.strerror or e}")
        finally:
            arguments.CLI.reset(cli)
    return wrapper


def _emit(report: dict, as_json: bool, top: int = 10) -> None:
    from .report.render import render, to_json
    if as_json:
        click.echo(to_json(report), nl=False)
    else:
        render(report, top=top)


def _finish(report: dict, as_json: bool, quiet: bool = False, top: int = 10) -> None:
    """Print the report, then exit 3 (GateFailed) when any of its gates failed: the outputs are already written."""
    if as_json or not quiet:
        _emit(report, as_json, top)
    from .report.evaluation import gate_failure
    failures = []
    g = report.get("gate")
    if g and not g["passed"]:
        failures.append(gate_failure(report) if report.get("kind") == "eval" else
                        f"{len(g['failed'])} tensors over max rel_error {g['max_rel_error']} (first: {g['failed'][0]})")
    ev = report.get("eval")
    if ev and ev.get("gate") and not ev["gate"]["passed"]:
        failures.append(f"--eval: {gate_failure(ev)}")
    if failures:
        raise GateFailed(report.get("source") or report["model"], "quality gate failed: " + "; ".join(failures)) from None


class _Number(click.ParamType):
    """A number the job's argument check accepts (qtool.jobs.arguments.number): never NaN, within its limits."""

    name = "number"

    def __init__(self, **limits):
        self.limits = limits

    def convert(self, value, param, ctx):
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        try:
            return arguments.number(x, param.name, **self.limits)
        except ArgumentError as e:
            self.fail(e.problem, param, ctx)


class _Device(click.ParamType):
    name = "device"

    def convert(self, value, param, ctx):
        try:
            return arguments.device(value)
        except ArgumentError as e:
            self.fail(e.problem, param, ctx)


revision_option = click.option("--revision", default=None, help="Revision of a hub id (branch, tag or commit), from the local cache.")
overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace an existing output, only when it is one qtool could have written "
                                     "(a checkpoint folder, a qtool report or statistics file).")
device_option = click.option("--device", default="auto", show_default=True, type=_Device(),
                             help="auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
def moe_options(fn):
    fn = click.option("--moe-min-tokens", type=click.IntRange(min=1), default=None, metavar="N",
                      help="With routed: an expert the router sends fewer than N tokens takes the statistics of all "
                           "tokens instead [default: 32].")(fn)
    return click.option("--moe-calib", type=click.Choice(["routed", "all"]), default="routed", show_default=True,
                        help="Mixture-of-experts statistics: per expert from the tokens the router sends it, or "
                             "from all calibration tokens.")(fn)


report_option = click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None,
                             help="Write the JSON report to this file.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary table.")


class _Commands(click.Group):
    """Click's group, with its usage errors on one line like every other error: `error: <reason> (see ... --help)`,
    exit 2 (Click itself prints the usage text and the reason on three)."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        if distributed.env_rank() != 0:  # torchrun: the other processes print nothing but errors (on stderr)
            sys.stdout = open(os.devnull, "w")
        try:
            code = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _fail("aborted")
        except click.ClickException as e:
            if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                e.show()  # bare `qtool`: the help text is the message
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            _fail(" ".join(e.format_message().split()) + hint, e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def gate_options(fn):
    """--max-kld / --max-ppl-ratio / --min-top1: the output-quality gates of eval and of --eval."""
    fn = click.option("--min-top1", type=_Number(minimum=0, maximum=1), default=None, metavar="P",
                      help="Gate: exit 3 when top-1 agreement with the reference is below P.")(fn)
    fn = click.option("--max-ppl-ratio", type=_Number(minimum=0), default=None, metavar="R",
                      help="Gate: exit 3 when ppl / reference ppl exceeds R.")(fn)
    return click.option("--max-kld", type=_Number(minimum=0), default=None, metavar="X",
                        help="Gate: exit 3 when the mean KL divergence to the reference (nats) exceeds X.")(fn)


def eval_options(fn):
    """--eval DATA and its gates, on the commands that write a model (the output is evaluated against the input)."""
    fn = gate_options(fn)
    return click.option("--eval", "eval_data", default=None, metavar="DATA",
                        help="After writing OUT, evaluate it against the input on DATA (.txt, .jsonl, token-id "
                             ".safetensors; windows of --seq-len tokens where the command has it, else 512): ppl, "
                             "KL divergence, top-1 agreement, under the report's \"eval\".")(fn)


def _eval_request(eval_data, max_kld, max_ppl_ratio, min_top1, **settings):
    """The job's EvalOptions, or None without --eval (then no gate option may be given)."""
    from .jobs.evaluate import EvalOptions
    if eval_data is None:
        given = [n for n, v in (("--max-kld", max_kld), ("--max-ppl-ratio", max_ppl_ratio), ("--min-top1", min_top1))
                 if v is not None]
        if given:
            raise click.UsageError(f"{given[0]} gates the output's evaluation: pass --eval DATA as well")
        return None
    return EvalOptions(eval_data, max_kld=max_kld, max_ppl_ratio=max_ppl_ratio, min_top1=min_top1, **settings)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="qtool")
def main():
    """Quantize checkpoints to int8/int4 (compressed-tensors), merge LoRA adapters, report sizes and errors.

    SOURCE is a model folder (safetensors or PyTorch .bin, single or sharded), a single .safetensors/.bin/.pt
    file, or a hub id (org/name) already in the local Hugging Face cache. Exit codes: 0 success, 1 error,
    2 usage error, 3 quality gate failed.
    """
    runtime.prepare_process()  # before any command imports torch (and numpy)


@main.command()
@click.argument("source")
@json_option
@click.option("--against", default=None, metavar="REFERENCE", help="Per-tensor errors of SOURCE against this checkpoint.")
@click.option("--base", default=None, help="Base model of an adapter SOURCE (default: adapter_config's base path).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0),
              help="Rows in the largest/worst tensor tables; names in the JSON's `largest` and `summary.worst`.")
@click.option("--max-rel-error", type=_Number(minimum=0), default=None,
              help="With --against: exit 3 when any tensor that differs has a rel_error above X (X >= 0).")
@click.option("--lora-rank", type=click.IntRange(min=1), default=None, metavar="R",
              help="Also estimate the memory of a LoRA fine-tune at rank R on every linear layer (weights, gradients, Adam).")
@click.option("--lora-tokens", type=click.IntRange(min=0), default=0, show_default=True, metavar="T",
              help="With --lora-rank: add the activations of a training step of T tokens (batch x sequence length).")
@revision_option
@handle_errors
def inspect(source, as_json, against, base, top, max_rel_error, lora_rank, lora_tokens, revision):
    """Size report of SOURCE: parameters, bytes by dtype, bits per parameter, size at other widths.

    \b
    qtool inspect samples/tiny-llama
    qtool inspect out/tiny-llama-int4 --against samples/tiny-llama --json
    qtool inspect samples/tiny-llama-lora --base samples/tiny-llama
    qtool inspect samples/tiny-llama --lora-rank 16 --lora-tokens 512
    """
    from .jobs.inspect import inspect as run
    report = run(source, against=against, base=base, revision=revision, max_rel_error=max_rel_error,
                 lora_rank=lora_rank, top=top, lora_tokens=lora_tokens)
    _finish(report, as_json, top=top)


@main.command()
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--symmetric/--asymmetric", default=True, show_default=True, help="Zero point 0, or a zero point per group.")
@click.option("--group-size", type=int, default=None, callback=_group_size,
              help="N>0: groups of N input columns; -1: per output channel; 0: per tensor. Default: 128 for int4, -1 for int8.")
@click.option("--method", type=click.Choice(["rtn", "mse", "gptq", "awq", "awq+gptq"]), default="mse", show_default=True,
              help="rtn: min-max, byte-identical to llm-compressor; mse: clipping search; gptq: error compensation; "
                   "awq: activation-aware scales folded into norms / previous linears, then mse; awq+gptq: then gptq "
                   "(gptq and awq need --calib DATA).")
@click.option("--calib", default=None, metavar="DATA|STATS",
              help="Calibration text (.txt, one sample per line), .jsonl (text field), token ids (.safetensors), or a stats file from `qtool calibrate`.")
@click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--damp", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True, help="GPTQ damping, a fraction of the mean Hessian diagonal.")
@click.option("--awq-grid", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
              help="awq: values of α in s = mean|x|^α tried per mapping, evenly over [0, 1].")
@moe_options
@device_option
@click.option("--scheme", "schemes", multiple=True, metavar="GLOB=SPEC",
              help="Give tensors/modules matching GLOB this SPEC (repeatable, first match wins): int4|int8 with "
                   "optional :g32|:g64|:g128|:channel|:tensor and :sym|:asym, or dense. Unset parts take --bits, "
                   "--group-size, --symmetric. Modules vLLM fuses (q/k/v, gate/up, an MoE layer's experts) must agree.")
@click.option("--target-bits", type=click.FloatRange(min=0, min_open=True), default=None, metavar="B",
              help="Choose each module's SPEC from --candidates for the least predicted error at an average of at "
                   "most B stored bits per candidate weight (codes, scales, zero points). Without --calib the weights "
                   "alone rank the modules: better than uniform schemes on a causal LM, not on MiniLM (give an "
                   "encoder --calib).")
@click.option("--max-size", default=None, metavar="SIZE", callback=_size_option,
              help="Like --target-bits, for a whole output checkpoint of at most SIZE (e.g. 1.5GB, 800MiB, bytes).")
@click.option("--candidates", default=None, metavar="SPEC,SPEC,...",
              help="SPECs a budget chooses from (default int4:g128,int4:g64,int4:g32,int8:channel).")
@click.option("--sensitivity", type=click.Choice(list(arguments.SENSITIVITIES)), default=None,
              help="What a budget's choice minimises, from each module's output energy (sum_j mean(x_j^2)*|W_:,j|^2, "
                   "|W|^2 without --calib): group (default) sums each fused group's relative error (its members' "
                   "predicted errors over their summed energy); relative each module's own; proxy the predicted "
                   "errors as they are. The report's predicted_error is the proxy's figure either way.")
@click.option("--include", multiple=True, metavar="GLOB", help="Also quantize tensors/modules matching GLOB (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Keep tensors/modules matching GLOB unquantized; wins over --include.")
@report_option
@click.option("--max-rel-error", type=_Number(minimum=0), default=None,
              help="Quality gate: exit 3 when any quantized tensor's rel_error exceeds X (X >= 0).")
@click.option("--allow-nonfinite", is_flag=True, help="Keep tensors with NaN/Inf unquantized instead of failing.")
@click.option("--max-shard-size", default="5GB", show_default=True, callback=lambda ctx, param, v: parse_size(v),
              help="Largest output shard, e.g. 500MB, 2GB.")
@eval_options
@overwrite_option
@quiet_option
@json_option
@revision_option
@handle_errors
def quantize(source, out, bits, symmetric, group_size, method, calib, calib_samples, seq_len, damp, awq_grid,
             moe_calib, moe_min_tokens, device, schemes, target_bits, max_size, candidates, sensitivity, include,
             exclude, report_path, max_rel_error, allow_nonfinite, max_shard_size, eval_data, max_kld, max_ppl_ratio,
             min_top1, overwrite, quiet, as_json, revision):
    """Quantize SOURCE's linear weights to int4/int8 in the compressed-tensors pack-quantized format.

    \b
    qtool quantize samples/tiny-llama -o out/int4                         # int4, symmetric, group 128, mse
    qtool quantize samples/tiny-llama -o out/int8 --bits 8                # int8, per channel
    qtool quantize samples/tiny-llama -o out/rtn --method rtn --asymmetric
    qtool quantize samples/tiny-llama -o out/gptq --method gptq --calib samples/calib.txt
    qtool quantize samples/tiny-llama -o out/awq --method awq+gptq --calib samples/calib.txt
    qtool quantize MODEL -o OUT --exclude 'model.layers.0.*' --report report.json --max-rel-error 0.15
    qtool quantize MODEL -o OUT --scheme '*.down_proj=int8' --scheme 'model.layers.0.*=int4:g32'
    qtool quantize MODEL -o OUT --target-bits 4.5                         # exact allocation to a budget
    qtool quantize MODEL -o OUT --max-size 1.5GB --candidates int4:g128,int4:g32,int8:channel
    qtool quantize MODEL -o OUT --eval data.txt --max-kld 0.05 --min-top1 0.9   # gate on the output's quality
    """
    from .jobs.quantize import quantize as run
    from .progress import make_progress
    from .quant.spec import QuantSpec
    spec = QuantSpec(bits=int(bits), symmetric=symmetric, group_size=group_size, method=method)
    evaluation = _eval_request(eval_data, max_kld, max_ppl_ratio, min_top1, seq_len=seq_len, device=device)
    with make_progress(quiet or as_json) as progress:
        report = run(source, out, spec, include=include, exclude=exclude, schemes=schemes, target_bits=target_bits,
                     max_size=max_size, candidates=candidates, sensitivity=sensitivity, calib=calib,
                     calib_samples=calib_samples, seq_len=seq_len, damp=damp, awq_grid=awq_grid, moe_calib=moe_calib, moe_min_tokens=moe_min_tokens,
                     device=device, report_path=report_path, max_rel_error=max_rel_error,
                     allow_nonfinite=allow_nonfinite, max_shard_bytes=max_shard_size, overwrite=overwrite,
                     revision=revision, progress=progress, eval_options=evaluation)
    _finish(report, as_json, quiet)


@main.command()
@click.argument("source")
@click.option("--calib", required=True, metavar="DATA", help="Calibration text (.txt), .jsonl (text field) or token ids (.safetensors).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Statistics file (.safetensors).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True)
@moe_options
@device_option
@overwrite_option
@quiet_option
@revision_option
@handle_errors
def calibrate(source, calib, out, calib_samples, seq_len, moe_calib, moe_min_tokens, device, overwrite, quiet, revision):
    """Run calibration data through SOURCE and save per-channel input statistics of every linear layer.

    The file feeds `qtool quantize --method mse --calib STATS.safetensors` (compute once on a GPU, reuse).
    """
    from .jobs.calibrate import calibrate as run
    from .progress import make_progress
    with make_progress(quiet) as progress:
        summary = run(source, calib, out, calib_samples=calib_samples, seq_len=seq_len, device=device,
                      moe_calib=moe_calib, moe_min_tokens=moe_min_tokens,
                      overwrite=overwrite, revision=revision, progress=progress)
    if not quiet:
        click.echo(f"wrote statistics of {summary['layers']} linear layers from {summary['tokens']} tokens to {out}")
        experts = {r["module"].rsplit(".", 1)[0]: r["stats"] for r in summary["experts"]}  # gate/up/down agree
        if experts:
            wide = sum(s == "all" for s in experts.values())
            click.echo(f"{len(experts)} MoE experts: {len(experts) - wide} from their routed tokens, "
                       f"{wide} from all tokens")


@main.command()
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--dtype", type=DTYPES, default=None, help="Dense dtype (default: the scales' dtype).")
@report_option
@eval_options
@overwrite_option
@quiet_option
@json_option
@revision_option
@handle_errors
def dequantize(source, out, dtype, report_path, eval_data, max_kld, max_ppl_ratio, min_top1, overwrite, quiet, as_json,
               revision):
    """Turn a pack-quantized checkpoint (qtool's or compressed-tensors') back into a dense one."""
    from .jobs.dequantize import dequantize as run
    from .progress import make_progress
    evaluation = _eval_request(eval_data, max_kld, max_ppl_ratio, min_top1)
    with make_progress(quiet or as_json) as progress:
        report = run(source, out, dtype=dtype, overwrite=overwrite, revision=revision, progress=progress,
                     report_path=report_path, eval_options=evaluation)
    _finish(report, as_json, quiet)


@main.command("merge-lora")
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--weight", "weights", multiple=True, type=_Number(finite=True),
              help="Weight of each adapter, in order (default 1.0 each).")
@click.option("--dtype", type=DTYPES, default=None, help="Output dtype of merged tensors (default: the base's).")
@report_option
@eval_options
@overwrite_option
@quiet_option
@json_option
@revision_option
@handle_errors
def merge_lora(base, adapters, out, weights, dtype, report_path, eval_data, max_kld, max_ppl_ratio, min_top1, overwrite,
               quiet, as_json, revision):
    """Merge PEFT LoRA adapters into BASE's weights, exactly as PEFT would, one tensor at a time.

    \b
    qtool merge-lora samples/tiny-llama samples/tiny-llama-lora -o out/merged
    qtool merge-lora BASE A1 A2 --weight 0.7 --weight 0.3 -o OUT --report merge.json
    """
    from .jobs.merge import merge_lora as run
    from .progress import make_progress
    if weights and len(weights) != len(adapters):
        raise click.BadParameter(f"got {len(weights)} weights for {len(adapters)} adapters", param_hint="--weight")
    evaluation = _eval_request(eval_data, max_kld, max_ppl_ratio, min_top1)
    with make_progress(quiet or as_json) as progress:
        report = run(base, list(adapters), out, weights=list(weights) or None, dtype=dtype, overwrite=overwrite,
                     revision=revision, progress=progress, report_path=report_path, eval_options=evaluation)
    _finish(report, as_json, quiet)


@main.command("eval")
@click.argument("model")
@click.option("--ref", default=None, metavar="REF", help="Reference model (e.g. the unquantized source): adds ref_ppl, ppl_ratio, KL divergence, top-1 agreement.")
@click.option("--data", required=True, metavar="DATA",
              help="Text (.txt, one text cut into --seq-len windows), .jsonl (text field, one window per record) or token ids (.safetensors input_ids, one window per row).")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Tokens per window.")
@click.option("--samples", type=click.IntRange(min=1), default=None, metavar="N", help="Keep the first N windows (default: all).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, metavar="B",
              help="Windows walked through the models together; memory grows with B, and each batch reads both models once. Default: 8192 tokens' worth.")
@device_option
@gate_options
@report_option
@click.option("--overwrite", is_flag=True, help="Replace the --report file if it exists (a qtool report only).")
@json_option
@quiet_option
@revision_option
@handle_errors
def eval_(model, ref, data, seq_len, samples, batch_size, device, max_kld, max_ppl_ratio, min_top1, report_path,
          overwrite, as_json, quiet, revision):
    """Perplexity of MODEL on DATA and, with --ref, how far its next-token distributions moved from REF's.

    Both models are walked block by block in lockstep, so memory stays near one block of each model plus the
    hidden states of a batch of windows. The tokenizer is REF's (else MODEL's).

    \b
    qtool eval out/int4 --ref samples/tiny-llama --data samples/eval.txt
    qtool eval out/int4 --ref SOURCE --data wiki.txt --max-kld 0.05 --max-ppl-ratio 1.05 --min-top1 0.9 --report eval.json
    """
    if ref is None and any(v is not None for v in (max_kld, max_ppl_ratio, min_top1)):
        raise click.UsageError("--max-kld, --max-ppl-ratio and --min-top1 compare MODEL with a reference: pass --ref")
    from .jobs.evaluate import evaluate as run
    from .progress import make_progress
    with make_progress(quiet or as_json) as progress:
        report = run(model, data, ref=ref, seq_len=seq_len, samples=samples, batch_size=batch_size, device=device,
                     max_kld=max_kld, max_ppl_ratio=max_ppl_ratio, min_top1=min_top1, report_path=report_path,
                     overwrite=overwrite, revision=revision, progress=progress)
    _finish(report, as_json, quiet)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str, option: str = "--max-shard-size") -> int:
    """'1.5GB', '800MiB', '123' (bytes) → bytes; decimal units are powers of 10, binary ones of 2."""
    import re
    from fractions import Fraction
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size like 500MB, 1.5GB, 800MiB or a number of bytes",
                                 param_hint=option)
    size = int(Fraction(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 1:
        raise click.BadParameter(f"{text!r} is not a size of at least 1 byte", param_hint=option)
    return size


if __name__ == "__main__":
    main()
