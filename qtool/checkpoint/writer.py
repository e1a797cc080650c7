"""Write a checkpoint folder atomically, streaming tensors straight into their shard files.

The caller plans every output tensor (name, shape, dtype) up front, so every shard's header, and so every
tensor's byte offset, is known before any data: tensors are then written in place, in any order, with
positional writes, all from one background thread (computing overlaps writing; at most WRITE_BEHIND_BYTES wait;
one writer because concurrent writes to a file only queue on its inode lock). `write` hands over a finished
tensor; `sink` lets a worker produce a tensor piece by piece into pooled block buffers, so no full-size output
buffer is ever allocated and each piece is written while it is still in cache. Everything goes into a temporary
folder beside OUT that moves into place only when every planned byte is written (checkpoint.outputs: the rules
for what it may replace, and who else may write there).
"""
from __future__ import annotations

import errno
import json
import math
import os
import queue
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .. import native
from ..errors import QtoolError
from ..interrupts import deferred
from . import outputs
from .safetensors_header import DTYPE_CODES

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' long-standing default shard size
WRITE_BEHIND_BYTES = 64 * 2**20  # bytes handed to the file thread but not yet on disk (beyond one tensor)
SINK_BLOCKS = 16  # block buffers shared by all sinks: workers fill some while the file thread writes others


