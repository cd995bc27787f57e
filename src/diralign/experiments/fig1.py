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
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import maxmargin
from ..config import TrainConfig
from ..data.planar import embed, grid, plane_extent, planar_data
from ..errors import UserError
from ..problem import Problem
from ..store import ArrayLog, read_array_log
from ..trainer import Callback
from .base import Experiment, Setup

SNAPSHOTS = {"a": "fig1_a.npz", "b": "fig1_b.npz", "c": "fig1_c.npz"}
SURFACES = "surfaces"  # ArrayLog name: the normalised surface at each log point
ALIGNMENT_MILESTONES = (10.0, 30.0, 100.0)
GRID_CHUNK = 512  # grid points per forward pass: a [512, m] activation block


@dataclass
class Fig1Config(TrainConfig):
    data: str = "teacher"  # seeded teacher data, or an .npz file with X [n, 2] and y [n] in {-1, +1}
    n: int = 100
    data_margin: float = 0.1  # delete points with |teacher| below this many teacher standard deviations
    teacher_hidden: int = 8
    width: int = 10_000  # the paper's width
    signs: str = "random"  # fixed output signs s_j: random (Fig. 1) or alternating (eq. 4.5)
    init_scale: float = 1.0  # the network's output at init is O(init_scale^2), whatever the width
    target_ln_n_over_L: float = 100.0
    batch_size: int = 20  # dynamics=sgd: minibatches of 20 of the 100 points
    ntk_dynamics: str = "flow"  # how the NTK model is trained: flow or gd (the paper's; slow, ~200 steps per unit ln(n/L))
    ntk_integrator: str = "cvode"  # flow integrator for the NTK: its linear late phase is stiff too (dopri5: ~30x the evaluations)
    ntk_target_ln_n_over_L: float = 1000.0  # the NTK training runs to here (its angle to the SVM ~ 1/s)
    surface_resolution: int = 25  # grid side of the surface logged at every log point
    contour_resolution: int = 121  # grid side of the snapshot contour plots


def _grid_points(lo: float, hi: float, resolution: int, dtype) -> tuple[np.ndarray, torch.Tensor]:
    xs, _, points = grid(lo, hi, resolution, dtype=dtype)
    return xs, embed(points)


@torch.no_grad()
def predict(problem: Problem, w: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``f(x; w)`` on many points in blocks (bounded memory at width 10,000)."""
    points = points.to(device=problem.device, dtype=problem.dtype)
    return torch.cat([problem.forward(w, points[a : a + GRID_CHUNK]) for a in range(0, points.shape[0], GRID_CHUNK)])


def surface_distance(a: np.ndarray, b: np.ndarray) -> float:
    """RMS distance of two surfaces, each first divided by its own RMS (scale-free)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = np.sqrt(np.mean(a * a)), np.sqrt(np.mean(b * b))
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.sqrt(np.mean((a / na - b / nb) ** 2)))


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


class Fig1Recorder(Callback):
    """Snapshot (b) at the first perfect classification; the normalised surface at every log
    point (the ``surfaces`` array log, kept in step with ``log.csv`` across resumes); the
    alignment at ``ln(n/L)`` = 10, 30, 100, interpolated between log points."""

    key = "fig1"

    def __init__(self, setup: Setup):
        self.setup = setup
        self.surfaces: Optional[ArrayLog] = None

    def _mine(self, state) -> dict:
        return state.callbacks.setdefault(self.key, {"surface_rows": 0, "alignment_at": {}, "last": None, "b": None})

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
            write_snapshot(ctx.store.path / SNAPSHOTS["b"], self.setup, state.w, values, s, state.steps, "network")

    def on_log(self, ctx, state, row) -> None:
        mine = self._mine(state)
        self._maybe_snapshot_b(ctx, state)
        s, cos = row["ln_n_over_L"], row.get("alignment_cos", float("nan"))
        last = mine["last"]
        for milestone in ALIGNMENT_MILESTONES:
            key = f"{milestone:g}"
            if key in mine["alignment_at"] or s < milestone:
                continue
            if last is not None and last[0] < milestone and s > last[0]:
                t = (milestone - last[0]) / (s - last[0])
                mine["alignment_at"][key] = last[1] + t * (cos - last[1])
            else:
                mine["alignment_at"][key] = cos
        mine["last"] = (s, cos)
        if ctx.store is None:
            return
        if self.surfaces is None:
            width = self.setup.extras["surface_points"].shape[0]
            self.surfaces = ArrayLog(ctx.store.path, SURFACES, width, "<f4")
            # A resumed run: drop rows written after the checkpoint, as the store does for log.csv.
            self.surfaces.truncate(mine["surface_rows"])
        values = predict(ctx.problem, state.w, self.setup.extras["surface_points"])
        normalised = values / float(state.w.norm()) ** 2  # f(x; W/||W||): 2-homogeneous
        self.surfaces.append(normalised.cpu().numpy().astype(np.float32))
        mine["surface_rows"] += 1

    def close(self) -> None:
        if self.surfaces is not None:
            self.surfaces.close()
            self.surfaces = None


