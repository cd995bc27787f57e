"""Data that no run can fit, refused before training (one line, exit status 2).

    python -c "import torch; from diralign.separability import check_separable; print(check_separable.__doc__)"

The paper's late phase needs ``L -> 0``, i.e. data the model separates.  Two cases are cheap
to know for sure:

* **Contradictory examples** (any model): two identical inputs with different labels get
  the same output, so one of them has a margin ``<= 0`` forever.
* **Linear predictors** ``x -> M x`` (``linear``, ``deep-linear``'s end-to-end product, a
  bias-free ``nn.Linear`` or a ``Sequential`` of them): the data are separable by some
  ``M`` exactly when the linear program

      max t   s.t.   y_i <u, x_i> >= t          (binary, |u_j| <= 1)
                     <m_{y_i} - m_j, x_i> >= t  (multi-class, every j != y_i, |M_kj| <= 1)

  has ``t > 0`` (scipy's HiGHS).  A deep linear network computes ``M = A_k ... A_1``, a
  linear map of rank at most its narrowest layer, so an infeasible program refuses it as
  well (a feasible one says nothing about a bottleneck; the stall goal,
  :mod:`diralign.stall`, is the backstop there and for every other model).

The program is skipped where it would be large (more than ``LP_MAX_NONZEROS`` constraint
entries), and so is everything for data sets beyond ``DUPLICATES_MAX_BYTES``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .errors import UserError

LP_MAX_NONZEROS = 4_000_000
DUPLICATES_MAX_BYTES = 2_000_000_000
HASH_BLOCK = 4096  # rows copied at a time by the duplicate check
# A best margin at most this fraction of the largest |x|_1 counts as none (the LP's feasibility
# tolerance is ~1e-7 relative; data separable only by less are useless for training anyway).
MARGIN_FLOOR = 1e-9


def is_linear_predictor(model: nn.Module) -> bool:
    """Whether ``model`` computes ``x -> M(W) x`` for every ``W`` (declared, or built of
    bias-free linear layers only)."""
    if getattr(model, "linear_in_input", False):
        return True
    if isinstance(model, nn.Linear):
        return model.bias is None
    if isinstance(model, nn.Sequential) and len(model) > 0:
        return all(isinstance(m, (nn.Flatten, nn.Identity)) or is_linear_predictor(m) for m in model)
    return False


def contradictory_pair(X: torch.Tensor, y: torch.Tensor):
    """``(i, j)``: two examples with identical inputs and different labels, or ``None``.

    Rows are hashed a block at a time (128-bit BLAKE2b of their bytes) and candidate pairs
    compared exactly, so the check holds one block's copy of ``X``, not the whole set sorted
    (for 50,000 CIFAR images a sort of copies cost 1.2 GB of peak memory).  ``j`` is the first
    example (in order) whose input equals an earlier one's, ``i``, with another label.
    """
    import hashlib

    n = X.shape[0]
    if n < 2:
        return None
    if X.numel() * X.element_size() > DUPLICATES_MAX_BYTES:
        return None
    flat = X.detach().reshape(n, -1)
    labels = y.detach().cpu().numpy()
    first: dict = {}
    for a in range(0, n, HASH_BLOCK):
        rows = np.ascontiguousarray(flat[a : a + HASH_BLOCK].cpu().numpy() + 0.0)  # + 0.0: -0.0 == 0.0
        for k, row in enumerate(rows):
            j = a + k
            i = first.setdefault(hashlib.blake2b(row, digest_size=16).digest(), j)
            if i != j and labels[i] != labels[j] and torch.equal(flat[i] + 0.0, flat[j] + 0.0):
                return i, j
    return None


def best_linear_margin(X: torch.Tensor, y: torch.Tensor, multiclass: bool, classes: int = 0):
    """``t*`` of the program in the module docstring (``None`` if it is too large to solve)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    n = X.shape[0]
    F = X.detach().reshape(n, -1).cpu().double().numpy()
    d = F.shape[1]
    if not multiclass:
        if n * (d + 1) > LP_MAX_NONZEROS:
            return None
        labels = y.detach().cpu().double().numpy()
        # variables [u (d), t]: -y_i <u, x_i> + t <= 0
        A = np.hstack([-(labels[:, None] * F), np.ones((n, 1))])
        cols = d
        A_ub = A
    else:
        labels = y.detach().cpu().numpy().astype(np.int64)
        K = max(int(classes), int(labels.max()) + 1)
        if K < 2 or n * (K - 1) * (2 * d + 1) > LP_MAX_NONZEROS:
            return None
        cols = K * d
        # variables [M (K x d, row-major), t]: -<m_y, x_i> + <m_j, x_i> + t <= 0 for j != y_i
        rows, columns, values = [], [], []
        r = 0
        ar = np.arange(d)
        for i in range(n):
            for j in range(K):
                if j == labels[i]:
                    continue
                rows += [np.full(d, r), np.full(d, r), [r]]
                columns += [labels[i] * d + ar, j * d + ar, [cols]]
                values += [-F[i], F[i], [1.0]]
                r += 1
        A_ub = coo_matrix(
            (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))), shape=(r, cols + 1)
        ).tocsr()
    cost = np.zeros(cols + 1)
    cost[-1] = -1.0
    bounds = [(-1.0, 1.0)] * cols + [(None, 1.0)]
    res = linprog(cost, A_ub=A_ub, b_ub=np.zeros(A_ub.shape[0]), bounds=bounds, method="highs")
    if res.status != 0:
        return None  # not solved: say nothing
    return float(res.x[-1])


def check_separable(problem) -> None:
    """Refuse data the problem's model cannot separate, where that is cheap to know
    (:class:`~diralign.errors.UserError`, one line).  ``problem`` holds all ``n`` examples."""
    X, y = problem.X, problem.y
    pair = contradictory_pair(X, y)
    if pair is not None:
        i, j = pair
        raise UserError(
            f"the data cannot be separated by any model: examples {i} and {j} have the same input and different "
            f"labels ({_label(y[i], problem.multiclass)} and {_label(y[j], problem.multiclass)}), so the risk cannot fall to 0 and ln(n/L) stays bounded; "
            "remove or relabel contradictory duplicates"
        )
    model = problem.model
    flattens = isinstance(model, nn.Sequential) and isinstance(model[0], nn.Flatten)
    if not is_linear_predictor(model) or (
        X.ndim != 2 and not flattens and not getattr(model, "linear_in_input", False)
    ):
        return  # (a bare nn.Linear on [n, C, H, W] maps the last axis only: not x -> M x)
    classes = 0
    if problem.multiclass:
        with torch.no_grad():
            out = problem.forward(problem.flat_params(), X[:1])
        classes = int(out.shape[-1]) if out.ndim == 2 else 0
    margin = best_linear_margin(X, y, problem.multiclass, classes)
    if margin is None:
        return
    scale = float(X.detach().reshape(X.shape[0], -1).abs().sum(dim=1).max()) if X.numel() else 0.0
    if margin <= MARGIN_FLOOR * max(scale, 1e-300):
        kind = "multi-class " if problem.multiclass else ""
        raise UserError(
            f"the data are not {kind}linearly separable (a linear program finds that no linear predictor makes every "
            "margin positive), so "
            "this linear model's risk cannot fall to 0 and ln(n/L) stays bounded; use separable data or a nonlinear model"
        )


def _label(value, multiclass: bool) -> str:
    return str(int(value)) if multiclass else f"{float(value):+g}"
