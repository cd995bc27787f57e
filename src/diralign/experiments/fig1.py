"""``diralign run fig1``: Figure 1 -- a squared-ReLU network against its NTK max-margin predictor.

    diralign run fig1 --out runs/fig1                         # the paper's width 10,000
    diralign run fig1 --out runs/fig1-1k --set width=1000     # a quicker look
    diralign plot runs/fig1

Planar points labelled by a random teacher with biases (low-margin points deleted) are
embedded in R^3 as ``(x, 1)``; the 2-homogeneous network
``x -> sum_j s_j relu(<w_j, x>)^2`` (fixed random signs, only ``w`` trained) follows the
configured dynamics (gradient flow by default).  The run directory gets the three panels
of Fig. 1 as snapshots -- (a) the NTK max-margin predictor, (b) the network when every
point is first classified correctly, (c) the network at the end -- and, at every log
point, the normalised prediction surface on a coarse grid, so the plots can show how far
the surface still moves after perfect classification.

The NTK predictor ``x -> sum_j s_j <v_j, x> relu(<w_j, x>)`` (``w`` frozen at init) is a
linear model in its features; its max-margin direction is the hard-margin SVM solved
through its ``n``-variable dual (``ntk_svm_margin``), and training it from ``v = w0`` with
the project's dynamics (``ntk_dynamics``: the flow, or the paper's ``gd``) shows that
training reaches it (``ntk_svm_cos``, the cosine of the trained ``v`` with the SVM).  Why
the training runs in an ``(n+1)``-dimensional basis: the gradient always lies in
``span(phi(x_1), ..., phi(x_n))``, so ``v = v0 + ...`` stays in ``span(v0, phi(x_i))`` and
``v = Q z`` with ``Q`` orthonormal; the dynamics on ``z`` with features ``phi Q`` is the same
flow (or the same ``gd`` iterates: its norms and controller are Euclidean) as on ``v``
itself, at O(n^2) per evaluation instead of O(n m d).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from .. import maxmargin
from ..config import TrainConfig
from ..data.planar import embed, grid, planar_data, plane_extent
from ..errors import UserError
from ..options import inherit, option
from ..probes import surface_distance
from ..problem import Problem
from ..rundir import schema
from ..trainer import Callback, GoalOptions, LoggingOptions, Trainer, initial_state
from .base import Experiment, Setup

SNAPSHOTS = schema.FIG1_SNAPSHOTS
GRID_CHUNK = 512  # grid points per forward pass: a [512, m] activation block


@dataclass
class Fig1Config(TrainConfig):
    data: str = option("teacher", "seeded teacher data, or an .npz file with X [n, 2] and y [n] in {-1, +1}")
    n: int = option(100, "number of examples")
    data_margin: float = option(0.1, "delete points with |teacher| below this many teacher standard deviations")
    teacher_hidden: int = option(8, "hidden width of the random teacher that labels the planar data")
    width: int = option(10_000, "the paper's width")
    signs: str = option("random", "fixed output signs s_j: random (Fig. 1) or alternating (eq. 4.5)")
    init_scale: float = option(1.0, "the network's output at init is O(init_scale^2), whatever the width")
    target_ln_n_over_L: float = inherit(TrainConfig, "target_ln_n_over_L", 100.0)
    batch_size: int = inherit(TrainConfig, "batch_size", 20)
    ntk_dynamics: str = option(
        "flow", "how the NTK model is trained: flow or gd (the paper's; slow, ~200 steps per unit ln(n/L))"
    )
    ntk_integrator: str = option(
        "cvode", "flow integrator for the NTK: its linear late phase is stiff too (dopri5: ~30x the evaluations)"
    )
    ntk_target_ln_n_over_L: float = option(1000.0, "the NTK training runs to here (its angle to the SVM ~ 1/s)")
    surface_resolution: int = option(25, "grid side of the surface logged at every log point")
    contour_resolution: int = option(121, "grid side of the snapshot contour plots")


def _grid_points(lo: float, hi: float, resolution: int, dtype) -> tuple[np.ndarray, torch.Tensor]:
    xs, _, points = grid(lo, hi, resolution, dtype=dtype)
    return xs, embed(points)


@torch.no_grad()
def predict(problem: Problem, w: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``f(x; w)`` on many points in blocks (bounded memory at width 10,000)."""
    points = points.to(device=problem.device, dtype=problem.dtype)
    return torch.cat([problem.forward(w, points[a : a + GRID_CHUNK]) for a in range(0, points.shape[0], GRID_CHUNK)])


