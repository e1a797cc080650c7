"""Errors a user can cause, and the exit codes they map to.

Every failure that bad input can cause is a `QtoolError`: the CLI prints
`error: <path>: <problem>` on one line and exits with `exit_code`, never a traceback.
"""
from __future__ import annotations

import os

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_GATE = 3


class QtoolError(Exception):
    """A run-time or input error tied to a path (a file, folder, tensor name or hub id)."""

    exit_code = EXIT_ERROR

    def __init__(self, path: object, problem: str):
        self.path = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def restate(self, path: str, problem: str) -> None:
        """Say the same thing in other words (the Python API names arguments where the CLI names options)."""
        self.path, self.problem = path, problem
        self.args = (f"{path}: {problem}",)


class ArgumentError(QtoolError, ValueError):
    """A bad argument value (`path` names the argument): a usage error, exit 2 on the command line."""

    exit_code = EXIT_USAGE


class GateFailed(QtoolError):
    """A quality gate failed; the output and report were still written."""

    exit_code = EXIT_GATE


class Interrupted(BaseException):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped the run: exit 128 + its number, like a shell reports it.

    A BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way out can swallow it.
    `outputs` is filled on the way out: (output as named, whether it was already in place)."""

    def __init__(self, signum: int):
        import signal
        self.signum = signum
        self.exit_code = 128 + signum
        self.name = signal.Signals(signum).name
        self.outputs: list[tuple[str, bool]] = []
        super().__init__(f"interrupted by {self.name}")

    def message(self) -> str:
        if not self.outputs:
            return f"interrupted by {self.name}"
        first = self.outputs[0][0]
        done = [name for name, written in self.outputs if written]
        if not done:
            return f"{first}: interrupted by {self.name}; nothing was written or replaced"
        return f"{first}: interrupted by {self.name} after {', '.join(done)} was written; the rest was not"
