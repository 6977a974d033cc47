"""One writer at a time per feature set, caption set and run directory (filelock).

Locks live in `CACHE/.locks/` (or beside a run directory), so listings of the sets never
see them. A lock held by another process is never taken for a crash: the second process
hears "another process is writing NAME" instead of touching the other's files.
"""

from __future__ import annotations

import contextlib
import errno
from pathlib import Path

from filelock import FileLock, Timeout

from msa.core.errors import BusyError, CacheError

LOCK_DIR = ".locks"


def lock_path(cache: Path, name: str) -> Path:
    return Path(cache) / LOCK_DIR / f"{name}.lock"


NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def not_writable(path: Path, err: OSError) -> CacheError:
    return CacheError(f"{Path(path).parent}: not writable ({err.strerror}); msa writes its locks and results "
                      "there, so give write access or copy the cache elsewhere (reading works as it is)")


@contextlib.contextmanager
def writable_here(path: Path):
    """A lock file that cannot be made (a read-only cache) is a one-line error, not a traceback."""
    try:
        yield
    except OSError as err:
        if err.errno in NOT_WRITABLE:
            raise not_writable(path, err) from None
        raise


def acquire(path: Path, what: str, timeout: float = 0) -> FileLock:
    """Hold the lock at `path` now (or within `timeout` seconds, -1: wait), or raise BusyError
    naming `what`; release with .release()."""
    with writable_here(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            raise BusyError(f"another process is writing {what}; wait for it to finish") from None
    return lock


@contextlib.contextmanager
def held(path: Path, what: str, timeout: float = -1):
    """The lock at `path` for the length of a with block (waiting for it by default)."""
    lock = acquire(path, what, timeout)
    try:
        yield lock
    finally:
        lock.release()


def set_lock(cache: Path, name: str) -> FileLock:
    """The exclusive lock of one feature or caption set."""
    return acquire(lock_path(cache, name), name)


def is_busy(cache: Path, name: str) -> bool:
    """True while another process holds the set's lock."""
    path = lock_path(cache, name)
    if not path.exists():
        return False
    try:
        acquire(path, name).release()
    except BusyError:
        return True
    except CacheError:  # a read-only cache: nobody can be writing in it
        return False
    return False
