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


@dataclass
class DualSVMSolution(SVMSolution):
    alpha: np.ndarray  # dual variables of min ||u||^2/2 s.t. y_i <phi_i, u> >= 1


def hard_margin_svm_dual(features, y) -> DualSVMSolution:
    """The hard-margin SVM in feature space through its dual (``n`` variables).

    ``max_{alpha >= 0} sum_i alpha_i - ||sum_i alpha_i y_i phi_i||^2 / 2`` with the
    quadratic form from the ``n x n`` Gram matrix, factored as ``Q = R^T R`` (symmetric
    eigendecomposition, negative rounding eigenvalues dropped) so cvxpy sees a sum of
    squares.  Why: the NTK features of Fig. 1 have ``3m = 30,000`` coordinates but only
    ``n`` examples.  The primal direction is ``u = sum_i alpha_i y_i phi_i / ||.||`` and the
    margin ``min_i y_i <phi_i, u>`` is measured on the features, not read off the solver.
    The Gram matrix is scaled to unit mean diagonal first (the direction is unchanged).
    """
    import cvxpy as cp

    F = _as_numpy(features)
    y = _as_numpy(y)
    if F.ndim != 2 or F.shape[0] != y.shape[0]:
        raise ValueError(f"features must be [n, p] with n = len(y), got {F.shape} and {y.shape}")
    gram = F @ F.T
    scale = float(np.mean(np.diag(gram)))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("hard-margin SVM: all feature vectors are zero or non-finite")
    Q = (y[:, None] * y[None, :]) * (gram / scale)
    eigenvalues, eigenvectors = np.linalg.eigh((Q + Q.T) / 2)
    keep = eigenvalues > eigenvalues.max() * 1e-14
    R = np.sqrt(eigenvalues[keep])[:, None] * eigenvectors[:, keep].T
    alpha = cp.Variable(F.shape[0], nonneg=True)
    problem = cp.Problem(cp.Maximize(cp.sum(alpha) - 0.5 * cp.sum_squares(R @ alpha)))
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    if problem.status not in ("optimal", "optimal_inaccurate") or alpha.value is None:
        raise ValueError(f"hard-margin SVM dual failed ({problem.status}); are the features separable?")
    a = np.maximum(np.asarray(alpha.value), 0.0)
    u = F.T @ (a * y)
    norm = float(np.linalg.norm(u))
    if not norm > 0:
        raise ValueError("hard-margin SVM dual returned alpha = 0; are the features separable?")
    direction = u / norm
    margins = y * (F @ direction)
    gamma = float(margins.min())
    support = np.flatnonzero(a > 1e-6 * a.max())
    return DualSVMSolution(direction, gamma, support, a / scale)  # alpha of the unscaled Gram matrix


# -- Prop. 4.6 (S-ReLU, eq. 4.5): linear programs, solved by scipy's HiGHS ----------------


@dataclass
class LPSolution:
    value: float  # the optimal margin
    weights: np.ndarray  # primal weights (simplex s, or the signed measure on the grid)
    dual: np.ndarray  # q in the simplex Delta_n: the optimal weighting of the examples


def _max_min_lp(features: np.ndarray, signed: bool) -> LPSolution:
    """``max_{s} min_i (features @ s)_i`` over the simplex (``signed=False``) or over signed
    weights with ``sum |s_j| <= 1`` (``signed=True``, as ``s = a - b`` with ``a, b >= 0``)."""
    from scipy.optimize import linprog

    n, m = features.shape
    A = np.hstack([features, -features]) if signed else features
    cols = A.shape[1]
    cost = np.zeros(cols + 1)
    cost[-1] = -1.0  # maximise t
    A_ub = np.hstack([-A, np.ones((n, 1))])  # t - (A s)_i <= 0
    b_ub = np.zeros(n)
    mass = np.concatenate([np.ones(cols), [0.0]])[None, :]
    if signed:
        A_ub, b_ub = np.vstack([A_ub, mass]), np.concatenate([b_ub, [1.0]])
        A_eq = b_eq = None
    else:
        A_eq, b_eq = mass, np.array([1.0])
    bounds = [(0, None)] * cols + [(None, None)]
    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=bounds, method="highs")
    if res.status != 0:
        raise ValueError(f"margin LP failed: {res.message}")
    weights = res.x[:cols]
    if signed:
        weights = weights[:m] - weights[m:]
    q = np.maximum(-res.ineqlin.marginals[:n], 0.0)
    q = q / q.sum() if q.sum() > 0 else np.full(n, 1.0 / n)
    return LPSolution(float(res.x[-1]), weights, q)


