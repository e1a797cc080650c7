"""Small pieces every pipeline shares: prefetching reads, work on worker threads in order, copying side files."""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator

import torch

from ..checkpoint import Checkpoint, CheckpointWriter
from ..interrupts import deferred

PREFETCH_BYTES = 64 * 2**20  # read ahead at most this much (beyond one tensor) while the current one is processed


def prefetch(read, names: Iterable[str], sizes: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, read(name)) in order, reading the next tensors on a thread while the caller works."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qtool-read") as pool:
        pending: deque = deque()
        ahead = 0
        it = iter(names)
        exhausted = False
        while True:
            # Keep at least one read in flight, more while they fit the read-ahead budget.
            while not exhausted and (not pending or ahead < PREFETCH_BYTES):
                name = next(it, None)
                if name is None:
                    exhausted = True
                    break
                with deferred():  # (see _waited): submit() takes the pool's locks
                    pending.append((name, pool.submit(read, name)))
                ahead += sizes.get(name, 0)
            if not pending:
                return
            name, fut = pending.popleft()
            ahead -= sizes.get(name, 0)
            with deferred():  # a signal raised inside a lock-taking wait could leave that lock held (see _waited)
                value = fut.result()
            yield name, value


def ordered_map(fn: Callable, items: Iterable[tuple], workers: int) -> Iterator:
    """fn(*item) for each item on `workers` threads, results in input order, at most workers+1 in flight."""
    if workers <= 1:
        for item in items:
            yield fn(*item)
        return
    # A new thread starts with the process's default intra-op thread count (OpenMP's is per thread), not with what
    # the job's runtime session set here: without this each worker's BLAS calls would fan out over every core again.
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="qtool-work", initializer=torch.set_num_threads,
                            initargs=(threads,)) as pool:
        pending: deque = deque()
        for item in items:
            with deferred():  # (see _waited)
                pending.append(pool.submit(fn, *item))
            if len(pending) > workers:
                yield _waited(pending.popleft())
        while pending:
            yield _waited(pending.popleft())


def _waited(fut):
    """fut.result() with signals deferred to its end: Python may run a signal handler between a `with lock:`'s
    acquire and its protected block, so Interrupted raised there would leave the future's lock held and the
    worker that completes it (and the pool's shutdown after it) waiting forever."""
    with deferred():
        return fut.result()


def folder_bytes(folder) -> int:
    """Bytes of every file under `folder` (what a checkpoint weighs on disk, index and side files included)."""
    from pathlib import Path
    return sum(f.stat().st_size for f in sorted(Path(folder).rglob("*")) if f.is_file())


def copy_side_files(ckpt: Checkpoint, writer: CheckpointWriter, replace: dict | None = None) -> list[str]:
    """Copy the source's side files (checkpoint.layout: config, tokenizer, generation config, ...) beside the output,
    byte for byte; a file named in `replace` is written as that JSON instead, or, where its value is None, left to
    the caller, who writes it. Returns every side file carried into the output, the rewritten ones included (the
    report's `copied_files`)."""
    replace = replace or {}
    carried = []
    for p in ckpt.extra_files():
        rel = p.relative_to(ckpt.root).as_posix()
        if rel not in replace:
            writer.copy_file(p, rel)
        elif replace[rel] is not None:
            writer.write_json(rel, replace[rel])
        carried.append(rel)
    return carried


class Discard:
    """The writer of the processes of a torchrun run other than rank 0, which compute their share and write
    nothing: the CheckpointWriter calls a job makes, doing nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def plan(self, *args, **kwargs) -> None:
        pass

    def write(self, name: str, tensor) -> None:
        pass

    def copy_file(self, src, name=None) -> None:
        pass

    def write_json(self, name: str, obj) -> None:
        pass
