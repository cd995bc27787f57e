"""diralign.dynamics.gd: the paper's normalised GD."""

import math

import numpy as np
import torch

from diralign.config import TrainConfig, apply_overrides
from diralign.data import separable_gaussian
from diralign.dynamics.gd import NormalizedGD
from diralign.dynamics.loss_based import LossBasedGD
from diralign.models import DeepLinear
from diralign.problem import Problem
from diralign.rundir import schema
from diralign.rundir.reader import Run
from diralign.runner import start_run


def test_gd_reaches_target_and_never_logs_rejected_steps(tmp_path):
    summary, _, _ = start_run("deep-linear", ["dynamics=gd", "target_ln_n_over_L=100"], tmp_path / "gd", quiet=True)
    assert summary["ln_n_over_L"] >= 100
    assert summary["rejected_steps"] > 0 and summary["faithful_to_flow"] is False
    log = __import__("pandas").read_csv(tmp_path / "gd" / "log.csv")
    # accepted steps only: the risk never rises from one logged point to the next
    assert (np.diff(log["log_risk"].to_numpy()) <= 0).all()
    assert 1 - summary["svm_cos"] < 1e-4


def test_step_size_is_the_accepted_step_and_is_logged(tmp_path):
    """``step_size`` is the eta of the update just taken, ||W_new - W|| / ||grad log L||, whatever
    the cap and growth did to it; the log carries it from the first step on."""
    X, y = separable_gaussian(30, 3, 0.1, seed=2)
    model = DeepLinear(3, (4,), init_scale=1.0, generator=torch.Generator().manual_seed(0)).double()
    problem = Problem(model, X, y, "logistic", degree=2)
    gd = NormalizedGD(problem, apply_overrides(TrainConfig(), ["max_update_ratio=0.05"]))
    for dyn in (gd, LossBasedGD(problem, TrainConfig())):  # loss-based: its alpha, after rollbacks too
        w = problem.flat_params()
        ev = problem.evaluate(w)
        for _ in range(40):
            r = dyn.step(w, ev)
            taken = float((r.w - w).norm() / ev.grad.norm())
            assert math.isclose(dyn.step_size, taken, rel_tol=1e-12), (type(dyn).__name__, dyn.step_size, taken)
            w, ev = r.w, r.ev
    summary, _, _ = start_run("linear", ["dynamics=gd", "eta_growth=1", "eta=0.3", "target_ln_n_over_L=6"],
                              tmp_path / "run", quiet=True)
    log = Run(tmp_path / "run").log
    assert math.isnan(log[schema.STEP_SIZE].iloc[0]) and log[schema.STEP].iloc[0] == 0
    later = log[schema.STEP_SIZE].iloc[1:].to_numpy()
    assert len(later) and np.isfinite(later).all()
    # a fixed eta (no growth) is the step, unless the 10% cap shortened one
    assert (later <= 0.3 * (1 + 1e-12)).all()
