"""The run directory: config, append-only logs, trajectories, checkpoints, summary.

Layout of ``DIR``::

    config.json           resolved config, experiment, seed, versions
    log.csv               one row per log point (``pandas.read_csv(DIR/'log.csv')``)
    margins.bin/.json     per-example normalised margins, float32 rows [T, n], appendable
    directions.bin/.json  W/||W|| at each log point (small models only), for angle-to-final
    checkpoint.pt         everything needed to continue bit-for-bit
    summary.json          final numbers (DESIGN section 4 keys + experiment keys)
    final_margins.npy     per-example normalised margins at the end
    assumptions.json      which of the paper's assumptions hold for this model

Crash safety: rows are appended and flushed as they are made; a checkpoint records the
byte length of every append-only file, is written to a temporary file, fsynced and
renamed over the old one.  ``resume`` cuts each file back to those lengths (dropping
rows made after the checkpoint and any half-written row), so a run killed at any moment
continues without losing or duplicating a row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .errors import UserError

CHECKPOINT_FORMAT = "diralign-checkpoint"
CHECKPOINT_VERSION = 1


def versions() -> dict:
    import numpy
    import scipy

    out = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }
    try:
        from importlib.metadata import version

        out["diralign"] = version("diralign")
    except Exception:  # pragma: no cover - running from a source tree
        out["diralign"] = "unknown"
    return out


def finite_or_none(value):
    """JSON-safe scalar: non-finite numbers become ``null`` (JSON has no NaN)."""
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


class ArrayLog:
    """An appendable on-disk array of fixed-width rows (``[T, width]``), memory-mapped to read."""

    def __init__(self, directory: Path, name: str, width: int, dtype: str):
        self.path = directory / f"{name}.bin"
        self.meta_path = directory / f"{name}.json"
        self.width = width
        self.dtype = np.dtype(dtype)
        if not self.meta_path.exists():
            self.meta_path.write_text(json.dumps({"width": width, "dtype": self.dtype.str}))
        self._file = open(self.path, "ab")

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    def append(self, row) -> None:
        # Write the array's buffer itself: no bytes copy of a (possibly 240 KB) direction row.
        self._file.write(np.ascontiguousarray(row, dtype=self.dtype).data)
        self._file.flush()

    def rows(self) -> int:
        self._file.flush()
        return os.path.getsize(self.path) // self.row_bytes

    def truncate(self, rows: int) -> None:
        self._file.close()
        with open(self.path, "r+b") as f:
            f.truncate(rows * self.row_bytes)
        self._file = open(self.path, "ab")

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_array_log(directory: Path, name: str) -> Optional[np.ndarray]:
    meta_path = Path(directory) / f"{name}.json"
    path = Path(directory) / f"{name}.bin"
    if not meta_path.exists() or not path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    dtype = np.dtype(meta["dtype"])
    width = int(meta["width"])
    rows = os.path.getsize(path) // (width * dtype.itemsize)
    if rows == 0:
        return np.zeros((0, width), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(rows, width))


class RunDir:
    """Writer side of a run directory (rank 0 only in distributed runs)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.log_path = self.path / "log.csv"
        self.columns: Optional[list[str]] = None
        self._log = None
        self.margins: Optional[ArrayLog] = None
        self.directions: Optional[ArrayLog] = None

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
            if not (path / "config.json").exists():
                raise UserError(
                    f"--out {path} is not empty and is not a diralign run directory; refusing to delete it even with --force"
                )

    @classmethod
    def create(cls, path, force: bool = False) -> "RunDir":
        path = Path(path)
        cls.check_target(path, force)
        if path.exists() and any(path.iterdir()):  # a run directory, and --force was given
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open_existing(cls, path) -> "RunDir":
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a diralign run directory (no config.json); give the --out folder of a run")
        return cls(path)

    def write_json(self, name: str, data) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
        os.replace(tmp, self.path / name)

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())

    # -- append-only logs -------------------------------------------------------------
    def open_logs(self, columns: list[str], n_examples: int, direction_width: int, direction_dtype: str) -> None:
        self.columns = list(columns)
        new = not self.log_path.exists() or self.log_path.stat().st_size == 0
        self._log = open(self.log_path, "a", newline="")
        if new:
            self._log.write(",".join(self.columns) + "\n")
            self._log.flush()
        self.margins = ArrayLog(self.path, "margins", n_examples, "<f4")
        if direction_width:
            self.directions = ArrayLog(self.path, "directions", direction_width, direction_dtype)

    def append_row(self, row: dict, margins: np.ndarray, direction: Optional[np.ndarray]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(
            [_csv_value(row.get(c, float("nan"))) for c in self.columns]
        )
        self._log.write(buf.getvalue())
        self._log.flush()
        self.margins.append(margins)
        if self.directions is not None and direction is not None:
            self.directions.append(direction)

    def positions(self) -> dict:
        """Byte/row lengths of every append-only file, made durable first."""
        self._log.flush()
        os.fsync(self._log.fileno())
        self.margins.sync()
        pos = {"log_bytes": self.log_path.stat().st_size, "margin_rows": self.margins.rows()}
        if self.directions is not None:
            self.directions.sync()
            pos["direction_rows"] = self.directions.rows()
        return pos

    def truncate_to(self, pos: dict) -> None:
        self._log.close()
        with open(self.log_path, "r+b") as f:
            f.truncate(pos["log_bytes"])
        self._log = open(self.log_path, "a", newline="")
        self.margins.truncate(pos["margin_rows"])
        if self.directions is not None:
            self.directions.truncate(pos.get("direction_rows", 0))

    def close(self) -> None:
        for handle in (self._log, self.margins, self.directions):
            if handle is not None:
                handle.close()

    # -- checkpoints ------------------------------------------------------------------
    def save_checkpoint(self, payload: dict, name: str = "checkpoint.pt") -> None:
        payload = dict(payload, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
        tmp = self.path / f".{name}.tmp"
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / name)
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, name: str = "checkpoint.pt") -> dict:
        return load_checkpoint_file(self.path / name)


def load_checkpoint_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; the run has no checkpoint to resume from (start it again with diralign run)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a cut or foreign file
        raise UserError(f"{path} is corrupt or truncated ({type(exc).__name__}); restore it or start the run again") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a diralign checkpoint; restore the run's own checkpoint.pt")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {payload.get('version')}, this diralign reads {CHECKPOINT_VERSION}")
    return payload


def _csv_value(value) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else repr(value))
    return str(value)
