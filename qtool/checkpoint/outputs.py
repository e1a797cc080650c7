"""Where a job may write, and who may write there. Every output a command names is claimed before any work:

1. Outputs never touch inputs: outputs and inputs are compared as real paths (symlinks followed, a folder's
   linked files too); an output that is an input, lies inside one or contains one is refused, as is an output
   inside another output, or one whose name is empty, `.` or `..`.
2. `--overwrite` replaces only what qtool could have written: a checkpoint folder (checkpoint.layout), a qtool
   report, a qtool statistics file. Anything else is refused, naming what is in the way.
3. One writer per output: a claim holds an advisory lock on `.NAME.qtool-lock` beside the output; a second run
   fails at once. The finished output moves into place with an atomic rename that never replaces an output
   that appeared meanwhile (or an atomic exchange, with --overwrite).
4. Temporary outputs are `.NAME.<random>.qtool-tmp` beside the output, private (0700/0600) until they move into
   place with the umask's permissions. Ones left by a run that died (its lock is free) are removed by the next
   run that claims an output in the same folder; a running owner's are never touched.

`@guarded(...)` claims a job's outputs for the length of the call; CheckpointWriter and `output_file` find the
claim of their path (or claim it themselves when called on their own).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .. import distributed
from ..errors import Interrupted, QtoolError
from ..interrupts import deferred
from . import atomic, jsonfile, layout

FOLDER, REPORT, STATS = "checkpoint folder", "report", "statistics file"
TMP_SUFFIX, LOCK_SUFFIX = ".qtool-tmp", ".qtool-lock"
STATS_FORMAT = "qtool-calib-stats"  # metadata format of `qtool calibrate`'s statistics file (calib.stats)

_CLAIMS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qtool_claims", default=None)


@dataclass
class Output:
    """One claimed output: its lock is held until release()."""

    given: str                      # as the caller named it (for messages)
    path: Path                      # real path
    kind: str
    overwrite: bool
    lock: atomic.LockFile
    made_dirs: list[Path] = field(default_factory=list)  # parents this claim created (removed again if empty)
    temps: list[Path] = field(default_factory=list)      # every temporary made: release() removes what is left
    published: bool = False

    def temp(self, folder: bool) -> Path:
        """A fresh private temporary folder or file beside the output, removed by release() if still there."""
        prefix, parent = f".{self.path.name}.", self.path.parent
        try:
            with deferred():  # made and recorded together, so an interrupted run cannot lose track of it
                if folder:
                    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=parent))
                else:
                    fd, name = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=parent)
                    os.close(fd)
                    path = Path(name)
                self.temps.append(path)
        except OSError as e:
            raise QtoolError(parent, f"cannot write here: {e.strerror or e}") from None
        return path

    def publish(self, tmp: Path) -> None:
        """Move the finished `tmp` into place: never over an output that appeared meanwhile unless overwriting,
        and then only over one qtool could have written. Signals wait until it is done."""
        with deferred():
            try:
                os.chmod(tmp, atomic.folder_mode() if tmp.is_dir() else atomic.file_mode())
                if self.overwrite and os.path.lexists(self.path):
                    check_replaceable(self)  # it may have changed since the run began
                    if self._swap(tmp):
                        self.published = True
                        return
                try:
                    atomic.rename_noreplace(tmp, self.path)
                except FileExistsError:
                    remove(tmp)
                    raise QtoolError(self.given, "appeared while this run was writing it; it was left as it was "
                                                 "and nothing was written") from None
            except OSError as e:
                remove(tmp)
                raise QtoolError(self.given, f"cannot move the finished output into place: {e.strerror or e}") from None
            self.published = True

    def _swap(self, tmp: Path) -> bool:
        """Put tmp in place of the existing output and remove the old one; False when the output vanished."""
        try:
            swapped = atomic.exchange(tmp, self.path)
        except FileNotFoundError:
            return False
        if not swapped:  # no atomic exchange here: move the old output aside first
            old = self.temp(folder=os.path.isdir(self.path))
            try:
                os.replace(self.path, old)
            except FileNotFoundError:
                remove(old)
                return False
            atomic.rename_noreplace(tmp, self.path)
            tmp = old
        remove(tmp)  # now the old output
        return True

    def release(self) -> None:
        with deferred():
            for t in self.temps:
                if os.path.lexists(t):
                    remove(t)
            self.lock.release()
            for d in reversed(self.made_dirs):
                try:
                    d.rmdir()  # only while empty: a failed run leaves no folder it made
                except OSError:
                    break


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# -- the rules ----------------------------------------------------------------------------------------------

def _check_name(given: str) -> None:
    last = os.fspath(given).rstrip("/" + os.sep).rsplit("/", 1)[-1].rsplit(os.sep, 1)[-1]
    if last in ("", ".", ".."):
        raise QtoolError(given or "''", "is not a usable output name: name a new file or folder, not '.', '..' or ''")


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if out.is_relative_to(other):
        return "lies inside"
    if other.is_relative_to(out):
        return "contains"
    return None


def check_overlap(given: str, path: Path, inputs: list[tuple[str, Path]], outputs: list["Output"]) -> None:
    for name, real in inputs:
        how = _relation(path, real)
        if how:
            shown = name if Path(os.path.realpath(name)) == real else f"{name} ({real})"
            raise QtoolError(given, f"the output {how} the input {shown}; write it somewhere else")
    for other in outputs:
        how = _relation(path, other.path)
        if how:
            raise QtoolError(given, f"the output {how} the other output {other.given}; give them separate places")


def check_replaceable(out: Output) -> None:
    """Refuse unless `out.path` is what its kind of output looks like (the --overwrite rule)."""
    p, kind = out.path, out.kind
    if kind == FOLDER:
        if not p.is_dir():
            raise QtoolError(out.given, "exists and is not a folder; refusing to replace it")
        bad = layout.foreign_entry(p)
        if bad is not None:
            raise QtoolError(out.given, f"holds {bad!r}, which is not part of a checkpoint; refusing to replace it "
                                        "(--overwrite replaces only a checkpoint folder: weights, index and side files)")
        if any(p.iterdir()) and not layout.holds_weights(p):
            raise QtoolError(out.given, "holds no weights, so it is not a checkpoint folder; refusing to replace it")
        return
    if not p.is_file():
        raise QtoolError(out.given, f"exists and is not a file; refusing to replace it with a {kind}")
    if not (_is_report(p) if kind == REPORT else _is_stats(p)):
        raise QtoolError(out.given, f"exists and is not a qtool {kind}; refusing to replace it")


def _is_report(p: Path) -> bool:
    try:
        return "qtool_version" in jsonfile.read(p)
    except QtoolError:
        return False


def _is_stats(p: Path) -> bool:
    from .safetensors_header import read_header
    try:
        return read_header(p)[1].get("format") == STATS_FORMAT
    except QtoolError:
        return False


# -- leftovers of dead runs ---------------------------------------------------------------------------------

def _owner(entry: str, suffix: str) -> str | None:
    if not (entry.startswith(".") and entry.endswith(suffix)):
        return None
    name = entry[1:-len(suffix)]
    return name.rpartition(".")[0] if suffix == TMP_SUFFIX else name


def remove_stale(parent: Path, own: str) -> None:
    """Remove temporaries and lock files in `parent` whose owner is gone (its lock is free); `own` is the output
    this process holds the lock of, so any temporary of it is a leftover."""
    temps: dict[str, list[Path]] = {}
    locks: set[str] = set()
    with os.scandir(parent) as it:
        for entry in it:
            if (name := _owner(entry.name, TMP_SUFFIX)) is not None:
                temps.setdefault(name, []).append(parent / entry.name)
            elif (name := _owner(entry.name, LOCK_SUFFIX)) is not None and name != own:
                locks.add(name)
    for name in sorted(set(temps) | locks):
        lock = atomic.LockFile(parent / f".{name}{LOCK_SUFFIX}")
        if name != own and lock.path.exists() and not lock.take_stale():
            continue  # its owner is running
        with deferred():
            for t in temps.get(name, []):
                remove(t)
            lock.release()


# -- claiming -----------------------------------------------------------------------------------------------

def claim(given, kind: str, overwrite: bool, inputs: list[tuple[str, Path]] = (), others: list[Output] = ()) -> Output:
    """Check `given` against the rules, lock it, clear dead runs' leftovers beside it; the caller releases."""
    given = os.fspath(given)
    _check_name(given)
    path = Path(os.path.realpath(given))
    check_overlap(given, path, list(inputs), list(others))
    out = None
    try:
        with deferred():  # the folders made and the lock taken are recorded before a signal can stop us
            out = Output(given, path, kind, overwrite, atomic.LockFile(path.parent / f".{path.name}{LOCK_SUFFIX}"))
            out.made_dirs = _make_parents(path.parent)
            if not out.lock.acquire():
                raise QtoolError(given, "another qtool process is writing it right now")
        remove_stale(path.parent, path.name)
        if os.path.lexists(path):
            check_replaceable(out)
            if not overwrite:
                raise QtoolError(given, "already exists; pass --overwrite to replace it")
    except OSError as e:
        if out is not None:
            out.release()
        raise QtoolError(path.parent, f"cannot write here: {e.strerror or e}") from None
    except BaseException:
        if out is not None:
            out.release()
        raise
    return out


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing folders above an output (`-o out/model-int4` on a fresh checkout); the created ones."""
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir() or any(m.exists() and not m.is_dir() for m in missing):
        raise QtoolError(p, "is not a folder")
    try:
        for m in reversed(missing):
            m.mkdir(exist_ok=True)
    except OSError as e:
        raise QtoolError(m, f"cannot create the output folder: {e.strerror or e}") from None
    return list(reversed(missing))


def input_paths(values, revision: str | None = None) -> list[tuple[str, Path]]:
    """(as named, real path) of every input: files and folders, a folder's linked entries (a hub snapshot links
    its files into the cache's blobs), hub ids resolved from the local cache. Unresolvable ones are skipped:
    the job reports them when it opens them."""
    from .hub import resolve_cached
    from .reader import looks_like_hub_id
    out: list[tuple[str, Path]] = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out += input_paths(v, revision)
            continue
        name, p = os.fspath(v), Path(v)
        if not p.exists() and isinstance(v, str) and looks_like_hub_id(v):
            p = next((q for q in _cached(resolve_cached, v, revision)), p)
        if not p.exists():
            continue
        real = Path(os.path.realpath(p))
        out.append((name, real))
        if real.is_dir():
            with os.scandir(real) as it:
                out += [(name, Path(os.path.realpath(e.path))) for e in it if e.is_symlink()]
    return out


def _cached(resolve, hub_id: str, revision: str | None) -> Iterator[Path]:
    for rev in dict.fromkeys((revision, None)):
        try:
            yield resolve(hub_id, rev)
        except QtoolError:
            continue


@contextmanager
def claimed(inputs: list, outputs: list[tuple[object, str]], overwrite: bool, revision: str | None = None):
    """Claim `outputs` ((path or None, kind) pairs) against `inputs` for the length of the block."""
    held: list[Output] = []
    claims = dict(_CLAIMS.get() or {})
    token = None
    try:
        ins = input_paths(inputs, revision)
        for given, kind in outputs:
            if given is not None:
                held.append(claim(given, kind, overwrite, ins, held))
                claims[held[-1].path] = held[-1]
        token = _CLAIMS.set(claims)
        yield held
    except Interrupted as e:
        done = {o.given for o in held if o.published}
        named = [os.fspath(g) for g, _ in outputs if g is not None]
        e.outputs = e.outputs or [(n, n in done) for n in named]
        raise
    finally:
        if token is not None:
            _CLAIMS.reset(token)
        for o in reversed(held):
            o.release()


def guarded(inputs: tuple[str, ...], outputs: dict[str, str]):
    """Decorate a job: before it runs, claim the outputs named by `outputs` (parameter -> kind) against the
    inputs named by `inputs`, using its `overwrite` (and `revision`) parameters; release them when it returns.
    Under torchrun only rank 0 claims (and writes) outputs."""
    def wrap(fn):
        sig = inspect.signature(fn)
        missing = [n for n in (*inputs, *outputs, "overwrite") if n not in sig.parameters]
        if missing:
            raise TypeError(f"{fn.__name__} has no parameter {missing[0]!r} to guard")

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            # under torchrun rank 0 alone writes: the other processes claim nothing and write nothing
            claims = [(a[n], kind) for n, kind in outputs.items()] if distributed.env_rank() == 0 else []
            with claimed([a[n] for n in inputs], claims, bool(a["overwrite"]), a.get("revision")):
                return fn(*args, **kwargs)
        return run
    return wrap


@contextmanager
def output(given, kind: str, overwrite: bool = False) -> Iterator[Output]:
    """The claim of `given` made by the job (found by real path), or a claim for the length of the block."""
    found = (_CLAIMS.get() or {}).get(Path(os.path.realpath(os.fspath(given))))
    if found is not None:
        yield found
        return
    own = claim(given, kind, overwrite)
    try:
        yield own
    finally:
        own.release()


@contextmanager
def output_file(given, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Write a file atomically: the block fills the yielded temporary path, which moves into place (synced to disk
    first) only when the block ends cleanly; otherwise no file is left."""
    with output(given, kind, overwrite) as out:
        tmp = out.temp(folder=False)
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # a full disk shows here at the latest, before anything is in place
            out.publish(tmp)
        except BaseException:
            with deferred():
                remove(tmp)
            raise
