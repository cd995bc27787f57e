"""``diralign run linear``: a bias-free linear model on separable data.

    diralign run linear --out runs/linear --set target_ln_n_over_L=200

Gradient flow on a linear model converges in direction to the hard-margin SVM
(Soudry et al. 2018); ``svm_cos`` in the summary measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import maxmargin
from ..config import TrainConfig
from ..data import load_npz, separable_gaussian, validate_binary
from ..errors import UserError
from ..problem import Problem
from .base import Experiment, Setup


@dataclass
class LinearConfig(TrainConfig):
    data: str = "separable"  # "separable" (seeded Gaussian) or a path to an .npz file with X [n,d], y [n]
    n: int = 60
    d: int = 6
    data_margin: float = 0.1
    init_scale: float = 0.1
    target_ln_n_over_L: float = 200.0


def binary_data(config, dtype):
    """The built-in separable set, or the user's ``.npz`` (validated)."""
    if config.data == "separable":
        if config.n < 2 or config.d < 1:
            raise UserError(f"need n >= 2 and d >= 1 (got n={config.n}, d={config.d})")
        X, y = separable_gaussian(config.n, config.d, config.data_margin, config.seed, dtype=dtype)
        return X, y, {"data": "separable", "n": config.n, "d": config.d}
    X, y = load_npz(config.data, dtype=dtype)
    y = validate_binary(y, config.data).to(dtype)
    return X, y, {"data": str(config.data), "n": int(X.shape[0]), "d": int(X.shape[1])}


def svm_summary(X, y, direction: torch.Tensor) -> dict:
    """Cosine of a learned input-space direction with the hard-margin SVM's."""
    try:
        svm = maxmargin.hard_margin_svm(X, y)
    except ValueError:
        return {"svm_cos": None, "svm_margin": None}
    d = direction.detach().cpu().double().numpy()
    cos = float(d @ svm.direction / max(float((d @ d) ** 0.5), 1e-300))
    return {"svm_cos": cos, "svm_margin": svm.margin}


class LinearExperiment(Experiment):
    name = "linear"
    Config = LinearConfig
    description = "bias-free linear model on separable data (converges to the SVM direction)"

    def setup(self, config, dtype, device) -> Setup:
        from ..models import LinearModel

        X, y, info = binary_data(config, dtype)
        gen = torch.Generator().manual_seed(config.seed + 1)
        model = LinearModel(X.shape[1], init_scale=config.init_scale, generator=gen).to(dtype=dtype, device=device)
        problem = Problem(model, X.to(device), y.to(device), config.loss, degree=1, chunk_size=config.chunk_size or None)
        return Setup(problem, problem.flat_params(), info, {"X": X, "y": y})

    def finish(self, setup, state, run_dir, config) -> dict:
        return svm_summary(setup.extras["X"], setup.extras["y"], state.w)
