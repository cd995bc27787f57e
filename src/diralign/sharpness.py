"""Sharpness: the top eigenvalue of the Hessian of ``log L``, by warm-started Lanczos.

    diralign run margins --set model=h-alexnet --set subset=64 --set dtype=float64 --set dynamics=gd --set sharpness=true

A discrete method with step ``eta`` on ``log L`` is stable along the top Hessian direction
only while ``eta * lambda_max < 2`` (the edge of stability); ``gd``, ``sgd`` and
``loss-based`` run right at it in the late phase, which is why their iterates oscillate
across the flow's path and why the alignment measured at them is step-size noise.  For the
flow in the clock ``s = ln(n/L)`` the same number, divided by ``||grad log L||^2``, is the
stiffness that bounds an explicit integrator's step.

Lanczos (ARPACK through ``scipy.sparse.linalg.eigsh``, largest algebraic eigenvalue) on
exact Hessian-vector products (:meth:`diralign.problem.Problem.curvature`: double backward,
chunked and distributed alike), started from the previous log point's eigenvector: the top
direction turns slowly along a run, so a warm start needs a handful of products where a cold
one needs tens.  Costs are counted like every other instrument's, in gradient evaluations:
one for the gradient graph and two for each product (three when the problem is chunked).
For ReLU / max-pool networks the Hessian is that of the current activation pattern (the
kinks' second derivatives are zero almost everywhere).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

LANCZOS_TOL = 1e-4  # relative accuracy of the top Ritz value
MAX_PRODUCTS = 300


class Sharpness:
    """``measure(w) -> (lambda_max, grad_evals)`` with the eigenvector kept for a warm start."""

    def __init__(self, problem, tol: float = LANCZOS_TOL):
        self.problem = problem
        self.tol = float(tol)
        self.vector: Optional[np.ndarray] = None

    def product_cost(self) -> int:
        chunk = self.problem.chunk_size
        chunked = bool(chunk) and chunk < self.problem.X.shape[0]
        return 3 if chunked else 2

    def measure(self, w: torch.Tensor) -> tuple[float, int]:
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

        problem = self.problem
        curvature = problem.curvature(w)
        products = 0
        dim = w.numel()

        def matvec(v: np.ndarray) -> np.ndarray:
            nonlocal products
            products += 1
            t = torch.as_tensor(np.ascontiguousarray(v).reshape(-1), dtype=problem.dtype, device=problem.device)
            return curvature.hvp(t).detach().to(device="cpu", dtype=torch.float64).numpy()

        if dim <= 2:  # ARPACK needs k < n; a 1-2 parameter model is read off the dense Hessian
            dense = np.stack([matvec(e) for e in np.eye(dim)], axis=1)
            value = float(np.linalg.eigvalsh(0.5 * (dense + dense.T))[-1])
            return value, 1 + products * self.product_cost()
        op = LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
        v0 = self.vector if self.vector is not None and self.vector.shape == (dim,) else _start(dim)
        try:
            values, vectors = eigsh(
                op, k=1, which="LA", v0=v0, tol=self.tol, maxiter=MAX_PRODUCTS, ncv=min(dim - 1, 20)
            )
            value = float(values[0])
            self.vector = vectors[:, 0].copy()
        except ArpackNoConvergence as exc:  # the best Ritz pair so far (a slowly converging top)
            if len(exc.eigenvalues):
                value = float(exc.eigenvalues[0])
                self.vector = exc.eigenvectors[:, 0].copy()
            else:
                value = math.nan
        return value, 1 + products * self.product_cost()


def _start(dim: int) -> np.ndarray:
    """A fixed start vector (runs are reproducible): seeded Gaussian."""
    return np.random.default_rng(0).standard_normal(dim)