def write_snapshot(path: Path, setup: Setup, weights, values: np.ndarray, s: float, step: int, kind: str, **more) -> None:
    extras = setup.extras
    _save_npz(
        path,
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
    dynamics = make_dynamics(problem, dataclasses.replace(config, dynamics=config.ntk_dynamics, integrator=config.ntk_integrator))
    z = problem.flat_params()
    ev = problem.evaluate(z)
    steps = grad_evals = 0
    start = time.perf_counter()
    target = float(config.ntk_target_ln_n_over_L)
    while math.log(problem.n) - ev.log_risk < target:
        result = dynamics.step(z, ev, target=target)
        z, ev = result.w, result.ev
        steps += 1
        grad_evals += result.grad_evals
    v = basis @ z
    direction = torch.as_tensor(svm.direction, dtype=dtype)
    cos = float(v @ direction / v.norm())
    values = {}
    with torch.no_grad():
        ntk.v.copy_(direction.reshape(weight0.shape))
        for name in ("contour_points", "surface_points"):
            points = extras[name].to(dtype)
            values[name] = torch.cat([ntk(points[a : a + GRID_CHUNK]) for a in range(0, points.shape[0], GRID_CHUNK)]).double().numpy()
    return {
        "svm": svm,
        "v": v,
        "values": values,
        "summary": {
            "ntk_svm_margin": svm.margin,
            "ntk_svm_cos": cos,
            "ntk_svm_support": int(len(svm.support)),
            "ntk_dynamics": config.ntk_dynamics + (f"/{config.ntk_integrator}" if config.ntk_dynamics == "flow" else ""),
            "ntk_min_normalized_margin": float(ev.margins.min()) / float(z.norm()),
            "ntk_ln_n_over_L": math.log(problem.n) - ev.log_risk,
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
            raise UserError(f"unknown ntk_integrator {config.ntk_integrator!r}; choose one of {', '.join(FLOW_INTEGRATORS)}")
        if config.surface_resolution < 2 or config.contour_resolution < 2:
            raise UserError("surface_resolution and contour_resolution must be at least 2 grid points per side")
        X2, y, info = planar_data(config.data, config.n, config.data_margin, config.seed, config.teacher_hidden, dtype=torch.float64)
        X = embed(X2)
        gen = torch.Generator().manual_seed(config.seed + 1)
        model = SquaredReLUNet(3, config.width, config.signs, config.init_scale, generator=gen).to(dtype=dtype, device=device)
        problem = Problem(model, X.to(dtype=dtype, device=device), y.to(dtype=dtype, device=device), config.loss,
                          degree=model.homogeneity_degree, chunk_size=config.chunk_size or None)
        lo, hi = plane_extent(X2)
        contour_xs, contour_points = _grid_points(lo, hi, config.contour_resolution, torch.float64)
        _, surface_points = _grid_points(lo, hi, config.surface_resolution, torch.float64)
        info.update(width=config.width, signs=config.signs, extent=[lo, hi])
        extras = {
            "X2": X2, "X": X, "y": y,
            "signs": model.signs.detach().cpu().double(),
            "weight0": model.weight.detach().cpu().double().clone(),
            "contour_xs": contour_xs, "contour_points": contour_points, "surface_points": surface_points,
        }
        return Setup(problem, problem.flat_params(), info, extras)

    def callbacks(self, setup, config) -> list:
        recorder = Fig1Recorder(setup)
        setup.extras["recorder"] = recorder
        return [recorder]

    def finish(self, setup, state, run_dir, config) -> dict:
        from ..models import homogeneity_degree

        problem = setup.problem
        recorder = setup.extras.get("recorder")
        if recorder is not None:
            recorder.close()
        mine = state.callbacks.get(Fig1Recorder.key, {})
        s_final = math.log(problem.n) - state.ev.log_risk
        final_values = predict(problem, state.w, setup.extras["contour_points"]).cpu().double().numpy()
        ntk = ntk_max_margin(setup, config, torch.float64)
        problem.load_into_model(state.w)
        net_report = homogeneity_degree(problem.model, problem.X)
        out = dict(ntk["summary"])
        out["homogeneity_degree_measured"] = net_report.fitted_degree
        out["homogeneity_violation"] = net_report.violation
        for milestone in ALIGNMENT_MILESTONES:
            out[f"alignment_cos_at_ln{milestone:g}"] = mine.get("alignment_at", {}).get(f"{milestone:g}")
        snapshot_b = mine.get("b")
        ntk_values = ntk["values"]["contour_points"]
        out["surface_distance_ntk_to_final"] = surface_distance(ntk_values, final_values)
        out["surface_distance_ntk_to_first_separable"] = None
        out["surface_distance_first_separable_to_final"] = None
        if snapshot_b is not None:
            out["surface_distance_ntk_to_first_separable"] = surface_distance(ntk_values, snapshot_b["values"])
            out["surface_distance_first_separable_to_final"] = surface_distance(snapshot_b["values"], final_values)
        if run_dir is not None:
            path = run_dir.path
            write_snapshot(path / SNAPSHOTS["c"], setup, state.w, final_values, s_final, state.steps, "network")
            write_snapshot(path / SNAPSHOTS["a"], setup, ntk["svm"].direction, ntk_values,
                           out["ntk_ln_n_over_L"], out["ntk_steps"], "ntk-svm",
                           surface_values=ntk["values"]["surface_points"])
        return out

    def plot(self, run_dir, out_dir) -> list:
        from .fig1_plots import plot_fig1

        return plot_fig1(run_dir, out_dir)


def read_surfaces(run_dir) -> Optional[np.ndarray]:
    return read_array_log(Path(run_dir), SURFACES)
