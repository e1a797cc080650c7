"""The jobs' arguments, checked in one place for the Python API and the command line, and the words errors use.

`@checked` on a job checks every argument it knows by name before any work (a bad value is an ArgumentError:
a QtoolError and a ValueError, exit 2 on the command line) and, when the caller is Python rather than the CLI,
rewrites the command-line options that messages name (`pass --overwrite`) into the arguments the caller passed
(`pass overwrite=True`). The CLI's option types run the same checks, so both refuse the same values.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import math
import os
import re
from typing import Callable

from ..alloc.measure import SENSITIVITIES
from ..errors import ArgumentError, QtoolError
from ..quant.spec import METHODS

CLI = contextvars.ContextVar("qtool_cli", default=False)  # set by the command line for the length of a command

# Command-line options and the job arguments they set. Flags name the argument with the value they give it.
FLAGS = {"--overwrite": "overwrite=True", "--allow-nonfinite": "allow_nonfinite=True",
         "--asymmetric": "QuantSpec(symmetric=False)", "--symmetric": "QuantSpec(symmetric=True)"}
VALUED = {"--include": "include", "--exclude": "exclude", "--group-size": "group_size", "--method": "method",
          "--bits": "bits", "--calib": "calib", "--calib-samples": "calib_samples", "--seq-len": "seq_len",
          "--damp": "damp", "--device": "device", "--max-rel-error": "max_rel_error", "--dtype": "dtype",
          "--max-shard-size": "max_shard_bytes", "--weight": "weights", "--report": "report_path",
          "--against": "against", "--base": "base", "--revision": "revision", "--top": "top",
          "--lora-rank": "lora_rank", "--out": "out", "--moe-calib": "moe_calib", "--moe-min-tokens": "moe_min_tokens",
          "--scheme": "schemes", "--target-bits": "target_bits", "--max-size": "max_size", "--candidates": "candidates",
          "--sensitivity": "sensitivity",
          "--ref": "ref", "--data": "data", "--samples": "samples", "--batch-size": "batch_size",
          "--max-kld": "max_kld", "--max-ppl-ratio": "max_ppl_ratio", "--min-top1": "min_top1",
          "--awq-grid": "awq_grid"}
LISTS = {"--include", "--exclude", "--weight", "--scheme", "--candidates"}  # repeatable options: lists in Python
CHOICES = {"--method": set(METHODS), "--dtype": {"float16", "bfloat16", "float32"}, "--moe-calib": {"routed", "all"},
           "--device": {"auto", "cpu", "cuda"}, "--sensitivity": set(SENSITIVITIES)}
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:([ =])('[^']*'|[A-Za-z0-9_.:+-]+))?")
_DEVICE = re.compile(r"auto|cpu|cuda(?::\d+)?")


def in_python_terms(text: str) -> str:
    """`pass --exclude 'm'` → `pass exclude=['m']`, `--method rtn` → `method='rtn'`, `--overwrite` → `overwrite=True`,
    `--calib DATA` → `calib=DATA`."""
    def one(m: re.Match) -> str:
        option, sep, value = m.group(1), m.group(2), m.group(3)
        rest = f"{sep}{value}" if value else ""
        if option in FLAGS:
            return FLAGS[option] + rest
        if option not in VALUED:
            return m.group(0)
        if value is None or not _is_value(option, value):
            return VALUED[option] + rest
        if not (value[0] == "'" or _is_number(value) or value.isupper()):
            value = repr(value)
        return f"{VALUED[option]}=[{value}]" if option in LISTS else f"{VALUED[option]}={value}"
    return _OPTION.sub(one, text)


def _is_value(option: str, value: str) -> bool:
    """Whether the word after an option in a message is its value (a quoted string, a number, a placeholder like
    DATA or one of the option's choices) rather than the next word of the sentence."""
    return value[0] == "'" or _is_number(value) or value.isupper() or value.split(":")[0] in CHOICES.get(option, ())


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def name(argument: str) -> str:
    """An argument as the caller knows it: `max_rel_error` from Python, `--max-rel-error` on the command line."""
    if not CLI.get():
        return argument
    return next((o for o, a in VALUED.items() if a == argument), "--" + argument.replace("_", "-"))


# -- checks: each returns the value or raises ArgumentError(name, problem) --------------------------------

def number(value, argument: str, minimum: float | None = None, finite: bool = False, above: bool = False,
           maximum: float | None = None) -> float:
    """A real number (not NaN; finite when asked), at least (or above) `minimum`, at most `maximum`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(name(argument), f"must be a number, not {value!r}")
    x = float(value)
    if math.isnan(x) or finite and math.isinf(x):
        raise ArgumentError(name(argument), f"must be a {'finite ' if finite else ''}number, not {value!r}")
    if minimum is not None and (x <= minimum if above else x < minimum):
        raise ArgumentError(name(argument), f"must be {'above' if above else 'at least'} {minimum:g}, not {value!r}")
    if maximum is not None and x > maximum:
        raise ArgumentError(name(argument), f"must be at most {maximum:g}, not {value!r}")
    return x


def integer(value, argument: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(name(argument), f"must be an integer of at least {minimum}, not {value!r}")
    return value


def choice(value, argument: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ArgumentError(name(argument), f"{value!r} is not one of {', '.join(map(repr, options))}")
    return value


def device(value, argument: str = "device") -> str:
    """A device name qtool knows (auto, cpu, cuda, cuda:N), present on this machine or not."""
    if not isinstance(value, str) and type(value).__name__ != "device" or not _DEVICE.fullmatch(str(value).strip().lower()):
        raise ArgumentError(name(argument), f"{value!r} is not a device: use auto, cpu, cuda or cuda:N")
    return value


def path(value, argument: str, output: bool = False):
    """A str or os.PathLike. An empty one names no file: refused for an input here (it would mean the current
    folder), left for an output to checkpoint.outputs, which refuses it with the other unusable names."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentError(name(argument), f"must be a path (a string or os.PathLike), not {value!r}")
    if not os.fspath(value) and not output:
        raise QtoolError("''", f"is not a usable {argument} name: name a file or folder")
    return value


def _paths(value, argument: str):
    if isinstance(value, (str, os.PathLike)) or not isinstance(value, (list, tuple)) or not value:
        raise ArgumentError(name(argument), f"must be a non-empty list of paths, not {value!r}")
    return [path(v, argument) for v in value]


def _globs(value, argument: str):
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(g, str) for g in value):
        raise ArgumentError(name(argument), f"must be a list of glob strings, not {value!r}")
    return value