class Fig1Recorder(Callback):
    """Snapshot (b) at the first perfect classification, and the normalised surface at every
    log point (the ``surfaces`` array log, kept in step with ``log.csv`` by the writer)."""

    key = "fig1"

    def __init__(self, setup: Setup):
        self.setup = setup

    def _mine(self, state) -> dict:
        return state.callbacks.setdefault(self.key, {"b": None})

    def on_step(self, ctx, state) -> None:
        self._maybe_snapshot_b(ctx, state)

    def _maybe_snapshot_b(self, ctx, state) -> None:
        mine = self._mine(state)
        if mine["b"] is not None or state.ev.correct != ctx.problem.n:
            return
        extras = self.setup.extras
        values = predict(ctx.problem, state.w, extras["contour_points"]).cpu().double().numpy()
        s = math.log(ctx.problem.n) - state.ev.log_risk
        mine["b"] = {"w": state.w.detach().cpu().clone(), "values": values, "ln_n_over_L": s, "step": state.steps}
        if ctx.store is not None:
            write_snapshot(ctx.store, SNAPSHOTS["b"], self.setup, state.w, values, s, state.steps, "network")

    def on_log(self, ctx, state, row) -> None:
        self._maybe_snapshot_b(ctx, state)
        if ctx.store is None:
            return
        surface_points = self.setup.extras["surface_points"]
        values = predict(ctx.problem, state.w, surface_points)
        normalised = values / float(state.w.norm()) ** 2  # f(x; W/||W||): 2-homogeneous
        ctx.store.array_log(schema.SURFACES, surface_points.shape[0], "<f4").append(
            normalised.cpu().numpy().astype(np.float32)
        )


def write_snapshot(
    store, name: str, setup: Setup, weights, values: np.ndarray, s: float, step: int, kind: str, **more
) -> None:
    extras = setup.extras
    store.write_npz(
        name,
        kind=np.array(kind),
        weights=np.asarray(weights.detach().cpu().double().numpy() if torch.is_tensor(weights) else weights),
        signs=extras["signs"].numpy(),
        X=extras["X2"].numpy(),
        y=extras["y"].numpy(),
        xs=extras["contour_xs"],
        values=np.asarray(values, dtype=np.float64).reshape(len(extras["contour_xs"]), -1),
        ln_n_over_L=np.array(float(s)),
        step=np.array(int(step)),
        **more,
    )


def ntk_max_margin(setup: Setup, config, dtype) -> dict:
    """Fig. 1a: the NTK's hard-margin SVM (dual), and the NTK model trained from ``v = w0``."""
    from ..dynamics import make_dynamics
    from ..models import LinearModel, SquaredReLUNTK, homogeneity_degree

    extras = setup.extras
    X, y = extras["X"].to(dtype), extras["y"].to(dtype)
    weight0 = extras["weight0"].to(dtype)
    signs = extras["signs"].to(dtype)
    ntk = SquaredReLUNTK(weight0, signs)
    joint = SquaredReLUNTK(weight0, signs, joint=True)
    joint_report = homogeneity_degree(joint, X)
    with torch.no_grad():
        features = ntk.features(X)  # [n, m*d], v's layout
    svm = maxmargin.hard_margin_svm_dual(features, y)
    # v moves inside span(v0, phi(x_i)): train in an orthonormal basis of it (module docstring).
    v0 = weight0.reshape(-1)
    basis, _ = torch.linalg.qr(torch.cat([features.T, v0[:, None]], dim=1))
    reduced = LinearModel(basis.shape[1]).to(dtype)
    with torch.no_grad():
        reduced.weight.copy_(basis.T @ v0)
    problem = Problem(reduced, features @ basis, y, config.loss, degree=1)
    ntk_config = dataclasses.replace(config, dynamics=config.ntk_dynamics, integrator=config.ntk_integrator)
    # The NTK's own goals: its target, and the run's own step and time caps.
    goals = dataclasses.replace(
        GoalOptions.from_config(config), target_ln_n_over_L=float(config.ntk_target_ln_n_over_L)
    )
    trainer = Trainer(
        problem,
        make_dynamics(problem, ntk_config),
        goals,
        LoggingOptions.from_config(config),
        instruments=False,
        milestones=(),
    )
    start = time.perf_counter()
    state = trainer.train(initial_state(problem, problem.flat_params()))
    z, ev, steps, grad_evals = state.w, state.ev, state.steps, state.grad_evals
    v = basis @ z
    direction = torch.as_tensor(svm.direction, dtype=dtype)
    cos = float(v @ direction / v.norm())
    values = {}
    with torch.no_grad():
        ntk.v.copy_(direction.reshape(weight0.shape))
        for name in ("contour_points", "surface_points"):
            points = extras[name].to(dtype)
            values[name] = (
                torch.cat([ntk(points[a : a + GRID_CHUNK]) for a in range(0, points.shape[0], GRID_CHUNK)])
                .double()
                .numpy()
            )
    return {
        "svm": svm,
        "v": v,
        "values": values,
        "summary": {
            "ntk_svm_margin": svm.margin,
            "ntk_svm_cos": cos,
            "ntk_svm_support": int(len(svm.support)),
            "ntk_dynamics": config.ntk_dynamics
            + (f"/{config.ntk_integrator}" if config.ntk_dynamics == "flow" else ""),
            "ntk_min_normalized_margin": float(ev.margins.min()) / float(z.norm()),
            "ntk_ln_n_over_L": math.log(problem.n) - ev.log_risk,
            "ntk_stop_reason": state.stop_reason,
            "ntk_steps": steps,
            "ntk_grad_evals": grad_evals,
            "ntk_seconds": time.perf_counter() - start,
            "ntk_train_accuracy": ev.correct / problem.n,
            "ntk_homogeneity_degree_v": homogeneity_degree(ntk, X).fitted_degree,
            "ntk_homogeneity_degree_joint": joint_report.fitted_degree,
            "ntk_homogeneity_violation_joint": joint_report.violation,
        },
    }


