"""One writer per run directory: an exclusive OS lock, held for the whole run or resume.

    python -c "from diralign.rundir.lock import holder_pid; print(holder_pid('runs/dl'))"

The lock is ``flock`` on ``DIR/.diralign.lock`` (:data:`~diralign.rundir.schema.LOCK`): the
kernel releases it when the holder's last descriptor closes, so a killed run never leaves a
stale lock behind, and there is nothing to clean up.  A refused second writer names the
holder's PID, read from the kernel's lock table (``/proc/locks``), or from the file where
that table is missing (the run's creator writes its PID there).  Readers (``plot``, ``load_run``)
never take it: the writer's files are atomic or append-only, and the reader cuts array logs
to the rows of ``log.csv``.

``run --force`` swaps a freshly built directory for the old one (:mod:`.writer`); a process
that opened the old lock file just before the swap may win the old lock just after it.  So
after ``flock`` succeeds the lock must still be the file at ``DIR/.diralign.lock``; if not,
we try again on the file that is there now.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path
from typing import Optional

from ..errors import UserError
from . import schema


class RunBusy(UserError):
    """Another process is writing this run directory."""


def holder_pid(directory) -> Optional[int]:
    """The PID holding ``directory``'s lock: from the kernel's table of locks where there is
    one (Linux ``/proc/locks``), else the PID the run's creator wrote into the file."""
    path = Path(directory) / schema.LOCK
    try:
        st = os.stat(path)
    except OSError:
        return None
    try:
        with open("/proc/locks") as table:
            for line in table:
                # "1: FLOCK  ADVISORY  WRITE 5668 fe:00:2147127 0 EOF" (hex major:minor, inode)
                parts = line.split()
                for i, token in enumerate(parts):
                    fields = token.split(":")
                    if i > 0 and len(fields) == 3 and "FLOCK" in parts:
                        try:
                            dev = os.makedev(int(fields[0], 16), int(fields[1], 16))
                            if dev == st.st_dev and int(fields[2]) == st.st_ino:
                                return int(parts[i - 1])
                        except ValueError:
                            continue
    except OSError:
        pass
    try:
        text = path.read_text().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def busy_message(directory, pid: Optional[int]) -> str:
    who = f"diralign process {pid}" if pid is not None else "another diralign process"
    kill = f"kill {pid}" if pid is not None else "stop it"
    return (
        f"{directory} is being written by {who} (a run or resume holds its lock); wait for it to finish, "
        f"or stop it ({kill}) and continue with: diralign resume {directory}"
    )


class RunLock:
    """The exclusive lock of one run directory, held until :meth:`release` (or death)."""

    def __init__(self, fd: Optional[int], directory: Path):
        self.fd = fd
        self.directory = Path(directory)

    @classmethod
    def acquire(cls, directory) -> RunLock:
        """Take the lock now or raise :class:`RunBusy` naming the holder; never waits."""
        directory = Path(directory)
        path = directory / schema.LOCK
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunBusy(busy_message(directory, holder_pid(directory))) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # A file system without flock (some network mounts): run unguarded, but say so.
                print(
                    f"diralign: warning: {directory} cannot be locked ({exc.strerror}); "
                    "make sure no other run or resume writes it",
                    file=sys.stderr,
                )
                return cls(None, directory)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                if os.fstat(fd).st_size == 0:
                    # A new lock file: the creator's PID, for systems without /proc/locks.  An
                    # existing one is left as it is (a refused resume changes no byte of the run).
                    os.write(fd, f"{os.getpid()}\n".encode())
                return cls(fd, directory)
            os.close(fd)  # the directory was swapped under us: lock the file there now
        raise RunBusy(busy_message(directory, holder_pid(directory)))

    @property
    def held(self) -> bool:
        return self.fd is not None

    def moved_to(self, directory) -> None:
        """The locked directory was renamed (the lock file's inode goes with it)."""
        self.directory = Path(directory)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the kernel drops the flock with the last descriptor
            self.fd = None