def srelu_features(X, y, directions, signs) -> np.ndarray:
    """``phi_ij(theta_j) = y_i s_j max(0, <x_i, theta_j>)^2`` (eq. 4.5; ``s_j = (-1)^j``)."""
    X, y = _as_numpy(X), _as_numpy(y)
    directions, signs = _as_numpy(directions), _as_numpy(signs)
    return y[:, None] * signs[None, :] * np.maximum(X @ directions.T, 0.0) ** 2


def srelu_local_lp(X, y, directions, signs) -> LPSolution:
    """Prop. 4.6, local guarantee: ``max_{s in Delta_m} min_i sum_j s_j phi_ij(theta_j)``
    over fixed neuron directions ``theta_j`` (rows of ``directions``; zero rows allowed)."""
    return _max_min_lp(srelu_features(X, y, directions, signs), signed=False)


def fibonacci_sphere(count: int) -> np.ndarray:
    """``count`` nearly uniform unit vectors of R^3 (Fibonacci lattice)."""
    i = np.arange(count) + 0.5
    z = 1.0 - 2.0 * i / count
    radius = np.sqrt(1.0 - z * z)
    angle = np.pi * (1.0 + 5.0**0.5) * i
    return np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=1)


def latlong_sphere(step: float) -> tuple[np.ndarray, float]:
    """A latitude-longitude grid of the unit sphere with spacing ``<= step`` radians and its
    certified covering radius: every unit vector lies within geodesic (hence chordal)
    distance ``sqrt(dlat^2 + dlon^2) / 2`` of a grid point (a cell's half diagonal; east-west
    distances shrink by ``cos(latitude) <= 1``)."""
    n_lat = int(np.ceil(np.pi / step)) + 1
    n_lon = int(np.ceil(2 * np.pi / step))
    lat = np.linspace(-np.pi / 2, np.pi / 2, n_lat)
    lon = np.arange(n_lon) * (2 * np.pi / n_lon)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    points = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1).reshape(-1, 3)
    return points, 0.5 * float(np.hypot(lat[1] - lat[0], lon[1] - lon[0]))


@dataclass
class InfiniteWidthMargin:
    lower: float  # the grid LP value: a signed measure on the grid is feasible
    upper: float  # a certified upper bound from the LP's dual weights q (see below)
    grid_points: int
    solution: LPSolution


