"""A new run is built beside ``--out`` and moved into place whole, or not at all.

    python -c "from diralign.rundir.staging import Staging; help(Staging)"

:meth:`Staging.begin` makes a hidden sibling ``.NAME.diralign-new-PID-XXXX`` of ``--out``
(and, for ``--force``, takes the lock of the run it will replace, so a live run is never
replaced); the writer sets the new run up there; :meth:`Staging.finish` moves it into place:

- ``--out`` absent or empty: one ``rename`` (which refuses a directory another run filled
  in the meantime);
- ``--force``: the two directories are exchanged atomically (Linux ``renameat2``
  ``RENAME_EXCHANGE``; two renames where the file system cannot), then the old run is
  deleted while its lock is still held, so no process sees ``--out`` missing or half-made;
- ``--out`` a mount point (a container's volume), which cannot be renamed: the run is staged
  inside it and moved up file by file, ``config.json`` last, the old run's files deleted
  only then.

:meth:`Staging.discard` removes the sibling: a failure before ``finish`` leaves ``--out``
exactly as it was.  A SIGKILL during set-up leaves the hidden sibling (and nothing else).
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Optional

from . import schema
from .disk import fsync_dir
from .lock import RunBusy, RunLock, busy_message, holder_pid

TAG = ".diralign-new-"


class Staging:
    def __init__(self, final: Path, stage: Path, in_place: bool, replaced: Optional[RunLock]):
        self.final = final
        self.stage = stage
        self.in_place = in_place
        self.replaced = replaced  # the lock of the run --force replaces, held until finish/discard

    @classmethod
    def begin(cls, final, replace: bool) -> Staging:
        final = Path(final)
        replaced = RunLock.acquire(final) if replace else None  # refuses to replace a run being written
        in_place = final.is_dir() and os.path.ismount(final)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            stage = (final if in_place else final.parent) / f".{final.name}{TAG}{os.getpid()}-{secrets.token_hex(3)}"
            stage.mkdir()
        except BaseException:
            if replaced is not None:
                replaced.release()
            raise
        return cls(final, stage, in_place, replaced)

    def finish(self, lock: RunLock) -> RunLock:
        """Move the staged run (guarded by ``lock``) into place; returns the lock that guards it there."""
        if self.in_place:
            lock = self._move_up(lock)
        elif self.replaced is not None:
            _swap(self.stage, self.final)  # the stage path now holds the old run
            shutil.rmtree(self.stage, ignore_errors=True)
            self.replaced.release()
            self.replaced = None
        else:
            try:
                os.rename(self.stage, self.final)  # replaces an empty directory; never a full one
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise RunBusy(
                    f"--out {self.final} was filled by another run while this one was set up "
                    f"({busy_message(self.final, holder_pid(self.final))})"
                ) from None
        lock.moved_to(self.final)
        fsync_dir(self.final.parent)
        return lock

    def _move_up(self, lock: RunLock) -> RunLock:
        # Not atomic: so the old run's files go only now, after the new run's set-up succeeded,
        # and config.json comes last (a directory without it is not taken for a run).
        if self.replaced is not None:
            for entry in self.final.iterdir():
                if entry != self.stage and entry.name != schema.LOCK:  # the old lock, held, guards the new run
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            (self.stage / schema.LOCK).unlink()
            lock.release()
            lock, self.replaced = self.replaced, None
        for entry in sorted(self.stage.iterdir(), key=lambda e: e.name == schema.CONFIG):
            os.rename(entry, self.final / entry.name)  # the lock file too: the flock goes with its inode
        self.stage.rmdir()
        return lock

    def discard(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
        if self.replaced is not None:
            self.replaced.release()
            self.replaced = None


def _swap(a: Path, b: Path) -> None:
    """Exchange two directories, atomically where the kernel can."""
    if _rename_exchange(a, b):
        return
    aside = b.with_name(f".{b.name}.diralign-old-{os.getpid()}-{secrets.token_hex(3)}")
    os.rename(b, aside)
    try:
        os.rename(a, b)
    except OSError:
        try:
            os.rename(aside, b)
        except OSError:  # another run took `b` in the gap: keep the old one where it is, say so
            raise RunBusy(
                f"--out {b} was taken by another run during the swap; the old run is kept in {aside}"
            ) from None
        raise
    os.rename(aside, a)


def _rename_exchange(a: Path, b: Path) -> bool:
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False  # no such call, or a file system that cannot exchange: two renames instead
    raise OSError(code, os.strerror(code), str(b))
