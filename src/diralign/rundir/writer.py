"""The writer side of a run directory (rank 0 only in distributed runs).

    python -c "from diralign.rundir import RunWriter; help(RunWriter)"

Crash safety: log rows are buffered and reach the disk at each checkpoint and at close;
a checkpoint first makes every append-only file durable, records its length, and is then
written to a temporary file, fsynced and renamed over the old one.  ``resume`` cuts each
file back to those lengths (dropping rows made after the checkpoint and any half-written
row) and refuses a file shorter than recorded, so a run killed at any moment continues
without losing, duplicating or inventing a row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from . import schema
from .arraylog import ArrayLog
from .checkpoint import load_checkpoint_file, save_checkpoint_file


class RunWriter:
    def __init__(self, path: Path, experiment: str = ""):
        self.path = Path(path)
        self.experiment = experiment
        self.log_path = self.path / schema.LOG
        self.columns: Optional[list[str]] = None
        self._log = None
        self.arrays: dict[str, ArrayLog] = {}
        self._resume_positions: Optional[dict] = None

    # -- creation -----------------------------------------------------------------
    @staticmethod
    def check_target(path, force: bool = False) -> None:
        """Raise the error ``create`` would raise, without touching the disk."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} exists and is not a directory; choose another path")
        if path.exists() and any(path.iterdir()):
            if not force:
                raise UserError(f"--out {path} is not empty; pass --force to replace the run in it, or choose another directory")
            if not (path / schema.CONFIG).exists():
                raise UserError(
                    f"--out {path} is not empty and is not a diralign run directory; refusing to delete it even with --force"
                )

    @classmethod
    def create(cls, path, force: bool = False, experiment: str = "") -> RunWriter:
        path = Path(path)
        cls.check_target(path, force)
        if path.exists() and any(path.iterdir()):  # a run directory, and --force was given
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, experiment)

    @classmethod
    def open_existing(cls, path, experiment: str = "") -> RunWriter:
        path = Path(path)
        if not (path / schema.CONFIG).is_file():
            raise UserError(f"{path} is not a diralign run directory (no {schema.CONFIG}); give the --out folder of a run")
        return cls(path, experiment)

    def write_json(self, name: str, data) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(schema.json_safe(data), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, self.path / name)

    def write_summary(self, summary: dict) -> None:
        schema.check_summary(self.experiment, summary)
        self.write_json(schema.SUMMARY, summary)

    def write_npy(self, name: str, array: np.ndarray) -> None:
        tmp = self.path / f".{name}.tmp.npy"
        np.save(tmp, array)
        os.replace(tmp, self.path / name)

    def write_npz(self, name: str, **arrays) -> None:
        tmp = self.path / f".{name}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self.path / name)

    # -- append-only logs -------------------------------------------------------------
    def open_logs(self, columns: list[str], n_examples: int, direction_width: int, direction_dtype: str,
                  positions: Optional[dict] = None) -> None:
        """Open ``log.csv`` and the margin/direction logs; ``positions`` (a resume) cuts them
        back to a checkpoint's lengths, and array logs opened later are cut on opening."""
        unknown = [c for c in columns if not schema.is_log_column(c)]
        if unknown:
            raise KeyError(f"log columns {unknown} are not declared in diralign.rundir.schema")
        self.columns = list(columns)
        self._resume_positions = positions
        if positions is not None:
            self._truncate_log(int(positions["log_bytes"]))
        new = not self.log_path.exists() or self.log_path.stat().st_size == 0
        # A large buffer: rows reach the disk at checkpoints (positions()) and close.
        self._log = open(self.log_path, "a", newline="", buffering=1 << 20)
        if new:
            self._log.write(",".join(self.columns) + "\n")
        self.array_log(schema.MARGINS, n_examples, "<f4")
        if direction_width:
            self.array_log(schema.DIRECTIONS, direction_width, direction_dtype)

    def _truncate_log(self, length: int) -> None:
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        if size < length:
            raise UserError(
                f"{self.log_path} has {size} bytes but the checkpoint recorded {length}; the log was cut or replaced: "
                "restore it, or start the run again"
            )
        with open(self.log_path, "r+b") as f:
            f.truncate(length)

    def array_log(self, name: str, width: int, dtype: str) -> ArrayLog:
        """The array log ``name`` (opened once; on a resume, cut back to the checkpoint)."""
        if name not in schema.ARRAY_LOGS:
            raise KeyError(f"array log {name!r} is not declared in diralign.rundir.schema")
        if name not in self.arrays:
            log = ArrayLog(self.path, name, width, dtype)
            if self._resume_positions is not None:
                # Absent from the checkpoint: the log did not exist then, so it keeps no row.
                log.truncate(int(self._resume_positions.get("array_rows", {}).get(name, 0)))
            self.arrays[name] = log
        return self.arrays[name]

    def append_row(self, row: dict, margins: np.ndarray, direction: Optional[np.ndarray]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_csv_value(row.get(c, float("nan"))) for c in self.columns])
        self._log.write(buf.getvalue())
        self.arrays[schema.MARGINS].append(margins)
        if direction is not None and schema.DIRECTIONS in self.arrays:
            self.arrays[schema.DIRECTIONS].append(direction)

    def positions(self) -> dict:
        """Byte/row lengths of every append-only file, made durable first."""
        self._log.flush()
        os.fsync(self._log.fileno())
        rows = {}
        for name, log in self.arrays.items():
            log.sync()
            rows[name] = log.rows()
        return {"log_bytes": self.log_path.stat().st_size, "array_rows": rows}

    def close(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()
        for log in self.arrays.values():
            log.close()

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, payload: dict) -> None:
        save_checkpoint_file(self.path / schema.CHECKPOINT, payload)

    def load_checkpoint(self) -> dict:
        return load_checkpoint_file(self.path / schema.CHECKPOINT)


def _csv_value(value) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else repr(value))
    if isinstance(value, torch.Tensor):
        return _csv_value(value.item())
    return str(value)
