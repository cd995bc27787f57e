"""Reference max-margin solutions, computed independently of the training code.

* :func:`hard_margin_svm` -- ``argmax_{||u||<=1} min_i y_i <x_i, u>`` (no bias), by cvxpy
  with the Clarabel interior-point solver on the primal ``min ||u||^2/2, y_i<x_i,u> >= 1``.
* :func:`svm_sklearn` -- the same direction from sklearn's ``SVC(kernel="linear")`` with a
  huge ``C`` (a soft-margin solver pushed to the hard-margin limit), as a cross-check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SVMSolution:
    direction: np.ndarray  # unit vector u
    margin: float  # gamma_svm = min_i y_i <x_i, u>
    support: np.ndarray  # indices with active constraints


def _as_numpy(a) -> np.ndarray:
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return a.detach().cpu().double().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(a, dtype=np.float64)


def hard_margin_svm(X, y) -> SVMSolution:
    import cvxpy as cp

    X = _as_numpy(X)
    y = _as_numpy(y)
    u = cp.Variable(X.shape[1])
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(u)), [cp.multiply(y, X @ u) >= 1])
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    if problem.status not in ("optimal", "optimal_inaccurate") or u.value is None:
        raise ValueError(f"hard-margin SVM failed ({problem.status}); is the data linearly separable?")
    w = np.asarray(u.value)
    direction = w / np.linalg.norm(w)
    margins = y * (X @ direction)
    gamma = float(margins.min())
    support = np.flatnonzero(margins <= gamma * (1 + 1e-6))
    return SVMSolution(direction, gamma, support)


def svm_sklearn(X, y, C: float = 1e10) -> SVMSolution:
    from sklearn.svm import SVC

    X = _as_numpy(X)
    y = _as_numpy(y)
    # SVC always fits an intercept; a constant feature cannot remove it, so we fit on
    # the data mirrored through the origin, which forces the optimal intercept to 0.
    Xm = np.vstack([X, -X])
    ym = np.concatenate([y, -y])
    clf = SVC(kernel="linear", C=C, tol=1e-10, max_iter=-1).fit(Xm, ym)
    w = clf.coef_.ravel()
    direction = w / np.linalg.norm(w)
    margins = y * (X @ direction)
    gamma = float(margins.min())
    return SVMSolution(direction, gamma, np.flatnonzero(margins <= gamma * (1 + 1e-6)))
