"""The cache's errors: each message names the file and what to do about it."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# errno values that mean "no room": a full disk, a quota, a file size limit (ulimit -f).
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CacheError(RuntimeError):
    """A cache problem that the user can fix; the message names the file and the fix."""


class BusyError(CacheError):
    """Another process holds the lock of a set or a run directory."""


class WriteError(CacheError):
    """Writing failed (a full disk, a quota, an I/O error); nothing was published."""


def free_bytes(path: Path) -> int:
    """Bytes free on the disk holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def free_space(path: Path) -> str:
    """'123.4 MB free' on the disk holding `path`, for messages."""
    try:
        return f"{free_bytes(path) / 2**20:.1f} MB free"
    except OSError:
        return "free space unknown"


def write_error(path: Path, err: BaseException) -> WriteError:
    """A one-line WriteError for a failed write to `path`, with the free space left there."""
    detail = str(err).split("\n")[0].strip() or type(err).__name__
    code = err.errno if isinstance(err, OSError) else None
    if code == errno.EFBIG or "errno = 27" in str(err):
        detail = "the file reached the size limit (ulimit -f, or the file system's largest file)"
    elif code in NO_ROOM or "errno = 28" in str(err) or "errno = 122" in str(err):
        detail = f"no room to write ({free_space(path)})"
    return WriteError(f"{path}: write failed: {detail}; nothing was published, rerun when there is room")