def infinite_width_margin(
    X, y, grid_points: int = 4000, certificate_step: float = 0.01, rounds: int = 8, tol: float = 1e-6
) -> InfiniteWidthMargin:
    """Prop. 4.6's global value ``max_nu min_i y_i int max(0, <x_i, theta>)^2 d nu(theta)`` over
    signed measures of mass <= 1 on the sphere S^2 (``X [n, 3]``), bracketed.

    Lower bound: the LP over measures on a grid (a Fibonacci grid, refined by column
    generation: each round adds the fine-grid points where the dual's witness function is
    largest).  Upper bound: by the minimax theorem the value is
    ``min_{q in Delta_n} max_theta |sum_i q_i y_i max(0, <x_i, theta>)^2|``, so the LP's dual
    ``q`` evaluated on a fine latitude-longitude grid of covering radius ``h`` bounds it above,
    once the gaps between grid points are paid for: for ``g(theta) = sum_i q_i y_i
    max(0, <x_i, theta>)^2`` and unit ``theta`` within ``h`` of a grid point ``theta_g``,
    ``|g(theta)| <= |g(theta_g)| + h ||P grad g(theta_g)|| + h^2 (|g(theta_g)| + H/2)``
    (Taylor; ``P`` projects off ``theta_g``, the radial step is at most ``h^2/2`` and
    ``d g/d r = 2g`` by homogeneity, ``H = 2 sum_i q_i ||x_i||^2`` bounds the Hessian).
    """
    X, y = _as_numpy(X), _as_numpy(y)
    if X.ndim != 2 or X.shape[1] != 3:
        raise ValueError(f"the infinite-width LP grids S^2: X must be [n, 3], got {X.shape}")
    grid = fibonacci_sphere(grid_points)
    fine, h = latlong_sphere(certificate_step)
    fine_active = np.maximum(fine @ X.T, 0.0)  # [G_fine, n]
    fine_features = fine_active**2
    hessian_per_q = 2.0 * (X * X).sum(axis=1)
    upper = np.inf
    for _ in range(max(rounds, 1)):
        solution = _max_min_lp(y[:, None] * np.maximum(X @ grid.T, 0.0) ** 2, signed=True)
        qy = solution.dual * y
        witness = np.abs(fine_features @ qy)
        grad = 2.0 * (fine_active * qy) @ X  # [G_fine, 3]
        tangential = np.linalg.norm(grad - (grad * fine).sum(axis=1, keepdims=True) * fine, axis=1)
        bound = witness + h * tangential + h * h * (witness + 0.5 * float(solution.dual @ hessian_per_q))
        upper = min(upper, float(bound.max()))
        if witness.max() <= solution.value * (1.0 + tol):
            break  # no fine-grid column can improve the grid LP
        grid = np.vstack([grid, fine[np.argsort(witness)[-8:]]])
    return InfiniteWidthMargin(solution.value, upper, len(grid), solution)


def covering_epsilon(directions_t0, limit_directions, signs, step: float = 0.01) -> float:
    """Prop. 4.6's covering condition at one time ``t0``: the smallest ``eps`` with
    ``max_j ||theta_j(t0) - theta_bar_j|| <= eps`` and, for every unit ``theta'``, both the
    even-``j`` and the odd-``j`` neurons at ``t0`` within ``eps`` of ``theta'`` (by sign group).
    The sphere part is a maximum over a latitude-longitude grid plus its covering radius
    (an upper bound, so the returned ``eps`` is conservative)."""
    theta0 = _as_numpy(directions_t0)
    limit = _as_numpy(limit_directions)
    signs = _as_numpy(signs)
    moved = float(np.linalg.norm(theta0 - limit, axis=1).max())
    fine, radius = latlong_sphere(step)
    cover = 0.0
    for sign in (1.0, -1.0):
        group = theta0[signs == sign]
        if len(group) == 0:
            return float("inf")
        # ||a - b||^2 = 2 - 2 <a, b> for unit vectors: nearest neuron = largest inner product.
        nearest = (fine @ group.T).max(axis=1)
        cover = max(cover, float(np.sqrt(np.maximum(2.0 - 2.0 * nearest, 0.0)).max()))
    return max(moved, cover + radius)


def svm_summary(X, y, direction) -> dict:
    """Cosine of a learned input-space direction (a torch tensor) with the hard-margin SVM's."""
    try:
        svm = hard_margin_svm(X, y)
    except ValueError:
        return {"svm_cos": None, "svm_margin": None}
    d = direction.detach().cpu().double().numpy()
    cos = float(d @ svm.direction / max(float((d @ d) ** 0.5), 1e-300))
    return {"svm_cos": cos, "svm_margin": svm.margin}
