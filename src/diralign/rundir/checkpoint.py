"""Checkpoint files: atomic writes, and loads that treat the file as data, never code.

    python -c "from diralign.rundir.checkpoint import load_checkpoint_file; help(load_checkpoint_file)"
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError

CHECKPOINT_FORMAT = "diralign-checkpoint"
CHECKPOINT_VERSION = 2  # 2: positions hold every array log by name ("array_rows")


def save_checkpoint_file(path: Path, payload: dict) -> None:
    path = Path(path)
    payload = dict(payload, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; the run has no checkpoint to resume from (start it again with diralign run)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a cut or foreign file
        raise UserError(f"{path} is corrupt or truncated ({type(exc).__name__}); restore it or start the run again") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a diralign checkpoint; restore the run's own {path.name}")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint version {payload.get('version')}, this diralign reads {CHECKPOINT_VERSION}")
    return payload
