"""User data from ``.npz`` files (arrays ``X`` and ``y``), checked before any training."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError


def load_npz(path, dtype=torch.float64, feature_ndim: Optional[tuple] = (2,)) -> tuple[torch.Tensor, np.ndarray]:
    """Read ``X`` and ``y`` from ``path``; ``X`` must have one of ``feature_ndim`` dims."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist; pass an .npz file holding arrays X and y")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("X", "y") if k not in data.files]
            if missing:
                raise UserError(f"{path} lacks array(s) {', '.join(missing)}; it must hold X [n, d] and y [n]")
            X = np.asarray(data["X"])
            y = np.asarray(data["y"])
    except UserError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"cannot read {path} as .npz ({exc}); save it with numpy.savez(path, X=X, y=y)") from None
    X = validate_features(X, path, feature_ndim)
    if y.ndim != 1:
        raise UserError(f"{path}: y must be one-dimensional [n], got shape {list(y.shape)}")
    if y.shape[0] != X.shape[0]:
        raise UserError(f"{path}: X has {X.shape[0]} rows but y has {y.shape[0]} labels; they must match")
    return torch.as_tensor(X, dtype=dtype), y


def validate_features(X: np.ndarray, source, feature_ndim: Optional[tuple] = (2,)) -> np.ndarray:
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise UserError(f"{source}: X must be real numbers, got dtype {X.dtype}")
    if feature_ndim is not None and X.ndim not in feature_ndim:
        shapes = " or ".join({2: "[n, d]", 4: "[n, C, H, W]"}.get(k, f"{k}-D") for k in feature_ndim)
        raise UserError(f"{source}: X must have shape {shapes}, got {list(X.shape)}")
    if X.shape[0] < 2:
        raise UserError(f"{source}: need at least 2 examples, got {X.shape[0]}")
    bad = ~np.isfinite(X)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise UserError(
            f"{source}: X contains NaN or inf ({int(bad.sum())} entries, first in row {row}); clean the data first"
        )
    return X


def validate_binary(y, source) -> torch.Tensor:
    """Labels must be exactly -1 or +1, both present."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.number) or not np.all(np.isfinite(y.astype(np.float64))):
        raise UserError(f"{source}: y must be finite numbers in {{-1, +1}}")
    values = set(np.unique(y.astype(np.float64)).tolist())
    if not values <= {-1.0, 1.0}:
        extra = sorted(values - {-1.0, 1.0})[:5]
        raise UserError(f"{source}: labels must be -1 or +1, found {extra}; map your classes to -1/+1")
    if len(values) < 2:
        raise UserError(f"{source}: only one class present ({values.pop():+g}); a margin needs both -1 and +1")
    return torch.as_tensor(y.astype(np.float64))
