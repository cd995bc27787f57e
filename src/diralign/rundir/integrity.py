"""Which run a file belongs to, and whether it is still what was written.

    python -c "import torch; from diralign.rundir.integrity import tensor_sha256; print(tensor_sha256(torch.ones(3)))"

- **Identity.** A run gets a random id when it is created (``config.json`` and every
  checkpoint carry it), and the sha256 of its data ``(X, y)`` and initial weights.  A resume
  rebuilds the data and weights from ``config.json`` and compares: a checkpoint from another
  run, or a config that now builds other data, is refused instead of mixed in.
- **Checksums.** ``config.json`` holds the sha256 of the canonical JSON of its other
  entries; a checkpoint holds the sha256 of its payload, tensors' bytes included.  A flipped
  byte or a hand edit is refused, never trained on.  (Integrity, not authenticity: anyone
  can recompute a checksum; the identity hashes then still catch other data.)
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid

import numpy as np
import torch


def new_run_id() -> str:
    return uuid.uuid4().hex


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 array, a view where the tensor is contiguous on the CPU
    (hashlib reads it in place: no copy of a 600 MB data set just to hash it)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy()


def tensor_sha256(*tensors) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes, in order (numpy arrays accepted)."""
    h = hashlib.sha256()
    for t in tensors:
        t = torch.as_tensor(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# -- config.json ---------------------------------------------------------------------------
def config_checksum(meta: dict, checksum_key: str) -> str:
    """sha256 of ``meta`` without ``checksum_key``, as canonical JSON (sorted keys, no spaces).
    JSON floats round-trip exactly, so the file read back hashes as it was written."""
    rest = {k: v for k, v in meta.items() if k != checksum_key}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# -- checkpoint payloads -----------------------------------------------------------------------
def plain_payload(value, where: str = "checkpoint"):
    """A copy of ``value`` made only of what ``torch.load(weights_only=True)`` reads without an
    allow-list: dicts with str/int keys, lists, tuples, CPU tensors, str, int, float, bool,
    None.  numpy arrays become tensors and numpy scalars Python numbers; anything else is a
    programming error, caught when the checkpoint is written rather than when it is read."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; checkpoints hold str or int keys")
            out[k] = plain_payload(v, f"{where}/{k}")
        return out
    if isinstance(value, (list, tuple)):
        items = [plain_payload(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biufc":
            raise TypeError(f"{where}: a numpy array of dtype {value.dtype} cannot be a checkpoint tensor")
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(
        f"{where} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, strings and containers"
    )


def payload_checksum(payload: dict, checksum_key: str) -> str:
    """sha256 of a plain payload (see :func:`plain_payload`) without ``checksum_key``."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != checksum_key})
    return "sha256:" + h.hexdigest()


def _feed(h, value) -> None:
    # A tag and a length before every item: no two payloads feed the same bytes.
    if isinstance(value, dict):
        h.update(b"D%d;" % len(value))
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(b"L" if isinstance(value, list) else b"T")
        h.update(b"%d;" % len(value))
        for v in value:
            _feed(h, v)
    elif isinstance(value, torch.Tensor):
        data = _tensor_bytes(value)
        h.update(f"X{value.dtype}{tuple(value.shape)}{len(data)};".encode())
        h.update(data)
    elif value is None:
        h.update(b"N")
    elif isinstance(value, bool):
        h.update(b"B1" if value else b"B0")
    elif isinstance(value, int):
        h.update(b"I%d;" % value)
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"S%d;" % len(data))
        h.update(data)
    else:
        raise TypeError(f"cannot checksum a {type(value).__name__}")
