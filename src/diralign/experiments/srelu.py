"""``diralign run srelu``: Prop. 4.6 on the 2-homogeneous S-ReLU network (eq. 4.5).

    diralign run srelu --out runs/srelu --set width=40 --set target_ln_n_over_L=300

Planar teacher data embedded in R^3 by appending 1 (Appendix A) and scaled so that
``max_i ||x_i|| = 1`` (Prop. 4.6 assumes ``||x_i|| <= 1``); the network is
``x -> sum_j (-1)^j max(0, <w_j, x>)^2``.  The summary adds Prop. 4.6's references, all by
scipy's HiGHS (:mod:`diralign.maxmargin`): the local LP over the final neuron directions
(``local_lp_margin``, to compare with ``min_normalized_margin``), the infinite-width max
margin bracketed by a grid LP and its dual certificate (``infinite_width_margin_lower`` /
``_upper``), and the covering ``eps`` measured from the logged directions
(``covering_epsilon``, at ``covering_ln_n_over_L``), for the bound
``margin >= infinite-width value - 4 eps``.  ``activation=relu`` trains the 1-homogeneous
non-smooth twin instead (Theorem 4.1 does not cover it; no Prop. 4.6 references).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import maxmargin
from ..config import TrainConfig
from ..data.planar import embed, planar_data
from ..errors import UserError
from ..options import inherit, option
from ..problem import Problem
from ..rundir import Run
from .base import Experiment, Setup

ACTIVATIONS = ("squared-relu", "relu")
COVERING_CANDIDATES = 24  # logged times tried as t0 for the covering condition


@dataclass
class SReLUConfig(TrainConfig):
    data: str = option("teacher", '"teacher" (seeded planar teacher) or an .npz with X [n, 2], y [n]')
    n: int = option(40, "number of examples")
    data_margin: float = option(0.1, "teacher standard deviations (see diralign.data.planar)")
    teacher_hidden: int = option(8, "hidden width of the random teacher that labels the planar data")
    width: int = option(40, "number of hidden neurons")
    activation: str = option("squared-relu", "squared-relu (eq. 4.5) or relu (non-smooth twin)")
    init_scale: float = option(1.0, "scale of the initial weights")
    target_ln_n_over_L: float = inherit(TrainConfig, "target_ln_n_over_L", 300.0)
    lp_grid_points: int = option(4000, "Fibonacci grid of S^2 for the infinite-width LP")
    lp_certificate_step: float = option(0.01, "radians: lat-long grid for its dual certificate")


def neuron_panel(w: torch.Tensor, grad: torch.Tensor, width: int) -> dict:
    """Per-neuron shares ``||w_j||^2/||W||^2`` and ``cos(w_j, -grad_j)`` (Lemma E.1 blocks)."""
    rows = w.reshape(width, -1)
    grads = grad.reshape(width, -1)
    norms = rows.norm(dim=1)
    shares = norms**2 / (norms**2).sum()
    # Normalise first: a nearly dead neuron's gradient can be ~1e-200, whose product with
    # anything underflows.  A neuron with no gradient at all gets cos = 0.
    g_norms = grads.norm(dim=1)
    unit_w = rows / torch.where(norms > 0, norms, 1.0)[:, None]
    unit_g = grads / torch.where(g_norms > 0, g_norms, 1.0)[:, None]
    cos = (unit_w * -unit_g).sum(dim=1)
    return {"shares": shares.double().cpu().numpy(), "alignment": cos.double().cpu().numpy()}


def unit_rows(w: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return np.where(norms > 0, w / np.where(norms > 0, norms, 1.0), 0.0)


class SReLUExperiment(Experiment):
    name = "srelu"
    Config = SReLUConfig
    description = "S-ReLU sum_j (-1)^j relu(<w_j,x>)^2 on planar data (Prop. 4.6: local LP, infinite-width margin)"

    def setup(self, config, dtype, device) -> Setup:
        from ..models.signed_relu import SignedReLUNet
        from ..models.squared_relu import SquaredReLUNet

        if config.activation not in ACTIVATIONS:
            raise UserError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {config.activation!r}")
        if config.width < 2:
            raise UserError(f"width must be >= 2 (both signs of eq. 4.5), got {config.width}")
        X2, y, info = planar_data(
            config.data, config.n, config.data_margin, config.seed, config.teacher_hidden, dtype=torch.float64
        )
        X = embed(X2)
        X = X / X.norm(dim=1).max()  # Prop. 4.6 assumes ||x_i|| <= 1
        gen = torch.Generator().manual_seed(config.seed + 1)
        if config.activation == "relu":
            model = SignedReLUNet(3, config.width, config.init_scale, generator=gen)
        else:
            model = SquaredReLUNet(3, config.width, signs="alternating", init_scale=config.init_scale, generator=gen)
        model = model.to(dtype=dtype, device=device)
        problem = Problem(
            model,
            X.to(dtype=dtype, device=device),
            y.to(dtype=dtype, device=device),
            config.loss,
            degree=model.homogeneity_degree,
            chunk_size=config.chunk_size or None,
        )
        info.update(width=config.width, activation=config.activation)
        return Setup(problem, problem.flat_params(), info, {"X": X, "y": y, "signs": model.signs.double().cpu()})

    def finish(self, setup, state, run_dir, config) -> dict:
        w = state.w.detach().double().cpu()
        panel = neuron_panel(w, state.ev.grad.detach().double().cpu(), config.width)
        out = {
            "neuron_share_max": float(panel["shares"].max()),
            "neuron_alignment_weighted": float((panel["shares"] * panel["alignment"]).sum()),
        }
        if config.activation != "squared-relu":
            return out
        X, y, signs = setup.extras["X"].numpy(), setup.extras["y"].numpy(), setup.extras["signs"].numpy()
        rows = w.reshape(config.width, -1).numpy()
        theta = unit_rows(rows)
        shares = panel["shares"]
        features = maxmargin.srelu_features(X, y, theta, signs)
        local = maxmargin.srelu_local_lp(X, y, theta, signs)
        out.update(
            trained_margin_from_shares=float((features @ shares).min()),  # = min_i p_i/||W||^2 (eq. 4.5)
            local_lp_margin=local.value,
            local_lp_share_distance=float(np.abs(local.weights - shares).sum()),
        )
        wide = maxmargin.infinite_width_margin(X, y, config.lp_grid_points, config.lp_certificate_step)
        out.update(infinite_width_margin_lower=wide.lower, infinite_width_margin_upper=wide.upper)
        out.update(covering(run_dir, theta, signs, config.width, config.lp_certificate_step))
        return out


def covering(run_dir, theta_final: np.ndarray, signs: np.ndarray, width: int, step: float) -> dict:
    """The smallest covering ``eps`` over logged times ``t0`` (with ``theta_bar`` = final directions)."""
    empty = {"covering_epsilon": None, "covering_ln_n_over_L": None}
    if run_dir is None:
        return empty
    run = Run(run_dir.path)
    directions = run.directions
    if directions is None or len(directions) == 0:
        return empty
    s = run.ln_n_over_L
    count = len(directions)
    picks = np.unique(np.linspace(0, count - 1, min(COVERING_CANDIDATES, count)).round().astype(int))
    best = (math.inf, None)
    for i in picks:
        theta0 = unit_rows(np.asarray(directions[i], dtype=np.float64).reshape(width, -1))
        eps = maxmargin.covering_epsilon(theta0, theta_final, signs, step)
        if eps < best[0]:
            best = (eps, float(s[i]))
    return {"covering_epsilon": best[0], "covering_ln_n_over_L": best[1]}
