"""Writing files that survive a crash, and turning the disk's refusals into one clear line.

    python -c "from diralign.rundir.disk import reason; print(reason(OSError(28, 'No space left on device')))"

Every byte of a run directory goes through here or through an append-only log: a file is
written whole to a temporary name beside it, fsynced, and renamed over the old one (so a
reader, or a crash, sees the old file or the new one, never half of either).  A full disk,
a read-only file system, a file-size limit or missing permissions are not bugs: they are
:class:`DiskError` (a :class:`~diralign.errors.UserError`: one line, exit status 2) naming
the file, what the disk said, and what is still intact.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file-size limit was reached (ulimit -f)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (read-only or immutable)",
    errno.ENOTDIR: "a component of the path is a file, not a directory",
    errno.EISDIR: "it is a directory",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EMFILE: "too many open files (ulimit -n)",
    errno.EIO: "an input/output error (a failing disk?)",
}
# What the environment, not diralign, got wrong: these are one line, never a traceback.
DISK_ERRNOS = frozenset(_REASONS)


class DiskError(UserError):
    """The disk refused a read or write of the run directory."""


def reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno, exc.strerror or type(exc).__name__)


@contextmanager
def disk_errors(what: str, intact: str):
    """Inside: an ``OSError`` of the environment becomes a :class:`DiskError` saying ``what``
    could not be done, why, and ``intact`` (what the user still has, and how to go on)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS and exc.errno != errno.ENOENT:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise DiskError(f"cannot {what}{where}: {reason(exc)}; {intact}") from None


def check_writable(directory: Path, what: str, intact: str) -> None:
    """Fail now, in one line, if files cannot be created in ``directory`` (made if missing),
    rather than after minutes of work whose output could not be kept."""
    import tempfile

    with disk_errors(what, intact):
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".diralign-probe-")
        os.close(fd)
        os.unlink(probe)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort: some file systems cannot)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """``path`` holds ``data`` or its old content, never a mix; the temporary file goes on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)
