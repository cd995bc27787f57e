"""``diralign run deep-linear``: Prop. 4.4 on a deep linear network.

    diralign run deep-linear --out runs/deep-linear

Measures what Prop. 4.4 predicts: each layer becomes rank one (``sigma_1/||A_j||_F -> 1``),
adjacent layers align, the end-to-end product tends to the hard-margin SVM direction
(``svm_cos``), and the min normalised margin tends to ``gamma_svm / k^{k/2}``
(``margin_ratio``; balanced layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..data import binary_data
from ..errors import UserError
from ..maxmargin import svm_summary
from ..options import inherit, option
from ..problem import Problem
from .base import Experiment, Setup


@dataclass
class DeepLinearConfig(TrainConfig):
    data: str = option("separable", "the data set")
    n: int = option(60, "number of examples")
    d: int = option(6, "input dimension")
    data_margin: float = option(
        0.1, "delete points closer to the separator than this (teacher standard deviations for planar data)"
    )
    widths: tuple[int, ...] = option((8, 8), "hidden widths; depth = len(widths) + 1")
    init_scale: float = option(1.0, "Frobenius norm of every layer at initialisation")
    layer_scales: tuple[float, ...] = option(
        (),
        "per-layer Frobenius norms at init, A_1 first (empty: all init_scale).  Unbalanced layers show Lemma E.1's shares ||A_j||^2/||W||^2 -> 1/k (the flow conserves the gaps).",
    )
    target_ln_n_over_L: float = inherit(TrainConfig, "target_ln_n_over_L", 1000.0)


def layer_alignment(layers: list[torch.Tensor]) -> list[float]:
    """``|v_j^T u_{j+1}|``: top left singular vector of A_j against the top right one of A_{j+1}."""
    out = []
    for a, b in zip(layers[:-1], layers[1:]):
        u_a = torch.linalg.svd(a)[0][:, 0]
        v_b = torch.linalg.svd(b)[2][0, :]
        out.append(float((u_a @ v_b).abs()))
    return out


class DeepLinearExperiment(Experiment):
    name = "deep-linear"
    Config = DeepLinearConfig
    description = "deep linear network A_k...A_1 x (Prop. 4.4: rank one layers, SVM direction)"

    def setup(self, config, dtype, device) -> Setup:
        from ..models import DeepLinear

        if any(w < 1 for w in config.widths):
            raise UserError(f"widths must be positive integers, got {config.widths}")
        X, y, info = binary_data(config.data, config.n, config.d, config.data_margin, config.seed, dtype)
        gen = torch.Generator().manual_seed(config.seed + 1)
        model = DeepLinear(X.shape[1], config.widths, config.init_scale, generator=gen).to(dtype=dtype, device=device)
        if config.layer_scales:
            if len(config.layer_scales) != len(model.layers) or min(config.layer_scales) <= 0:
                raise UserError(
                    f"layer_scales needs {len(model.layers)} positive norms (one per layer), got {config.layer_scales}"
                )
            with torch.no_grad():
                for a, scale in zip(model.layers, config.layer_scales):
                    a.mul_(scale / a.norm())
        problem = Problem(
            model,
            X.to(device),
            y.to(device),
            config.loss,
            degree=model.homogeneity_degree,
            chunk_size=config.chunk_size or None,
        )
        return Setup(problem, problem.flat_params(), info, {"X": X, "y": y, "model": model})

    def finish(self, setup, state, run_dir, config) -> dict:
        problem = setup.problem
        model = problem.load_into_model(state.w)
        layers = [a.detach().cpu().double() for a in model.layers]
        k = len(layers)
        out = svm_summary(setup.extras["X"], setup.extras["y"], model.end_to_end())
        out["layer_rank_one_ratios"] = [float(torch.linalg.svdvals(a)[0] / a.norm()) for a in layers]
        out["layer_alignment"] = layer_alignment(layers)
        out["layer_norm_shares"] = [float(a.norm() ** 2 / state.w.norm() ** 2) for a in layers]
        margin = float(state.ev.margins.min()) / float(state.w.norm()) ** k
        if out["svm_margin"]:
            out["margin_ratio"] = margin / (out["svm_margin"] / k ** (k / 2))
        else:
            out["margin_ratio"] = None
        return out
