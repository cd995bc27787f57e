"""Checkpoint files: data, never code; whole, never half; checked, never trusted.

    python -c "from diralign.rundir.checkpoint import load_checkpoint_file; help(load_checkpoint_file)"

- **Data, never code.** A payload is made plain when it is written
  (:func:`~diralign.rundir.integrity.plain_payload`: tensors, numbers, strings, containers)
  and read with ``torch.load(weights_only=True)`` and no extra allow-list, so a pickled
  ``__reduce__`` payload in a hostile file is refused before anything of it runs.
- **Whole.** Serialised in memory, then written atomically (:func:`~.disk.write_atomic`):
  a full disk fails the write of the temporary file, and the last checkpoint stays.
- **Checked.** The payload carries its own sha256 (tensor bytes included) and the run id;
  a flipped byte, a truncated file or another run's checkpoint is one clear error.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from . import schema
from .disk import write_atomic
from .integrity import payload_checksum, plain_payload

CHECKPOINT_FORMAT = "diralign-checkpoint"
# 2: positions hold every array log by name ("array_rows")
# 3: plain data (weights_only), run id, payload checksum; written before the first step too
CHECKPOINT_VERSION = 3


def save_checkpoint_file(path: Path, payload: dict, run_id: Optional[str] = None) -> None:
    path = Path(path)
    payload = plain_payload(
        dict(
            payload,
            **{
                schema.CKPT_FORMAT: CHECKPOINT_FORMAT,
                schema.CKPT_VERSION: CHECKPOINT_VERSION,
                schema.CKPT_RUN_ID: run_id,
            },
        )
    )
    payload[schema.CKPT_CHECKSUM] = payload_checksum(payload, schema.CKPT_CHECKSUM)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())  # the writer says what a disk error leaves intact


def load_checkpoint_file(path: Path, run_id: Optional[str] = None) -> dict:
    """The payload of ``path``, checked; ``run_id``: the run it must belong to (resume)."""
    path = Path(path)
    restore = f"restore the run's own {path.name}, or start the run again with diralign run"
    if not path.is_file():
        raise UserError(
            f"{path} is missing; the run has no checkpoint to resume from (start it again with diralign run)"
        )
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of foreign files; the verdict below is the one line.
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global it does not know (a class, a function to call)
        # before creating it: the file wanted to run code or build objects diralign never writes.
        text = str(exc)
        found = re.search(r"(unsupported GLOBAL [\w.]+)", text) or re.search(
            r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|Check the documentation|$)", text, re.S
        )
        detail = " ".join(found.group(1).split()) if found else ""
        raise UserError(
            f"{path} is not a diralign checkpoint: it asks to build objects, not just data "
            f"({detail[:120] or 'unsupported pickle content'}); nothing of it was run; {restore}"
        ) from None
    except Exception as exc:  # torch raises many types for a cut or foreign file
        raise UserError(f"{path} is corrupt or truncated ({type(exc).__name__}); {restore}") from None
    if not isinstance(payload, dict) or payload.get(schema.CKPT_FORMAT) != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a diralign checkpoint; {restore}")
    version = payload.get(schema.CKPT_VERSION)
    if version != CHECKPOINT_VERSION:
        raise UserError(
            f"{path} has checkpoint version {version}, this diralign reads {CHECKPOINT_VERSION}; "
            "finish the run with the diralign that wrote it, or start it again"
        )
    try:
        expected = payload_checksum(payload, schema.CKPT_CHECKSUM)
    except TypeError:
        expected = None
    if expected is None or payload.get(schema.CKPT_CHECKSUM) != expected:
        raise UserError(
            f"{path} is corrupt: its content does not match its checksum (a flipped byte, a bad disk "
            f"or an edit); {restore}"
        )
    if run_id is not None and payload.get(schema.CKPT_RUN_ID) != run_id:
        raise UserError(
            f"{path} belongs to another run (run id {payload.get(schema.CKPT_RUN_ID)}, this directory's is {run_id}); "
            f"{restore}"
        )
    state = payload.get(schema.CKPT_STATE)
    if not isinstance(state, dict) or not isinstance(state.get("w"), torch.Tensor):
        raise UserError(f"{path} holds no training state; {restore}")
    if not isinstance(payload.get(schema.CKPT_POSITIONS), dict) or not isinstance(
        payload.get(schema.CKPT_DYNAMICS), dict
    ):
        raise UserError(f"{path} lacks its log positions or dynamics state; {restore}")
    return payload
