"""Read and check a safetensors header without trusting the file.

A safetensors file is: 8 bytes little-endian header length N, N bytes of JSON, then the data buffer.
Every entry must name a known dtype, a shape, and offsets that tile the data buffer exactly (no holes,
no overlaps, nothing past the end): the same rules the safetensors library enforces, checked here first so
that a bad file gives a one-line error naming it instead of a library traceback.
"""
from __future__ import annotations

import math
import struct
from pathlib import Path

import torch

from ..errors import QtoolError
from .jsonfile import brief, parse

# safetensors dtype code → torch dtype (only those this torch build has).
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in {
        "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
        "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
        "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, attr)
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIMS = 64


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """Return (entries, metadata, data_start) of a checked safetensors file.

    entries: name → {"dtype": torch.dtype, "shape": tuple, "start": abs offset, "nbytes": int}.
    """
    raw, size = _raw_header(path)
    header = parse(raw, path, "the safetensors header")
    if not isinstance(header, dict):
        raise QtoolError(path, "corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QtoolError(path, "corrupt safetensors header: __metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    entries = {name: _entry(path, name, e, data_start, size - data_start) for name, e in header.items()}
    _check_tiling(path, entries, data_start, size - data_start)
    return dict(sorted(entries.items())), metadata, data_start


def _raw_header(path: Path) -> tuple[bytes, int]:
    """The header's JSON bytes and the file's size, after checking the length prefix against the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QtoolError(path, "not a safetensors file: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise QtoolError(path, f"not a safetensors file, or a corrupt one: its header length {n} is implausibly large")
            if 8 + n > size:
                raise QtoolError(path, f"not a safetensors file, or a truncated one: its header length {n} runs past "
                                       f"the end of the file ({size} bytes)")
            return f.read(n), size
    except OSError as e:
        raise QtoolError(path, f"cannot read: {e.strerror or e}") from None


def _entry(path: Path, name: str, e, data_start: int, data_size: int) -> dict:
    """One checked header entry: a known dtype, a shape, offsets inside the data that match the shape."""
    if not isinstance(e, dict):
        raise QtoolError(path, f"corrupt safetensors header: entry {brief(name)} is not an object")
    code = e.get("dtype")
    if not isinstance(code, str) or code not in DTYPES:
        raise QtoolError(path, f"tensor {brief(name)} has an unknown dtype {brief(code)}")
    shape = e.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)):
        raise QtoolError(path, f"tensor {brief(name)} has an invalid shape {brief(shape)}")
    offs = e.get("data_offsets")
    if (not isinstance(offs, list) or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]):
        raise QtoolError(path, f"tensor {brief(name)} has invalid data offsets {brief(offs)}")
    if offs[1] > data_size:
        raise QtoolError(path, f"tensor {brief(name)} has data offsets {offs} past the end of the data ({data_size} bytes): the file is truncated or corrupt")
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != offs[1] - offs[0]:
        raise QtoolError(path, f"tensor {brief(name)} has shape {brief(shape)} ({code}, {nbytes} bytes) but its data offsets span {offs[1] - offs[0]} bytes")
    return {"dtype": dtype, "shape": tuple(shape), "start": data_start + offs[0], "nbytes": nbytes}


def _check_tiling(path: Path, entries: dict, data_start: int, data_size: int) -> None:
    """The tensors must tile the buffer: sorted by start, each begins where the previous ended."""
    spans = sorted((e["start"] - data_start, e["start"] - data_start + e["nbytes"], name) for name, e in entries.items())
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise QtoolError(path, f"corrupt safetensors header: tensors {brief(prev)} and {brief(name)} overlap")
        if begin > pos:
            raise QtoolError(path, f"corrupt safetensors header: {begin - pos} bytes before tensor {brief(name)} belong to no tensor")
        pos, prev = end, name
    if pos != data_size:
        raise QtoolError(path, f"corrupt safetensors file: {data_size - pos} bytes after the last tensor belong to no tensor")
