"""Sharpness: the top eigenvalue of the Hessian of ``log L``, by warm-started Lanczos.

    diralign run margins --set model=h-alexnet --set data=digits --set subset=32 --set dtype=float64 --set dynamics=gd --set sharpness=true --set target_ln_n_over_L=30

A discrete method with step ``eta`` on ``log L`` is stable along the top Hessian direction
only while ``eta * lambda_max < 2`` (the edge of stability); ``gd``, ``sgd`` and
``loss-based`` run right at it in the late phase, which is why their iterates oscillate
across the flow's path and why the alignment measured at them is step-size noise.  For the
flow in the clock ``s = ln(n/L)`` the same number, divided by ``||grad log L||^2``, is the
stiffness that bounds an explicit integrator's step.

Lanczos (ARPACK through ``scipy.sparse.linalg.eigsh``, largest algebraic eigenvalue) on
exact Hessian-vector products (:meth:`diralign.problem.Problem.curvature`: double backward,
chunked and distributed alike), started from the previous log point's eigenvector: the top
direction turns slowly along a run.  ARPACK builds a whole Lanczos basis of ``ncv`` vectors
before it first tests convergence, so a warm start pays off only with a small basis: measured
on H-AlexNet (16 digits, 15,690 weights, gd from ``ln(n/L)`` = 5.6 to 8.8), a cold start with
20 vectors took 21 products, a warm one with 6 took 7 to 10 (relative error <= 4e-9 against a
1e-8 solve).  Should the small basis not converge, the cold one is run from the warm vector.
Costs are counted like every other instrument's, in gradient evaluations: one for the
gradient graph and two for each product (three when the problem is chunked).
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
COLD_BASIS = 20  # Lanczos vectors from a random start
WARM_BASIS = 6  # from the last eigenvector (see the module docstring)


class Sharpness:
    """``measure(w) -> (lambda_max, grad_evals)`` with the eigenvector kept for a warm start."""

    def __init__(self, problem, tol: float = LANCZOS_TOL):
        self.problem = problem
        self.tol = float(tol)
        self.vector: Optional[np.ndarray] = None

    def state(self) -> Optional[torch.Tensor]:
        # a tensor: checkpoints are read with torch.load(weights_only=True), which refuses arrays
        return None if self.vector is None else torch.from_numpy(self.vector.copy())

    def load_state(self, vector: Optional[torch.Tensor]) -> None:
        self.vector = None if vector is None else vector.detach().cpu().to(torch.float64).numpy().copy()

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
        warm = self.vector is not None and self.vector.shape == (dim,)
        v0 = self.vector if warm else _start(dim)
        tries = [WARM_BASIS, COLD_BASIS] if warm else [COLD_BASIS]
        value = math.nan
        for basis in tries:
            try:
                values, vectors = eigsh(
                    op, k=1, which="LA", v0=v0, tol=self.tol, maxiter=MAX_PRODUCTS, ncv=min(dim - 1, basis)
                )
                value = float(values[0])
                self.vector = vectors[:, 0].copy()
                break
            except ArpackNoConvergence as exc:  # the best Ritz pair so far (a slowly converging top)
                if len(exc.eigenvalues):
                    value = float(exc.eigenvalues[0])
                    self.vector = v0 = exc.eigenvectors[:, 0].copy()
        return value, 1 + products * self.product_cost()


def _start(dim: int) -> np.ndarray:
    """A fixed start vector (runs are reproducible): seeded Gaussian."""
    return np.random.default_rng(0).standard_normal(dim)
