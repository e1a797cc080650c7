"""SIGINT, SIGTERM and SIGHUP stop a command cleanly: the signal becomes `Interrupted` in the main thread, which
unwinds the job like any error (temporary outputs removed, an existing OUT kept), and the CLI exits 128 + signum.

Steps that must not be cut in half (moving an output into place, removing a temporary folder) run `deferred()`:
a signal arriving then is raised when the step ends. After the first signal, later ones are ignored so that the
cleanup they would interrupt runs to its end.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from .errors import Interrupted

SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

_depth = 0            # deferred() blocks open (main thread only)
_pending = None       # a signal that arrived inside one
_raised = False       # Interrupted was raised in this run: later signals are ignored


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _handler(signum, frame):
    global _pending, _raised
    if _raised:
        return
    if _depth:
        _pending = _pending or signum
        return
    _raised = True
    raise Interrupted(signum)


@contextmanager
def stop_on_signals():
    """Within the block, the signals raise Interrupted in the main thread (a no-op in other threads)."""
    global _pending, _raised
    if not _main_thread():
        yield
        return
    _pending, _raised = None, False
    old = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def deferred():
    """A signal arriving inside the block is raised when it ends."""
    global _depth, _pending, _raised
    if not _main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None and not _raised:
            signum, _pending = _pending, None
            _raised = True
            raise Interrupted(signum)