def _spec(value, argument: str = "spec"):
    from ..quant.spec import QuantSpec
    if value is not None and not isinstance(value, QuantSpec):
        raise ArgumentError(name(argument), f"must be a qtool.QuantSpec, not {type(value).__name__}")
    return value


def _weights(value, arguments: dict):
    if value is None:
        return value
    ws = [number(w, "weights", finite=True) for w in (value if isinstance(value, (list, tuple)) else [value])]
    adapters = arguments.get("adapters")
    if isinstance(adapters, (list, tuple)) and len(ws) != len(adapters):
        raise ArgumentError(name("weights"), f"got {len(ws)} weights for {len(adapters)} adapters")
    return value


# Checks by argument name (an argument whose default is None may be None).
CHECKS: dict[str, Callable] = {
    "source": path, "out": lambda v, a: path(v, a, output=True), "base": path, "calib": path, "adapters": _paths,
    "report_path": lambda v, a: path(v, a, output=True),
    "against": path, "max_rel_error": lambda v, a: number(v, a, minimum=0),
    "damp": lambda v, a: number(v, a, minimum=0, finite=True, above=True),
    "calib_samples": lambda v, a: integer(v, a, 1), "seq_len": lambda v, a: integer(v, a, 1),
    "max_shard_bytes": lambda v, a: integer(v, a, 1), "lora_rank": lambda v, a: integer(v, a, 1),
    "moe_calib": lambda v, a: choice(v, a, ("routed", "all")), "moe_min_tokens": lambda v, a: integer(v, a, 1),
    "awq_grid": lambda v, a: integer(v, a, 1),
    "device": device, "spec": _spec, "include": _globs, "exclude": _globs,
    "schemes": _globs, "target_bits": lambda v, a: number(v, a, minimum=0, finite=True, above=True),
    "max_size": lambda v, a: integer(v, a, 1), "candidates": lambda v, a: v if isinstance(v, str) else _globs(v, a),
    "sensitivity": lambda v, a: choice(v, a, SENSITIVITIES),
    "model": path, "ref": path, "data": path, "samples": lambda v, a: integer(v, a, 1),
    "batch_size": lambda v, a: integer(v, a, 1), "max_kld": lambda v, a: number(v, a, minimum=0),
    "max_ppl_ratio": lambda v, a: number(v, a, minimum=0), "min_top1": lambda v, a: number(v, a, minimum=0, maximum=1),
}


def checked(fn):
    """Check `fn`'s arguments by name before it runs; QtoolErrors leave it in the caller's terms."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise ArgumentError(fn.__name__, str(e)) from None
        bound.apply_defaults()
        try:
            for argument, value in bound.arguments.items():
                if argument in CHECKS and not (value is None and sig.parameters[argument].default is None):
                    CHECKS[argument](value, argument)
            if "weights" in bound.arguments:
                _weights(bound.arguments["weights"], bound.arguments)
            return fn(*args, **kwargs)
        except QtoolError as e:
            if not CLI.get():
                e.restate(in_python_terms(e.path), in_python_terms(e.problem))
            raise
    return run
