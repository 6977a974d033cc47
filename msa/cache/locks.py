"""One writer at a time per feature set, caption set and run directory (filelock).

Locks live in `CACHE/.locks/` (or beside a run directory), so listings of the sets never
see them. A lock held by another process is never taken for a crash: the second process
hears "another process is writing NAME" instead of touching the other's files.
"""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout

from msa.cache.errors import BusyError

LOCK_DIR = ".locks"


def lock_path(cache: Path, name: str) -> Path:
    return Path(cache) / LOCK_DIR / f"{name}.lock"


def acquire(path: Path, what: str) -> FileLock:
    """Hold the lock at `path` now, or raise BusyError naming `what`; release with .release()."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise BusyError(f"another process is writing {what}; wait for it to finish") from None
    return lock


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
    return False
