"""Data-parallel runs under torchrun: the process group, who does which share, and the collectives qtool uses.

`torchrun --nproc-per-node N -m qtool ...` starts N copies of the command with WORLD_SIZE, RANK and LOCAL_RANK in
their environment; without them (or with WORLD_SIZE 1) every call here is a no-op on one process and nothing
changes. A job joins the group when it enters `runtime.session` (NCCL when each process has its own CUDA device,
picked by LOCAL_RANK; gloo otherwise) and leaves it when the session ends.

The rules every job follows (README "Several processes"):
- calibration windows are split by index into N contiguous shares (`Group.share`), the same for the same N;
- statistics are summed (max for max|x|) onto one owner process per record, owners chosen by `owners()` from the
  records' sizes only, so every process computes the same assignment; torch.distributed's reduce runs in a fixed
  order for a fixed N (gloo and NCCL alike), so the same command with the same N gives the same bytes;
- the owner computes and broadcasts; rank 0 alone writes outputs and reports, the others print nothing but errors;
- a collective that fails because another process died or failed ends this process with one error line.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import QtoolError

RUN = "torchrun"  # what error lines name as the failing path


def world_size() -> int:
    """Processes in this run, from torchrun's environment (1 without it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise QtoolError("WORLD_SIZE", f"is {os.environ['WORLD_SIZE']!r}, not a number of processes") from None


def env_rank() -> int:
    """This process's rank from the environment (0 without torchrun): known before the group is joined, so the
    command line can silence the other ranks and the output guard can leave OUT to rank 0."""
    return int(os.environ.get("RANK", "0")) if world_size() > 1 else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0


@dataclass(frozen=True)
class Group:
    """This process's place in the run: `rank` of `world`; `device` is where collectives move tensors."""

    rank: int = 0
    world: int = 1
    backend: str = ""
    device: object = None  # NCCL: this process's CUDA device (collectives move tensors there)

    @property
    def root(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def share(self, n: int, what: str = "calibration windows", rank: int | None = None) -> range:
        """The indices of n items this process (or `rank`) takes: the rank-th of N contiguous, near-equal slices."""
        if self.parallel and n < self.world:
            raise QtoolError(RUN, f"{n} {what} cannot be shared by {self.world} processes; use more, or fewer processes")
        r = self.rank if rank is None else rank
        return range(r * n // self.world, (r + 1) * n // self.world)

    def holder(self, i: int, n: int) -> int:
        """The process whose share of n items holds item i."""
        return next(r for r in range(self.world) if i in self.share(n, rank=r))

    # -- collectives (no-ops on one process) --------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QtoolError:
            raise
        except Exception as e:  # a peer died (connection closed) or failed: one line, no traceback
            why = " ".join(str(e).split())[:160]
            raise QtoolError(RUN, f"process {self.rank} of {self.world}: {what} failed, another process of the run "
                                  f"stopped ({type(e).__name__}: {why})") from None

    def _moved(self, t):
        """The tensor a collective can take: gloo moves CPU tensors, NCCL the process's CUDA tensors."""
        if self.backend == "nccl":
            return t if t.device.type == "cuda" else t.to(self.device)
        return t if t.device.type == "cpu" else t.to("cpu")

    def reduce(self, t, dst: int, op: str = "sum") -> None:
        """t summed (or maxed) over the processes, in place on `dst` (the others' t is left unspecified)."""
        if not self.parallel:
            return
        import torch.distributed as dist
        m = self._moved(t)
        self._call("a reduction", dist.reduce, m, dst, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if m is not t and self.rank == dst:
            t.copy_(m)

    def all_sum(self, t) -> None:
        """t summed over the processes, in place on every one."""
        if not self.parallel:
            return
        import torch.distributed as dist
        m = self._moved(t)
        self._call("a reduction", dist.all_reduce, m, op=dist.ReduceOp.SUM)
        if m is not t:
            t.copy_(m)

    def broadcast_object(self, obj, src: int):
        """`obj` of process `src` on every process (pickled: tensors in it travel on the CPU)."""
        if not self.parallel:
            return obj
        import torch.distributed as dist
        box = [obj if self.rank == src else None]
        self._call("a broadcast", dist.broadcast_object_list, box, src=src)
        return box[0]

    def to_root(self, obj, src: int):
        """`obj` of process `src` on rank 0 (None elsewhere): a point-to-point send of the pickled object."""
        if not self.parallel or src == 0:
            return obj if self.root else None
        import torch.distributed as dist
        if self.rank == src:
            self._call("a send", dist.send_object_list, [obj], dst=0)
            return None
        if not self.root:
            return None
        box = [None]
        self._call("a receive", dist.recv_object_list, box, src=src)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every process's `obj` on rank 0, in rank order (None elsewhere): one point-to-point send per process."""
        got = [self.to_root(obj, src) for src in range(self.world)]
        return got if self.root else None

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist
            self._call("a barrier", dist.barrier)


SINGLE = Group()


def owners(costs: list[float], world: int) -> list[int]:
    """An owner process for each item, balancing the summed cost: items by decreasing cost (index breaks ties)
    each go to the process with the least cost so far (the lowest rank on a tie). The same costs give the same
    owners on every process."""
    load = [0.0] * world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def device_for(device):
    """The device of this process in a run: `cuda`/`auto` name the process's own GPU (LOCAL_RANK) when there is
    one per local process; anything else is kept."""
    import torch
    if world_size() == 1 or device.type != "cuda" or device.index not in (None, 0):
        return device
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.device_count() >= local:
        return torch.device("cuda", local_rank())
    return device


_joined: Group | None = None


def join(device) -> Group:
    """Join torchrun's process group (once per process): NCCL when this process has its own CUDA device, else gloo."""
    global _joined
    if world_size() == 1:
        return SINGLE
    if _joined is not None:
        return _joined
    import torch
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nccl = device.type == "cuda" and dist.is_nccl_available() and torch.cuda.device_count() >= local
    backend = "nccl" if nccl else "gloo"
    if nccl:
        torch.cuda.set_device(device)
    try:
        if not dist.is_initialized():
            dist.init_process_group(backend, **({"device_id": device} if nccl else {}))
    except Exception as e:
        raise QtoolError(RUN, f"cannot join the process group ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    _joined = Group(dist.get_rank(), dist.get_world_size(), backend, device if nccl else None)
    import atexit
    atexit.register(leave)
    return _joined


def leave() -> None:
    """Leave the process group (end of the process's job)."""
    global _joined
    if _joined is not None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        _joined = None
