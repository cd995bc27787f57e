"""Appendable on-disk arrays of fixed-width rows (``[T, width]``), memory-mapped to read.

    python -c "from diralign.rundir.arraylog import read_array_log; help(read_array_log)"
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError


class ArrayLog:
    """Writer of ``NAME.bin`` (+ ``NAME.json``: width, dtype).  Rows are buffered and reach
    the disk at :meth:`sync` (every checkpoint) and :meth:`close`: a resume cuts the file
    back to the checkpoint's row count anyway, so flushing each row buys nothing."""

    def __init__(self, directory: Path, name: str, width: int, dtype: str):
        self.name = name
        self.path = Path(directory) / f"{name}.bin"
        self.meta_path = Path(directory) / f"{name}.json"
        self.width = int(width)
        self.dtype = np.dtype(dtype)
        if not self.meta_path.exists():
            self.meta_path.write_text(json.dumps({"width": self.width, "dtype": self.dtype.str}))
        self._file = open(self.path, "ab")

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    def append(self, row) -> None:
        # The array's own buffer: no bytes copy of a (possibly 240 kB) direction row.
        self._file.write(np.ascontiguousarray(row, dtype=self.dtype).data)

    def rows(self) -> int:
        self._file.flush()
        return os.path.getsize(self.path) // self.row_bytes

    def truncate(self, rows: int) -> None:
        """Cut back to ``rows`` rows (a resume); a file shorter than that is damaged, never padded."""
        self._file.flush()
        size = os.path.getsize(self.path)
        if size < rows * self.row_bytes:
            raise UserError(
                f"{self.path} holds {size // self.row_bytes} rows but the checkpoint recorded {rows}; "
                "the file was cut or replaced: restore it, or start the run again"
            )
        self._file.close()
        with open(self.path, "r+b") as f:
            f.truncate(rows * self.row_bytes)
        self._file = open(self.path, "ab")

    def sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            self._file.close()


def read_array_log(directory, name: str, rows: Optional[int] = None) -> Optional[np.ndarray]:
    """``[T, width]`` memory-mapped (at most ``rows`` rows), or ``None`` if the run has no such log."""
    meta_path = Path(directory) / f"{name}.json"
    path = Path(directory) / f"{name}.bin"
    if not meta_path.exists() or not path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        width = int(meta["width"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{meta_path} is damaged ({type(exc).__name__}); restore it or start the run again") from None
    if width < 1:
        raise UserError(f"{meta_path} is damaged (width {width}); restore it or start the run again")
    total = os.path.getsize(path) // (width * dtype.itemsize)
    if rows is not None:
        total = min(total, int(rows))
    if total == 0:
        return np.zeros((0, width), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(total, width))
