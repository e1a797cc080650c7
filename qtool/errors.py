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


class GateFailed(QtoolError):
    """A quality gate failed; the output and report were still written."""

    exit_code = EXIT_GATE
