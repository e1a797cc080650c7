"""The operating system's primitives for writing outputs safely: renames that never replace by accident, advisory
locks that die with their owner, and the permissions the user's umask asks for.

- `rename_noreplace(src, dst)`: atomic, fails with FileExistsError when dst exists (Linux renameat2
  RENAME_NOREPLACE, macOS renamex_np RENAME_EXCL, Windows' rename; elsewhere a hard link for files and, for
  folders, a check just before rename(2), which replaces at most an empty folder).
- `exchange(a, b)`: swap two paths atomically (RENAME_EXCHANGE / RENAME_SWAP); False where the system cannot.
- `LockFile`: an exclusive advisory lock (flock) on a small file; the kernel drops it when its owner dies, so
  a free lock means nobody is writing, and a lock file whose lock can be taken is stale.
"""
from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_AT_FDCWD = -100
_LINUX_NOREPLACE, _LINUX_EXCHANGE = 1, 2
_MAC_SWAP, _MAC_EXCL = 0x2, 0x4
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "riscv64": 276, "ppc64le": 357, "s390x": 347}
_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP))


def _libc_rename():
    """(call(src, dst, flags) -> errno or 0, noreplace flag, exchange flag), or None where neither call exists."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            call = lambda s, d, f: fn(_AT_FDCWD, s, _AT_FDCWD, d, f)  # noqa: E731
        else:
            nr = _RENAMEAT2_SYSCALL.get(os.uname().machine)
            if nr is None:
                return None
            call = lambda s, d, f: libc.syscall(nr, _AT_FDCWD, s, _AT_FDCWD, d, ctypes.c_uint(f))  # noqa: E731
        return call, _LINUX_NOREPLACE, _LINUX_EXCHANGE
    if sys.platform == "darwin":
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "renamex_np", None)
        if fn is None:
            return None
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return (lambda s, d, f: fn(s, d, f)), _MAC_EXCL, _MAC_SWAP
    return None


_RENAME = _libc_rename()


def _flagged_rename(src, dst, which: int) -> bool:
    """Run the flagged rename; True when it ran, False where this system or filesystem has no such rename."""
    if _RENAME is None:
        return False
    call, flags = _RENAME[0], _RENAME[which]
    if call(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), os.fspath(dst))


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move src to dst atomically; FileExistsError (nothing moved) when dst exists."""
    if _flagged_rename(src, dst, 1):
        return
    if os.name == "nt":
        os.rename(src, dst)  # Windows' rename never replaces
        return
    if os.path.isdir(src):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
        os.rename(src, dst)  # POSIX replaces a directory only when it is empty: nothing can be lost
        return
    try:
        os.link(src, dst)  # atomic and never replaces
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap a and b atomically (both must exist); False where the system or filesystem cannot."""
    return _flagged_rename(a, b, 2)


# -- permissions --------------------------------------------------------------------------------------------

def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def folder_mode() -> int:
    return 0o777 & ~umask()


def file_mode() -> int:
    return 0o666 & ~umask()


# -- advisory locks -----------------------------------------------------------------------------------------

class LockFile:
    """An exclusive lock on `path`, held from `acquire()` (or `take_stale()`) until `release()`, which removes the
    file. The kernel drops the lock when its owner dies, so a lock file anyone can lock is a leftover."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> bool:
        """Create and lock the file; False (nothing held) when another process holds it."""
        return self._lock(create=True)

    def take_stale(self) -> bool:
        """Lock an existing file whose owner is gone; False when it is missing or its owner still runs."""
        return self._lock(create=False)

    def _lock(self, create: bool) -> bool:
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT if create else 0)
        while True:
            try:
                fd = os.open(self.path, flags, file_mode())
            except FileNotFoundError:
                if create:
                    raise
                return False
            if not _try_lock(fd):
                os.close(fd)
                return False
            # The file we locked may have been removed (and maybe re-created) by its previous owner between our
            # open and our lock: only the file still at `path` counts.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                if create:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())  # for people looking; the lock is what counts
                return True
            os.close(fd)
            if not create:
                return False

    def release(self) -> None:
        """Remove the file, then drop the lock (in that order, so no one locks a file about to vanish)."""
        if self.fd is None:
            return
        if os.name == "nt":  # an open file cannot be removed there
            os.close(self.fd)
        try:
            os.unlink(self.path)
        except OSError:
            pass
        if os.name != "nt":
            os.close(self.fd)
        self.fd = None


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
    import msvcrt
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False
