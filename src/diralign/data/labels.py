"""Labels for a user's model: binary or multi-class follows from the model's output shape.

A model with one output per example (``[n]`` or ``[n, 1]``) is a binary classifier and
takes labels in {-1, +1}; a model with ``K >= 2`` outputs per example takes class
indices ``0..K-1``.  Two-valued labels are translated between the two conventions
(``0/1 -> -1/+1`` for a scalar output, ``-1/+1 -> 0/1`` for two logits), and the
translation is reported, never silent.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from .npz import validate_binary, validate_features


def as_numpy(values, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    try:
        return np.asarray(values)
    except Exception as exc:  # ragged lists and the like
        raise UserError(f"{what} must be an array or tensor ({type(exc).__name__}: {exc})") from None


def check_features(X, source: str = "X") -> np.ndarray:
    """Real, finite, at least 2 examples; any shape ``[n, ...]``."""
    X = as_numpy(X, source)
    if X.ndim < 2:
        raise UserError(f"{source} must have shape [n, ...] with one row per example, got shape {list(X.shape)}")
    return validate_features(X, source, feature_ndim=None)


def output_kind(out: torch.Tensor) -> Optional[int]:
    """``1`` for one output per example, ``K`` for ``[n, K]`` logits, None otherwise."""
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        return 1
    if out.ndim == 2 and out.shape[1] >= 2:
        return int(out.shape[1])
    return None


def resolve_labels(y, outputs: int, source: str = "y") -> tuple[torch.Tensor, str]:
    """Labels as the Problem wants them: float ±1 (binary) or int64 class indices.

    ``outputs`` is :func:`output_kind` of the model.  Returns ``(labels, description)``.
    """
    y = as_numpy(y, source)
    if y.ndim != 1:
        raise UserError(f"{source} must be one label per example (shape [n]), got shape {list(y.shape)}")
    if not np.issubdtype(y.dtype, np.number) or np.issubdtype(y.dtype, np.complexfloating):
        raise UserError(f"{source} must be numbers (±1 or class indices), got dtype {y.dtype}")
    y64 = y.astype(np.float64)
    if not np.all(np.isfinite(y64)):
        raise UserError(f"{source} contains NaN or inf; give labels in {{-1, +1}} or class indices 0..K-1")
    values = set(np.unique(y64).tolist())
    if outputs == 1:
        if values <= {0.0, 1.0} and 0.0 in values:
            labels = validate_binary(2.0 * y64 - 1.0, source)
            return labels, "binary (one output per example); labels 0/1 read as -1/+1"
        if not values <= {-1.0, 1.0}:
            raise UserError(
                f"the model gives one output per example (binary) but {source} holds {len(values)} distinct labels "
                f"{sorted(values)[:5]}; give labels in {{-1, +1}}, or make the model output one logit per class"
            )
        return validate_binary(y64, source), "binary (one output per example), labels -1/+1"
    if values <= {-1.0, 1.0} and -1.0 in values and outputs == 2:
        return torch.as_tensor(((y64 + 1.0) / 2.0).astype(np.int64)), "2 classes (two logits); labels -1/+1 read as 0/1"
    if not all(v.is_integer() for v in values) or min(values) < 0 or max(values) >= outputs:
        raise UserError(
            f"the model outputs {outputs} logits per example, so {source} must hold class indices 0..{outputs - 1}; "
            f"found values from {min(values):g} to {max(values):g}"
        )
    if len(values) < 2:
        raise UserError(f"{source} holds a single class ({min(values):g}); margins need at least two classes")
    return torch.as_tensor(y64.astype(np.int64)), f"{outputs} classes (one logit each), class indices"


def model_outputs(model: nn.Module, X: torch.Tensor) -> int:
    with torch.no_grad():
        try:
            out = model(X[:2])
        except Exception as exc:
            raise UserError(
                f"the model fails on inputs of shape {list(X.shape[1:])} ({type(exc).__name__}: {exc}); "
                "check that its input size matches the data"
            ) from None
    kind = output_kind(out) if isinstance(out, torch.Tensor) else None
    if kind is None:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the model's output must be [n], [n, 1] (binary) or [n, K] (K classes), got {shape}")
    return kind
