"""The writer side of a run directory (rank 0 only in distributed runs).

    python -c "from diralign.rundir import RunWriter; help(RunWriter)"

**One writer.** A writer holds the directory's lock (:mod:`.lock`) from creation or
opening until :meth:`RunWriter.close`: a second ``run --force``, ``resume`` or a resume
beside a live run is refused with the holder's PID.

**Built beside, swapped in** (:mod:`.staging`).  :meth:`RunWriter.create` sets a new run up
in a hidden sibling of ``--out``; :meth:`RunWriter.publish` moves it into place once its
set-up is on disk (config, assumptions, opened logs and the checkpoint of step 0),
exchanging it atomically with the run ``--force`` replaces.  Any failure before that (a value
that cannot be written, a full disk, Ctrl-C) leaves ``--out`` exactly as it was; from the
moment ``--out`` holds the new run, it can be resumed.

**Crash safety.** Log rows are buffered and reach the disk at each checkpoint and at close;
a checkpoint first makes every append-only file durable, records its length, and is then
written atomically.  ``resume`` checks every file against those lengths before touching any
(:meth:`RunWriter.check_positions`), then cuts each back (dropping rows made after the
checkpoint and any half-written row); a file shorter than recorded is refused, never
padded.  So a run killed at any moment continues without losing, duplicating or inventing
a row.

**The disk.** A full disk, a read-only file system or missing permissions are one line
(:class:`~.disk.DiskError`) saying what is intact.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from . import schema
from .arraylog import ArrayLog, check_array_log
from .checkpoint import load_checkpoint_file, save_checkpoint_file
from .disk import disk_errors, write_atomic
from .lock import RunLock
from .staging import Staging


class RunWriter:
    def __init__(self, path: Path, experiment: str = "", lock: Optional[RunLock] = None):
        self.path = Path(path)
        self.experiment = experiment
        self.run_id: Optional[str] = None  # set by the runner from config.json; stamped on checkpoints
        self.columns: Optional[list[str]] = None
        self._log = None
        self.arrays: dict[str, ArrayLog] = {}
        self._resume_positions: Optional[dict] = None
        self._lock = lock
        self._staging: Optional[Staging] = None  # a new run, until publish() moves it to --out

    @property
    def log_path(self) -> Path:
        return self.path / schema.LOG

    @property
    def published(self) -> bool:
        return self._staging is None

    def _intact(self) -> str:
        if not self.published:
            return f"{self._staging.final} is unchanged"
        return f"the last checkpoint is intact: free space or fix the disk, then continue with: diralign resume {self.path}"

    # -- creation -----------------------------------------------------------------
    @staticmethod
    def check_target(path, force: bool = False) -> None:
        """Raise the error ``create`` would raise, without touching the disk."""
        path = Path(path)
        for parent in [path, *path.parents]:
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    what = "exists and is not a directory" if parent == path else f"is under {parent}, a file"
                    raise UserError(f"--out {path} {what}; choose another path")
                break
        if path.is_dir() and any(path.iterdir()):
            if not force:
                raise UserError(
                    f"--out {path} is not empty; pass --force to replace the run in it, or choose another directory"
                )
            if not (path / schema.CONFIG).exists():
                raise UserError(
                    f"--out {path} is not empty and is not a diralign run directory; refusing to delete it even with --force"
                )

    @classmethod
    def create(cls, path, force: bool = False, experiment: str = "") -> RunWriter:
        """A writer of a new run, set up beside ``path`` until :meth:`publish`."""
        path = Path(path)
        cls.check_target(path, force)
        with disk_errors(f"create the run directory {path}", "nothing was written"):
            staging = Staging.begin(path, replace=path.is_dir() and any(path.iterdir()))
        try:
            with disk_errors(f"create the run directory {path}", "nothing was written"):
                lock = RunLock.acquire(staging.stage)
        except BaseException:
            staging.discard()
            raise
        writer = cls(staging.stage, experiment, lock)
        writer._staging = staging
        return writer

    @classmethod
    def open_existing(cls, path, experiment: str = "") -> RunWriter:
        """The writer of an existing run (resume): refused while another process writes it."""
        path = Path(path)
        if not (path / schema.CONFIG).is_file():
            raise UserError(
                f"{path} is not a diralign run directory (no {schema.CONFIG}); give the --out folder of a run"
            )
        with disk_errors(f"lock {path} for writing", f"{path} is unchanged"):
            lock = RunLock.acquire(path)
        return cls(path, experiment, lock)

    def publish(self) -> None:
        """Move a run set up beside ``--out`` into place (no-op once there); see :mod:`.staging`."""
        if self._staging is None:
            return
        staging = self._staging
        with disk_errors(f"move the new run into {staging.final}", f"{staging.final} is unchanged"):
            self._lock = staging.finish(self._lock)
        self._staging = None
        self.path = staging.final
        for log in self.arrays.values():  # their descriptors followed the rename; their names follow here
            log.directory = staging.final

    def write_json(self, name: str, data, strict: bool = False) -> None:
        """``name`` written atomically; ``strict`` (config.json): a non-finite number is an
        error naming it, never a silent ``null``."""
        try:
            text = json.dumps(schema.json_safe(data, strict=strict), indent=2, allow_nan=False) + "\n"
        except ValueError as exc:
            raise UserError(
                f"{name} cannot hold {exc.args[0]} = {exc.args[-1]!r} (JSON has no inf or NaN); use a finite number"
            ) from None
        with disk_errors(f"write {name}", self._intact()):
            write_atomic(self.path / name, text.encode(), durable=False)

    def write_summary(self, summary: dict) -> None:
        schema.check_summary(self.experiment, summary)
        self.write_json(schema.SUMMARY, summary)

    def write_npy(self, name: str, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array)
        with disk_errors(f"write {name}", self._intact()):
            write_atomic(self.path / name, buffer.getvalue(), durable=False)

    def write_npz(self, name: str, **arrays) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        with disk_errors(f"write {name}", self._intact()):
            write_atomic(self.path / name, buffer.getvalue(), durable=False)

    # -- append-only logs -------------------------------------------------------------
    def check_positions(self, positions: dict, arrays: dict[str, tuple[int, str]]) -> None:
        """Before a resume cuts anything: every append-only file is at least as long as the
        checkpoint recorded, and every array log still describes this run's rows.
        ``arrays``: name -> (width, dtype) of the logs this run opens at the start."""
        log_bytes = int(positions.get("log_bytes", 0))
        if not self.log_path.is_file():
            raise UserError(
                f"{self.log_path} is missing but the checkpoint recorded {log_bytes} bytes of it; "
                "restore it from a backup, or start the run again"
            )
        size = self.log_path.stat().st_size
        if size < log_bytes:
            raise UserError(
                f"{self.log_path} has {size} bytes but the checkpoint recorded {log_bytes}; the log was cut or replaced: "
                "restore it, or start the run again"
            )
        rows = positions.get("array_rows", {})
        for name, (width, dtype) in arrays.items():
            check_array_log(self.path, name, width, dtype, int(rows.get(name, 0)))
        for name, count in rows.items():
            if name not in arrays and int(count) > 0:  # opened later (fig1's surfaces): width from its .json
                meta = self.path / f"{name}.json"
                try:
                    described = json.loads(meta.read_text())
                    width, dtype = described["width"], described["dtype"]
                except (OSError, ValueError, KeyError, TypeError):
                    raise UserError(
                        f"{meta} is missing or damaged but the checkpoint recorded {count} rows of {name}; "
                        "restore it from a backup, or start the run again"
                    ) from None
                check_array_log(self.path, name, width, dtype, int(count))

    def open_logs(
        self,
        columns: list[str],
        n_examples: int,
        direction_width: int,
        direction_dtype: str,
        positions: Optional[dict] = None,
    ) -> None:
        """Open ``log.csv`` and the margin/direction logs; ``positions`` (a resume) cuts them
        back to a checkpoint's lengths, and array logs opened later are cut on opening."""
        unknown = [c for c in columns if not schema.is_log_column(c)]
        if unknown:
            raise KeyError(f"log columns {unknown} are not declared in diralign.rundir.schema")
        self.columns = list(columns)
        arrays = {schema.MARGINS: (n_examples, "<f4")}
        if direction_width:
            arrays[schema.DIRECTIONS] = (direction_width, direction_dtype)
        if positions is not None:
            self.check_positions(positions, arrays)
        self._resume_positions = positions
        with disk_errors(f"write {schema.LOG}", self._intact()):
            if positions is not None:
                with open(self.log_path, "r+b") as f:
                    f.truncate(int(positions["log_bytes"]))
            new = not self.log_path.exists() or self.log_path.stat().st_size == 0
            # A large buffer: rows reach the disk at checkpoints (positions()) and close.
            self._log = open(self.log_path, "a", newline="", buffering=1 << 20)
            if new:
                self._log.write(",".join(self.columns) + "\n")
            for name, (width, dtype) in arrays.items():
                self.array_log(name, width, dtype)

    def array_log(self, name: str, width: int, dtype: str) -> ArrayLog:
        """The array log ``name`` (opened once; on a resume, cut back to the checkpoint)."""
        if name not in schema.ARRAY_LOGS:
            raise KeyError(f"array log {name!r} is not declared in diralign.rundir.schema")
        if name not in self.arrays:
            rows = None
            if self._resume_positions is not None:
                # Absent from the checkpoint: the log did not exist then, so it keeps no row.
                rows = int(self._resume_positions.get("array_rows", {}).get(name, 0))
            with disk_errors(f"write {name}.bin", self._intact()):
                self.arrays[name] = ArrayLog(self.path, name, width, dtype, rows=rows)
        return self.arrays[name]

    def append_row(self, row: dict, margins: np.ndarray, direction: Optional[np.ndarray]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_csv_value(row.get(c, float("nan"))) for c in self.columns])
        with disk_errors(f"append to {schema.LOG}", self._intact()):
            self._log.write(buf.getvalue())
            self.arrays[schema.MARGINS].append(margins)
            if direction is not None and schema.DIRECTIONS in self.arrays:
                self.arrays[schema.DIRECTIONS].append(direction)

    def positions(self) -> dict:
        """Byte/row lengths of every append-only file, made durable first."""
        with disk_errors(f"write {schema.LOG}", self._intact()):
            self._log.flush()
            os.fsync(self._log.fileno())
        rows = {}
        for name, log in self.arrays.items():
            with disk_errors(f"write {name}.bin", self._intact()):
                log.sync()
                rows[name] = log.rows()
        return {"log_bytes": os.fstat(self._log.fileno()).st_size, "array_rows": rows}

    def close_logs(self) -> None:
        """Flush and close the append-only logs (the lock stays: the summary is still to come)."""
        with disk_errors("flush the logs", self._intact()):
            self._close_logs()

    def close(self) -> None:
        """Close the logs, then let go of the directory: an unpublished run (its set-up
        failed) is removed, and the lock released."""
        try:
            self.close_logs()
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without raising (an error is already on its way): buffered rows that cannot
        be written are lost, which the last checkpoint's positions already account for."""
        try:
            self._close_logs()
        except OSError:
            pass
        if self._lock is not None:
            self._lock.release()
        if self._staging is not None:  # never published: nothing of it may stay
            self._staging.discard()
            self._staging = None

    def _close_logs(self) -> None:
        errors = []
        for f in [self._log, *(log for log in self.arrays.values())]:
            if f is None:
                continue
            try:
                f.close()
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, payload: dict) -> None:
        with disk_errors(f"write {schema.CHECKPOINT}", self._intact()):
            save_checkpoint_file(self.path / schema.CHECKPOINT, payload, run_id=self.run_id)

    def load_checkpoint(self) -> dict:
        return load_checkpoint_file(self.path / schema.CHECKPOINT, run_id=self.run_id)


def _csv_value(value) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else repr(value))
    if isinstance(value, torch.Tensor):
        return _csv_value(value.item())
    return str(value)