@dataclass(frozen=True)
class _Planned:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def safetensors_header(specs: list[_Planned], metadata: dict[str, str] | None = None) -> bytes:
    """Deterministic header: data in the given order, keys sorted, padded with spaces to 8 bytes."""
    entries, pos = {}, 0
    for s in specs:
        entries[s.name] = {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        pos += s.nbytes
    header = {"__metadata__": dict(metadata or {"format": "pt"}), **dict(sorted(entries.items()))}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def shard_names(n: int, basename: str = "model") -> list[str]:
    if n == 1:
        return [f"{basename}.safetensors"]
    return [f"{basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


_SEEK_LOCK = threading.Lock()


def _pwrite(fd: int, data, offset: int) -> None:
    """All of `data` (bytes or a contiguous CPU tensor) at `offset` of the open file `fd`: the writer's only way
    to a file. Tensors go through the native kernel where it is built (no Python view, GIL released)."""
    if isinstance(data, torch.Tensor):
        if native.pwrite(fd, data, offset):
            return
        data = data.reshape(-1).view(torch.uint8).numpy()
    view = memoryview(data).cast("B")
    while view:
        if hasattr(os, "pwrite"):
            n = os.pwrite(fd, view, offset)
        else:  # Windows has no pwrite: seek and write, one writer at a time
            with _SEEK_LOCK:
                os.lseek(fd, offset, os.SEEK_SET)
                n = os.write(fd, view)
        view, offset = view[n:], offset + n


def _cut(planned: list[_Planned], max_shard_bytes: int | None, basename: str) -> dict[str, list[_Planned]]:
    """The planned sequence cut into shards of at most `max_shard_bytes` of data (a larger tensor alone)."""
    limit = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    groups: list[list[_Planned]] = [[]]
    size = 0
    for p in planned:
        if groups[-1] and size + p.nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    return dict(zip(shard_names(len(groups), basename), groups))


def _index(by_shard: dict[str, list[_Planned]]) -> dict:
    return {"metadata": {"total_size": sum(p.nbytes for group in by_shard.values() for p in group)},
            "weight_map": dict(sorted((p.name, shard) for shard, group in by_shard.items() for p in group))}


def json_bytes(obj) -> bytes:
    """A JSON file as the writer stores it (indented, keys sorted, a final newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def planned_bytes(specs: Iterable, max_shard_bytes: int | None = None, basename: str = "model",
                  metadata: dict[str, str] | None = None) -> int:
    """The bytes of the weight files (and index) that `plan(specs, max_shard_bytes=...)` writes, exactly, without
    writing anything: what a size budget is checked against."""
    planned = [_Planned(s[0], tuple(int(d) for d in s[1]), s[2]) for s in specs]
    by_shard = _cut(planned, max_shard_bytes, basename)
    total = sum(len(safetensors_header(g, metadata)) + sum(p.nbytes for p in g) for g in by_shard.values())
    return total + (len(json_bytes(_index(by_shard))) if len(by_shard) > 1 else 0)


class CheckpointWriter:
    """`with CheckpointWriter(out) as w: w.plan(specs); w.write(name, t); ...` → OUT appears only on success."""

    def __init__(self, out: str | os.PathLike, overwrite: bool = False, basename: str = "model",
                 metadata: dict[str, str] | None = None):
        self.out = Path(out)
        self.overwrite = overwrite
        self.basename = basename
        self.metadata = metadata
        self.tmp: Path | None = None
        self._where: dict[str, tuple[int, int, _Planned]] = {}  # name -> (fd, byte offset, spec)
        self._fds: list[int] = []
        self._unwritten: set[str] = set()
        self._lock = threading.Lock()
        self._index: dict | None = None
        self._queue: queue.Queue = queue.Queue()
        self._queued = 0  # bytes in the queue; bounded by WRITE_BEHIND_BYTES so memory stays flat
        self._room = threading.Condition()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._blocks: queue.Queue = queue.Queue()  # free sink buffers (uint8)
        self._blocks_made = 0

    # -- set-up -------------------------------------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        # The job's claim on OUT (checkpoint.outputs: the overlap, overwrite and one-writer rules), or our own.
        self._claim = outputs.output(self.out, outputs.FOLDER, self.overwrite)
        self._output = self._claim.__enter__()
        try:
            self.tmp = self._output.temp(folder=True)  # the claim removes it if this run never gets to
        except BaseException as e:
            self._claim.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def plan(self, specs: Iterable, shards: dict[str, str] | None = None, max_shard_bytes: int | None = None,
             index: bool | None = None) -> list[str]:
        """Fix every output tensor and its place: data in the order given (headers list names sorted). `shards`
        maps names to shard files (to mirror a source's layout); otherwise the sequence is cut into shards of at
        most `max_shard_bytes`. Each shard file is created with its header. Returns the shard files' names."""
        planned = [_Planned(s[0], tuple(int(d) for d in s[1]), s[2]) for s in specs]
        if len({p.name for p in planned}) != len(planned):
            raise ValueError("duplicate tensor names in the plan")
        by_shard: dict[str, list[_Planned]] = {}
        if shards is not None:
            for p in planned:
                by_shard.setdefault(shards[p.name], []).append(p)
            by_shard = dict(sorted(by_shard.items()))
        else:
            by_shard = _cut(planned, max_shard_bytes, self.basename)
        try:
            for shard, group in by_shard.items():
                path = self.tmp / shard
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
                self._fds.append(fd)
                header = safetensors_header(group, self.metadata)
                _pwrite(fd, header, 0)
                pos = len(header)
                for p in group:
                    self._where[p.name] = (fd, pos, p)
                    pos += p.nbytes
        except OSError as e:
            self._error = e
            self._raise()
        self._unwritten = {p.name for p in planned if p.nbytes}
        if index if index is not None else len(by_shard) > 1:
            self._index = _index(by_shard)
        self._thread = threading.Thread(target=self._drain, name="qtool-writer", daemon=True)
        self._thread.start()
        return list(by_shard)

    # -- writing ------------------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a whole tensor for the file thread (blocks while WRITE_BEHIND_BYTES are already waiting)."""
        if self._error:
            self._raise()
        _, _, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{name}: planned {spec.shape} {spec.dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        self._put((name, 0, tensor.detach().to("cpu").contiguous(), True, None))

    def sink(self, name: str) -> "TensorSink":
        """Write tensor `name` piece by piece from the calling thread (see TensorSink)."""
        if self._error:
            self._raise()
        return TensorSink(self, name)

    def _put(self, item) -> None:
        """item: (name, byte offset in the tensor, contiguous CPU tensor, last piece?, pooled buffer to return
        once written or None), or None to stop."""
        nbytes = item[2].numel() * item[2].element_size() if item is not None else 0
        # Signals wait for the end: one raised between a lock's acquire and its `with` block would leave the lock
        # held, and the file thread (then the cleanup that waits for it) would block on it forever.
        with deferred():
            with self._room:
                while self._queued and self._queued + nbytes > WRITE_BEHIND_BYTES and not self._error:
                    self._room.wait(0.2)
                if self._error:
                    self._raise()
                self._queued += nbytes
            self._queue.put(item)

    def _store(self, name: str, data, offset: int = 0) -> None:
        fd, pos, _ = self._where[name]
        _pwrite(fd, data, pos + offset)

    def _done(self, name: str) -> None:
        with self._lock:
            self._unwritten.discard(name)

    def _block(self, nbytes: int) -> torch.Tensor:
        """A free sink buffer of at least nbytes (waits while all SINK_BLOCKS are queued for writing)."""
        with self._lock:
            make = self._blocks.empty() and self._blocks_made < SINK_BLOCKS
            self._blocks_made += make
        buf = torch.empty(nbytes, dtype=torch.uint8) if make else self._blocks.get()
        return buf if buf.numel() >= nbytes else torch.empty(nbytes, dtype=torch.uint8)

    def _drain(self) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                name, offset, t, last, pooled = item
                if t.numel():
                    self._store(name, t, offset)
                if last:
                    self._done(name)
                if pooled is not None:
                    self._blocks.put(pooled)
                with self._room:
                    self._queued -= t.numel() * t.element_size()
                    self._room.notify_all()
        except BaseException as e:  # surfaced to the caller on its next call
            with self._room:
                self._error = e
                self._room.notify_all()

    def _raise(self):
        e = self._error
        if isinstance(e, OSError):
            if e.errno == errno.ENOSPC:
                raise QtoolError(self.out, "no space left on device while writing; nothing was written") from None
            raise QtoolError(self.out, f"cannot write: {e.strerror or e}") from None
        raise e

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        dst = self.tmp / (name or Path(src).name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, dst)
        except OSError as e:
            self._error = e
            self._raise()

    def write_json(self, name: str, obj) -> None:
        try:
            (self.tmp / name).write_bytes(json_bytes(obj))
        except OSError as e:
            self._error = e
            self._raise()

    # -- finishing ----------------------------------------------------------------------------------------
    def _finish(self) -> None:
        if self._thread is not None:
            self._put(None)
            self._thread.join()
            if self._error:
                self._raise()
            if self._unwritten:
                raise RuntimeError(f"tensor {min(self._unwritten)!r} was planned but never written")
        self._close_files()
        if self._index is not None:
            self.write_json(f"{self.basename}.safetensors.index.json", self._index)
        self._output.publish(self.tmp)

    def _close_files(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def _abort(self) -> None:
        with deferred():
            if self._thread is not None and self._thread.is_alive():
                self._error = self._error or RuntimeError("aborted")
                self._queue.put(None)
                self._thread.join()  # it stops after what is queued (WRITE_BEHIND_BYTES at most)
            self._close_files()
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._finish()
                    return
                except BaseException:
                    self._abort()
                    raise
            self._abort()
        finally:
            self._claim.__exit__(None, None, None)


class TensorSink:
    """One planned tensor produced piece by piece by a worker:

        with writer.sink(name) as out:
            for each block:  buf = out.buffer(numel, dtype); <fill buf>; out.write(byte_offset, buf)

    `buffer` lends a pooled block buffer (no fresh pages per block); `write` queues it for the file thread, which
    returns it to the pool once on disk. Pieces may come in any order but must cover the tensor exactly; it counts
    as written when the `with` block ends cleanly and its pieces are on disk."""

    def __init__(self, writer: CheckpointWriter, name: str):
        self.writer, self.name = writer, name
        self.nbytes = writer._where[name][2].nbytes
        self.written = 0
        self._lent: dict[int, torch.Tensor] = {}  # data pointer of a lent view -> its pooled buffer

    def buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat pooled buffer for `numel` values of `dtype` (reshape it if needed; write() takes any view)."""
        raw = self.writer._block(numel * dtype.itemsize)
        view = raw[:numel * dtype.itemsize].view(dtype)
        self._lent[view.data_ptr()] = raw
        return view

    def write(self, offset: int, piece: torch.Tensor) -> None:
        """Queue the bytes of a contiguous CPU tensor (a `buffer` or any tensor) for byte `offset` of this tensor."""
        n = piece.numel() * piece.element_size()
        if offset < 0 or offset + n > self.nbytes:
            raise ValueError(f"{self.name}: bytes {offset}..{offset + n} fall outside its {self.nbytes} bytes")
        pooled = self._lent.pop(piece.data_ptr(), None) if piece.is_contiguous() else None
        self.written += n
        self.writer._put((self.name, offset, piece.contiguous(), self.written == self.nbytes, pooled))

    def __enter__(self) -> "TensorSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.written != self.nbytes:
            raise RuntimeError(f"{self.name}: {self.written} of {self.nbytes} bytes written")