class Fig1Experiment(Experiment):
    name = "fig1"
    Config = Fig1Config
    description = "Fig. 1: squared-ReLU network vs its NTK max-margin predictor on planar data"

    def setup(self, config, dtype, device) -> Setup:
        from ..models import SquaredReLUNet

        if config.width < 1:
            raise UserError(f"width must be a positive integer, got {config.width}")
        if config.signs not in ("random", "alternating"):
            raise UserError(f"signs must be random or alternating, got {config.signs!r}")
        from ..dynamics import FLOW_INTEGRATORS

        if config.ntk_dynamics not in ("flow", "gd"):
            raise UserError(f"ntk_dynamics must be flow or gd, got {config.ntk_dynamics!r}")
        if config.ntk_dynamics == "flow" and config.ntk_integrator not in FLOW_INTEGRATORS:
            raise UserError(
                f"unknown ntk_integrator {config.ntk_integrator!r}; choose one of {', '.join(FLOW_INTEGRATORS)}"
            )
        if config.surface_resolution < 2 or config.contour_resolution < 2:
            raise UserError("surface_resolution and contour_resolution must be at least 2 grid points per side")
        X2, y, info = planar_data(
            config.data, config.n, config.data_margin, config.seed, config.teacher_hidden, dtype=torch.float64
        )
        X = embed(X2)
        gen = torch.Generator().manual_seed(config.seed + 1)
        model = SquaredReLUNet(3, config.width, config.signs, config.init_scale, generator=gen).to(
            dtype=dtype, device=device
        )
        problem = Problem(
            model,
            X.to(dtype=dtype, device=device),
            y.to(dtype=dtype, device=device),
            config.loss,
            degree=model.homogeneity_degree,
            chunk_size=config.chunk_size or None,
        )
        lo, hi = plane_extent(X2)
        contour_xs, contour_points = _grid_points(lo, hi, config.contour_resolution, torch.float64)
        _, surface_points = _grid_points(lo, hi, config.surface_resolution, torch.float64)
        info.update(width=config.width, signs=config.signs, extent=[lo, hi])
        extras = {
            "X2": X2,
            "X": X,
            "y": y,
            "signs": model.signs.detach().cpu().double(),
            "weight0": model.weight.detach().cpu().double().clone(),
            "contour_xs": contour_xs,
            "contour_points": contour_points,
            "surface_points": surface_points,
        }
        return Setup(problem, problem.flat_params(), info, extras)

    def callbacks(self, setup, config) -> list:
        return [Fig1Recorder(setup)]

    def finish(self, setup, state, run_dir, config) -> dict:
        from ..models import homogeneity_degree

        problem = setup.problem
        mine = state.callbacks.get(Fig1Recorder.key, {})
        s_final = math.log(problem.n) - state.ev.log_risk
        final_values = predict(problem, state.w, setup.extras["contour_points"]).cpu().double().numpy()
        ntk = ntk_max_margin(setup, config, torch.float64)
        problem.load_into_model(state.w)
        net_report = homogeneity_degree(problem.model, problem.X)
        out = dict(ntk["summary"])
        out["homogeneity_degree_measured"] = net_report.fitted_degree
        out["homogeneity_violation"] = net_report.violation
        snapshot_b = mine.get("b")
        ntk_values = ntk["values"]["contour_points"]
        out["surface_distance_ntk_to_final"] = surface_distance(ntk_values, final_values)
        out["surface_distance_ntk_to_first_separable"] = None
        out["surface_distance_first_separable_to_final"] = None
        if snapshot_b is not None:
            out["surface_distance_ntk_to_first_separable"] = surface_distance(ntk_values, snapshot_b["values"])
            out["surface_distance_first_separable_to_final"] = surface_distance(snapshot_b["values"], final_values)
        if run_dir is not None:
            write_snapshot(run_dir, SNAPSHOTS["c"], setup, state.w, final_values, s_final, state.steps, "network")
            write_snapshot(
                run_dir,
                SNAPSHOTS["a"],
                setup,
                ntk["svm"].direction,
                ntk_values,
                out["ntk_ln_n_over_L"],
                out["ntk_steps"],
                "ntk-svm",
                surface_values=ntk["values"]["surface_points"],
            )
        return out
