"""The instrument panel: every quantity of DESIGN section 1, from one oracle evaluation.

Probes read ``(w, Evaluation)``, which the training step computed anyway; they never
change training and never call the model again.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from . import losses
from .problem import Evaluation, Problem

MAX_BLOCK_COLUMNS = 24


def ln_n_over_L(n: int, log_risk_value: float) -> float:  # noqa: N802 - the paper's symbol
    return math.log(n) - float(log_risk_value)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return float("nan")
    return float(torch.dot(a, b)) / (na * nb)


def normalized_margins(margins: torch.Tensor, param_norm: float, degree: Optional[int]) -> torch.Tensor:
    """``p_i / ||W||^k`` when homogeneous; else ``p_i`` over the median nonnegative margin.

    The median fallback is the paper's own choice for DenseNet/ResNet (Appendix A).
    """
    if degree:
        return margins / (param_norm**degree)
    nonneg = margins[margins >= 0]
    scale = nonneg.median() if nonneg.numel() else margins.abs().median()
    if not torch.isfinite(scale) or scale == 0:
        return margins.clone()
    return margins / scale


def block_groups(names: list[str]) -> dict[str, list[int]]:
    """Parameter tensors grouped into blocks for per-layer columns.

    Small models get one block per tensor; large ones (DenseNet has hundreds) are grouped
    by their top-level module so the log stays readable.
    """
    if len(names) <= MAX_BLOCK_COLUMNS:
        return {name: [i] for i, name in enumerate(names)}
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        parts = name.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        groups.setdefault(key, []).append(i)
    if len(groups) > MAX_BLOCK_COLUMNS:
        groups = {}
        for i, name in enumerate(names):
            groups.setdefault(name.split(".")[0], []).append(i)
    return groups


def _block(v: torch.Tensor, offsets: list[int], indices: list[int]) -> torch.Tensor:
    """The entries of tensors ``indices`` of the flat ``v``: a view when they are adjacent."""
    if all(b == a + 1 for a, b in zip(indices[:-1], indices[1:])):
        return v[offsets[indices[0]] : offsets[indices[-1] + 1]]
    return torch.cat([v[offsets[i] : offsets[i + 1]] for i in indices])


def block_panel(
    problem: Problem,
    w: torch.Tensor,
    grad: torch.Tensor,
    groups: dict[str, list[int]],
    overall_alignment: Optional[float] = None,
) -> dict:
    """Per-block norm share ``||U_j||^2/||W||^2`` and ``cos(U_j, -grad_{U_j})`` (Lemma E.1).

    Cheap enough to log at every step: blocks are views (no copies) where their tensors are
    adjacent, three reductions each; a block that is all of ``W`` reuses
    ``overall_alignment`` (the panel's ``alignment_cos``) when given.
    """
    total = None
    row = {}
    for key, indices in groups.items():
        if overall_alignment is not None and len(indices) == len(problem.names):
            row[f"share:{key}"] = 1.0
            row[f"alignment_cos:{key}"] = overall_alignment
            continue
        if total is None:
            total = float(torch.dot(w, w))
        wb = _block(w, problem.offsets, indices)
        gb = _block(grad, problem.offsets, indices)
        wb_norm, gb_norm = float(wb.norm()), float(gb.norm())
        row[f"share:{key}"] = wb_norm**2 / total if total > 0 else float("nan")
        # cos(U_j, -g_j) = -<U_j, g_j> / (|U_j| |g_j|): no negated copy of the gradient.
        row[f"alignment_cos:{key}"] = (
            -float(torch.dot(wb, gb)) / (wb_norm * gb_norm) if wb_norm > 0 and gb_norm > 0 else float("nan")
        )
    return row


def panel(problem: Problem, w: torch.Tensor, ev: Evaluation, degree: Optional[int]) -> dict:
    """Scalar probes at ``w``: log risk, margins, alignment, beta (Lemma C.5)."""
    norm = float(w.norm())
    log_risk_value = ev.log_risk
    alpha = losses.smoothed_margin(log_risk_value, problem.loss)
    row = {
        "ln_n_over_L": ln_n_over_L(problem.n, log_risk_value),
        "log_risk": log_risk_value,
        "smoothed_margin": alpha,
        "param_norm": norm,
        "min_margin": float(ev.margins.min()),
        "train_accuracy": ev.correct / problem.n,
        "below_loss_at_zero": int(log_risk_value < losses.log_loss_at_zero(problem.loss)),
    }
    if degree:
        scale = norm**degree
        row["min_normalized_margin"] = row["min_margin"] / scale
        row["normalized_smoothed_margin"] = alpha / scale
    else:
        row["min_normalized_margin"] = float(normalized_margins(ev.margins, norm, None).min())
        row["normalized_smoothed_margin"] = float("nan")
    if ev.grad is not None:
        # Alignment and beta share three reductions over W (||W||, ||g||, <g, W>), so the
        # panel stays cheap enough to log at every step of a large model.
        grad_norm = float(ev.grad.norm())
        grad_dot_w = float(torch.dot(ev.grad, w))
        row["alignment_cos"] = -grad_dot_w / (norm * grad_norm) if norm > 0 and grad_norm > 0 else float("nan")
        row["grad_norm"] = grad_norm
        if degree:
            # beta = <grad alpha, W>/k with grad alpha = -slope * grad log L.
            slope = losses.smoothed_margin_slope(log_risk_value, problem.loss)
            row["beta"] = -slope * grad_dot_w / degree
        else:
            row["beta"] = float("nan")
    return row


def angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle in radians between two directions, accurate near zero (uses the chord)."""
    ua, ub = a / a.norm(), b / b.norm()
    chord = float((ua - ub).norm())
    return 2.0 * math.asin(min(1.0, chord / 2.0))


def saliency_directions(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``grad_x f(x) / ||grad_x f(x)||`` per example (for multi-class: of the top logit)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        if out.ndim == 2 and out.shape[1] > 1:
            out = out.gather(1, out.argmax(1, keepdim=True))
        (g,) = torch.autograd.grad(out.sum(), x)
    g = g.reshape(g.shape[0], -1)
    return g / g.norm(dim=1, keepdim=True).clamp(min=torch.finfo(g.dtype).tiny)


def surface_distance(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance of two surfaces, each first divided by its own RMS (scale-free)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.sqrt(np.mean(a * a)), np.sqrt(np.mean(b * b))
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.sqrt(np.mean((a / na - b / nb) ** 2)))
