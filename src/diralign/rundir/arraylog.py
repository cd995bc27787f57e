"""Appendable on-disk arrays of fixed-width rows (``[T, width]``), memory-mapped to read.

    python -c "from diralign.rundir.arraylog import read_array_log; help(read_array_log)"

``NAME.bin`` holds the rows, ``NAME.json`` their ``{"width", "dtype"}``.  On a resume a log
is cut back to the rows its checkpoint recorded; one that is shorter, or whose ``.json`` is
missing, damaged or describes other rows, is refused (:func:`check_array_log`) before any
file of the run is touched: never padded, never reinterpreted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from .disk import write_atomic

_RESTORE = "restore it from a backup, or start the run again"


def _read_meta(meta_path: Path) -> tuple[int, np.dtype]:
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        width = int(meta["width"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{meta_path} is damaged ({type(exc).__name__}); {_RESTORE}") from None
    if width < 1 or dtype.kind not in "fiu":
        raise UserError(f"{meta_path} is damaged (width {width}, dtype {dtype}); {_RESTORE}")
    return width, dtype


def check_array_log(directory, name: str, width: int, dtype: str, rows: int) -> None:
    """Raise unless ``NAME.bin``/``.json`` can be cut back to ``rows`` rows of ``width`` x ``dtype``."""
    path, meta_path = Path(directory) / f"{name}.bin", Path(directory) / f"{name}.json"
    if rows == 0:
        return  # the log was not in the checkpoint: whatever is there came later and is dropped
    if not meta_path.is_file() or not path.is_file():
        missing = path if not path.is_file() else meta_path
        raise UserError(f"{missing} is missing but the checkpoint recorded {rows} rows of {name}; {_RESTORE}")
    have = _read_meta(meta_path)
    if have != (int(width), np.dtype(dtype)):
        raise UserError(
            f"{meta_path} describes rows of {have[0]} x {have[1]}, but this run writes {width} x "
            f"{np.dtype(dtype)}; the file belongs to another run: {_RESTORE}"
        )
    size = os.path.getsize(path)
    row_bytes = int(width) * np.dtype(dtype).itemsize
    if size < rows * row_bytes:
        raise UserError(
            f"{path} holds {size // row_bytes} rows but the checkpoint recorded {rows}; "
            f"the file was cut or replaced: {_RESTORE}"
        )


class ArrayLog:
    """Writer of one array log.  Rows are buffered and reach the disk at :meth:`sync` (every
    checkpoint) and :meth:`close`: a resume cuts the file back to the checkpoint's row count
    anyway, so flushing each row buys nothing.  Sizes come from the open descriptor, so the
    log keeps working when its directory is renamed (a run is built beside ``--out`` and
    moved into place)."""

    def __init__(self, directory: Path, name: str, width: int, dtype: str, rows: Optional[int] = None):
        """``rows``: a resume's row count from the checkpoint (the file is cut back to it)."""
        self.name = name
        self.directory = Path(directory)
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        if rows is not None:
            check_array_log(self.directory, name, self.width, self.dtype.str, int(rows))
        if rows is None or rows == 0 or not self.meta_path.exists():
            write_atomic(
                self.meta_path, json.dumps({"width": self.width, "dtype": self.dtype.str}).encode(), durable=False
            )
        self._file = open(self.path, "ab")
        if rows is not None:
            self._file.truncate(int(rows) * self.row_bytes)

    @property
    def path(self) -> Path:
        return self.directory / f"{self.name}.bin"

    @property
    def meta_path(self) -> Path:
        return self.directory / f"{self.name}.json"

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    def append(self, row) -> None:
        # The array's own buffer: no bytes copy of a (possibly 240 kB) direction row.
        self._file.write(np.ascontiguousarray(row, dtype=self.dtype).data)

    def rows(self) -> int:
        self._file.flush()
        return os.fstat(self._file.fileno()).st_size // self.row_bytes

    def truncate(self, rows: int) -> None:
        """Cut back to ``rows`` rows; a file shorter than that is damaged, never padded."""
        self._file.flush()
        size = os.fstat(self._file.fileno()).st_size
        if size < rows * self.row_bytes:
            raise UserError(
                f"{self.path} holds {size // self.row_bytes} rows but the checkpoint recorded {rows}; "
                f"the file was cut or replaced: {_RESTORE}"
            )
        self._file.truncate(rows * self.row_bytes)

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.flush()
            finally:
                self._file.close()


def read_array_log(directory, name: str, rows: Optional[int] = None) -> Optional[np.ndarray]:
    """``[T, width]`` memory-mapped (at most ``rows`` rows), or ``None`` if the run has no such log."""
    meta_path = Path(directory) / f"{name}.json"
    path = Path(directory) / f"{name}.bin"
    if not meta_path.exists() or not path.exists():
        return None
    width, dtype = _read_meta(meta_path)
    total = os.path.getsize(path) // (width * dtype.itemsize)
    if rows is not None:
        total = min(total, int(rows))
    if total == 0:
        return np.zeros((0, width), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(total, width))
