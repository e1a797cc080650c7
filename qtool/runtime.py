"""Process-wide run-time settings, in one place: where the math runs, how many tensors are worked on at once and
with how many threads each, TF32, the allocator, the garbage collector, OpenBLAS and the native-kernel switch.

A job enters them explicitly, `with runtime.session(device, parallel=...) as rt:` and reads `rt.device` and
`rt.workers`; the settings are restored when it leaves. What must happen before torch is first imported (OpenBLAS's
thread count) the command line does first, with `prepare_process()`. torch is imported inside the functions that
need it, so the command line can import this module before any command has paid for torch.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import re
from dataclasses import dataclass

from .errors import QtoolError

# Read once, at start-up: QTOOL_NATIVE=0 keeps qtool's C kernels off for the whole process (qtool.quant.backend).
NATIVE = os.environ.get("QTOOL_NATIVE", "1") != "0"
MAX_WORKERS = 4  # tensors transformed at once; each holds one tensor and its outputs
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def prepare_process() -> None:
    """This process runs no numpy BLAS (torch does the math): OpenBLAS's worker threads would only spin on the
    cores the job needs. Must run before numpy is first imported (torch imports it); the user's choice wins."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def resolve_device(name="auto"):
    """`auto`, `cpu`, `cuda` or `cuda:i` as a torch.device. Asking for cuda where there is none is an error, never a
    silent fallback to cpu."""
    import torch
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = _CUDA.match(name)
    if m is None:
        raise QtoolError("--device", f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise QtoolError("--device", f"{name} was asked for but torch sees no cuda device (torch {torch.__version__})")
    index = int(m.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise QtoolError("--device", f"{name} was asked for but only {count} cuda device(s) exist")
    return torch.device("cuda", index)


def workers_for(device) -> int:
    """Tensors to process side by side: one per core on cpu (each op single-threaded: small ops split over
    threads spend more time synchronising than computing), one on a GPU (its kernels are parallel already)."""
    import torch
    return 1 if device.type != "cpu" else max(1, min(MAX_WORKERS, torch.get_num_threads()))


@contextlib.contextmanager
def threads_per_worker(workers: int):
    """Share torch's intra-op threads among `workers` tensors processed at once; restore afterwards."""
    import torch
    total = torch.get_num_threads()
    torch.set_num_threads(max(1, total // workers))
    try:
        yield
    finally:
        torch.set_num_threads(total)


@functools.lru_cache(maxsize=None)
def fast_bfloat16(device) -> bool:
    """Whether bfloat16 matrix products run several times faster than float32 on `device`: a CUDA device with
    bfloat16, or a CPU with AMX tiles (8.6x here; AVX-512's bfloat16 dot products give about 2x, not worth a
    second pass). Decides how qtool.quant.awq.search ranks its grid: the same choice unless more than three
    candidates are within 1e-3 of each other."""
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return device.type == "cpu" and probe is not None and bool(probe())


@contextlib.contextmanager
def exact_matmul(device):
    """TF32 off while Hessians, GPTQ updates and calibration forwards run: TF32's 10-bit mantissa would change
    results by device."""
    if device.type != "cuda":
        yield
        return
    import torch
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def frozen_gc():
    """Everything imported and built so far (torch: hundreds of thousands of objects) lives for the whole job: take
    it out of the garbage collector's walks, which otherwise cost ~10% of a job's CPU time. Undone on exit, so a
    caller in the same process gets its collector back."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _libc_malloc_trim():
    try:
        import ctypes
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_host_memory() -> None:
    """Hand freed heap pages back to the OS after a block: glibc keeps them otherwise, and a walk that frees a
    layer's Hessians and weights each block would see its resident memory creep up layer after layer."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class Runtime:
    device: object  # torch.device
    workers: int    # tensors worked on at once (each with an equal share of torch's threads)
    group: object = None  # distributed.Group: this process's place in a torchrun run (one process: SINGLE)


@contextlib.contextmanager
def session(device="auto", *, parallel: bool = True):
    """The settings of one job: its device resolved, torch's threads shared among `workers` (one per core on cpu
    when `parallel`, else one worker with every thread), TF32 off, the garbage collector frozen. Under torchrun
    the process joins the run's group (qtool.distributed), on its own GPU where each process has one."""
    from . import distributed
    dev = distributed.device_for(resolve_device(device))
    group = distributed.join(dev)
    workers = workers_for(dev) if parallel else 1
    with frozen_gc(), threads_per_worker(workers), exact_matmul(dev):
        yield Runtime(dev, workers, group)
