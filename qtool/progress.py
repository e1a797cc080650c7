"""Progress bars on a terminal, silence everywhere else (logs of batch jobs stay clean)."""
from __future__ import annotations

import sys


class NullProgress:
    """Accepts progress updates and shows nothing."""

    def start(self, description: str, total: float | None) -> None:
        pass

    def advance(self, amount: float = 1, description: str | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RichProgress(NullProgress):
    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=sys.stderr),
                             transient=True)
        self._bar.start()
        self._task = None

    def start(self, description: str, total: float | None) -> None:
        if self._task is not None:
            self._bar.remove_task(self._task)
        self._task = self._bar.add_task(description, total=total)

    def advance(self, amount: float = 1, description: str | None = None) -> None:
        if self._task is not None:
            self._bar.update(self._task, advance=amount, **({"description": description} if description else {}))

    def close(self) -> None:
        self._bar.stop()


def make_progress(quiet: bool = False):
    """A rich bar when stderr is a terminal and not quiet; otherwise nothing at all (and nothing on the processes
    of a torchrun run but rank 0)."""
    from .distributed import env_rank
    if quiet or not sys.stderr.isatty() or env_rank() != 0:
        return NullProgress()
    return RichProgress()
