"""JSON from files qtool does not trust (config.json, adapter_config.json, index files, safetensors headers).

`parse` turns every way a document can be bad into one QtoolError naming the file: not UTF-8, not JSON, nested
deeper than any real config (a document nested thousands of levels deep would otherwise overflow the stack here
or in any code that walks it later), numbers too long to convert. `check` then holds the document to a schema of
the keys qtool itself reads, so the code behind it can trust their JSON types; other keys pass untouched.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import QtoolError

MAX_DEPTH = 64  # real configs nest a handful of levels


def brief(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters: a value from a hostile file can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse(raw: bytes | str, path, what: str = "JSON"):
    """The decoded document, or a QtoolError(path, "<what>: <problem>")."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
        obj = json.loads(text)
    except UnicodeDecodeError as e:
        raise QtoolError(path, f"{what} is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise QtoolError(path, f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise QtoolError(path, f"{what} is not valid: JSON nested too deeply") from None
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise QtoolError(path, f"{what} is not valid: it holds a number too long to read") from None
    depth = _depth(obj)
    if depth > MAX_DEPTH:
        raise QtoolError(path, f"{what} is not valid: JSON nested {depth} levels deep (at most {MAX_DEPTH})")
    return obj


def _depth(obj) -> int:
    """Nesting depth of a decoded document, measured without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, d)
        stack.extend((child, d + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def read(path: str | os.PathLike, what: str | None = None, schema: "Obj | None" = None) -> dict:
    """A JSON object from a file, parsed safely and checked against `schema`."""
    path = Path(path)
    what = what or path.name
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise QtoolError(path, f"cannot read {what}: {e.strerror or e}") from None
    obj = parse(raw, path, what)
    if not isinstance(obj, dict):
        raise QtoolError(path, f"{what} is not a JSON object (it is {_kind(obj)})")
    if schema is not None:
        schema.check(obj, path, "")
    return obj


# -- schemas ------------------------------------------------------------------------------------------------

class Int:
    """An integer (not a boolean) that fits in 64 bits."""
    name = "an integer"

    @staticmethod
    def accepts(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63


class PositiveInt(Int):
    name = "a positive integer"

    @staticmethod
    def accepts(v) -> bool:
        return Int.accepts(v) and v > 0


class Num:
    """A finite number (not a boolean)."""
    name = "a number"

    @staticmethod
    def accepts(v) -> bool:
        return (Int.accepts(v) or isinstance(v, float)) and not isinstance(v, bool) and math.isfinite(v)


class ListOf:
    def __init__(self, item):
        self.item = item
        self.name = f"a list of {_plural(item)}"

    def accepts(self, v) -> bool:
        return isinstance(v, list) and all(_accepts(self.item, x) for x in v)


class Obj:
    """An object whose listed keys must hold one of the given kinds; `values` (when set) holds every other key."""

    name = "an object"

    def __init__(self, fields: dict | None = None, values=None):
        self.fields, self.values = fields or {}, values

    def accepts(self, v) -> bool:
        return isinstance(v, dict)

    def check(self, obj: dict, path, where: str) -> None:
        for key, value in obj.items():
            kinds = self.fields.get(key, self.values)
            if kinds is None:
                continue
            here = f"{where}.{key}" if where else key
            kinds = kinds if isinstance(kinds, tuple) else (kinds,)
            if not any(_accepts(k, value) for k in kinds):
                names = " or ".join(_name(k) for k in kinds)
                raise QtoolError(path, f"{here} must be {names}, not {_kind(value)}")
            for k in kinds:
                if isinstance(k, Obj) and isinstance(value, dict):
                    k.check(value, path, here)


def _accepts(kind, v) -> bool:
    if kind is None:
        return v is None
    if kind in (str, bool, dict, list):
        return isinstance(v, kind)
    return kind.accepts(v)


_NAMES = {str: "a string", bool: "true or false", dict: "an object", list: "a list", None: "null"}


def _name(kind) -> str:
    return _NAMES.get(kind) if kind in _NAMES else kind.name


def _plural(kind) -> str:
    return {str: "strings", bool: "booleans", dict: "objects"}.get(kind) or _name(kind).split(" ", 1)[1] + "s"


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number" if Num.accepts(v) else "an out-of-range number"
    if isinstance(v, str):
        return "a string"
    return "a list" if isinstance(v, list) else "an object"


# What qtool reads from a config.json's quantization_config (compressed-tensors); other keys pass through.
_WEIGHTS = Obj({"num_bits": Int, "type": str, "symmetric": bool, "group_size": (Int, None), "strategy": (str, None)})
_SCHEME = Obj({"format": (str, None), "targets": (ListOf(str), None), "weights": (_WEIGHTS, None)})
QUANTIZATION_CONFIG = Obj({
    "quant_method": str, "format": (str, None), "ignore": (ListOf(str), None), "provider": (str, None),
    "config_groups": (Obj(values=_SCHEME), None), "qtool": (Obj({"method": (str, None)}), None),
})
_MODEL_FIELDS = {
    "model_type": (str, None), "architectures": (ListOf(str), None), "tie_word_embeddings": (bool, None),
    "torch_dtype": (str, None), "dtype": (str, None), "hidden_size": (Int, None), "n_embd": (Int, None),
}
CONFIG = Obj({**_MODEL_FIELDS, "text_config": Obj(_MODEL_FIELDS), "quantization_config": (QUANTIZATION_CONFIG, None)})
ADAPTER_CONFIG = Obj({
    "r": (PositiveInt, None), "lora_alpha": (Num, None), "base_model_name_or_path": (str, None),
    "peft_type": (str, None), "bias": (str, None), "rank_pattern": (dict, None), "alpha_pattern": (dict, None),
    "target_modules": (str, ListOf(str), None), "exclude_modules": (str, ListOf(str), None),
    "modules_to_save": (ListOf(str), None), "layers_pattern": (str, ListOf(str), None),
    "layers_to_transform": (Int, ListOf(Int), None),
})
INDEX = Obj({"weight_map": Obj(values=str), "metadata": (dict, None)})
