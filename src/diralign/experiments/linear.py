"""``diralign run linear``: a bias-free linear model on separable data.

    diralign run linear --out runs/linear --set target_ln_n_over_L=200

Gradient flow on a linear model converges in direction to the hard-margin SVM
(Soudry et al. 2018); ``svm_cos`` in the summary measures it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..data import binary_data
from ..maxmargin import svm_summary
from ..options import inherit, option
from ..problem import Problem
from .base import Experiment, Setup


@dataclass
class LinearConfig(TrainConfig):
    data: str = option("separable", '"separable" (seeded Gaussian) or a path to an .npz file with X [n,d], y [n]')
    n: int = option(60, "number of examples")
    d: int = option(6, "input dimension")
    data_margin: float = option(
        0.1, "delete points closer to the separator than this (teacher standard deviations for planar data)"
    )
    init_scale: float = option(0.1, "scale of the initial weights")
    target_ln_n_over_L: float = inherit(TrainConfig, "target_ln_n_over_L", 200.0)


class LinearExperiment(Experiment):
    name = "linear"
    Config = LinearConfig
    description = "bias-free linear model on separable data (converges to the SVM direction)"

    def setup(self, config, dtype, device) -> Setup:
        from ..models import LinearModel

        X, y, info = binary_data(config.data, config.n, config.d, config.data_margin, config.seed, dtype)
        gen = torch.Generator().manual_seed(config.seed + 1)
        model = LinearModel(X.shape[1], init_scale=config.init_scale, generator=gen).to(dtype=dtype, device=device)
        problem = Problem(
            model, X.to(device), y.to(device), config.loss, degree=1, chunk_size=config.chunk_size or None
        )
        return Setup(problem, problem.flat_params(), info, {"X": X, "y": y})

    def finish(self, setup, state, run_dir, config) -> dict:
        return svm_summary(setup.extras["X"], setup.extras["y"], state.w)
