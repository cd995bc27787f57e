"""diralign.sharpness: the top Hessian eigenvalue of log L, against a dense Hessian built by
central differences of the gradient (no double backward, no Lanczos), and in a run's log."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diralign.data import separable_gaussian
from diralign.models import DeepLinear
from diralign.problem import Problem
from diralign.rundir import schema
from diralign.rundir.reader import Run
from diralign.runner import start_run
from diralign.sharpness import Sharpness


def deep_linear_problem(chunk_size=None):
    X, y = separable_gaussian(40, 4, 0.1, seed=3)
    model = DeepLinear(4, (5, 3), init_scale=1.0, generator=torch.Generator().manual_seed(1)).double()
    return Problem(model, X, y, "logistic", degree=3, chunk_size=chunk_size)


def relu_problem():
    torch.manual_seed(4)
    X, y = separable_gaussian(30, 3, 0.1, seed=5)
    model = nn.Sequential(nn.Linear(3, 6, bias=False), nn.ReLU(), nn.Linear(6, 1, bias=False)).double()
    return Problem(model, X, y, "logistic", degree=2)


def fd_hessian(problem, w, eps=1e-5):
    """Columns ``(g(w + e e_i) - g(w - e e_i)) / 2e``, symmetrised: second order in ``e``."""
    cols = []
    for i in range(w.numel()):
        e = torch.zeros_like(w)
        e[i] = eps
        cols.append((problem.evaluate(w + e).grad - problem.evaluate(w - e).grad) / (2 * eps))
    H = torch.stack(cols, dim=1).numpy()
    return 0.5 * (H + H.T)


def trained(problem, steps=40, eta=0.5):
    """A point some way into training (plain GD on log L): away from initialisation's symmetry."""
    w = problem.flat_params()
    for _ in range(steps):
        w = w - eta * problem.evaluate(w).grad
    return w


@pytest.mark.parametrize("make", [deep_linear_problem, relu_problem], ids=["deep-linear", "relu"])
def test_top_eigenvalue_matches_a_dense_finite_difference_hessian(make):
    problem = make()
    w = trained(problem)
    if make is relu_problem:
        # The Hessian is the current activation pattern's: no unit may change side within the
        # FD step (each pre-activation moves by at most eps ||x|| there).
        W1 = w[: problem.model[0].weight.numel()].reshape(problem.model[0].weight.shape)
        pre = problem.X @ W1.T
        assert float(pre.abs().min()) > 10 * 1e-5 * float(problem.X.norm(dim=1).max())
    H = fd_hessian(problem, w)
    want = float(np.linalg.eigvalsh(H)[-1])
    value, cost = Sharpness(problem).measure(w)
    assert math.isfinite(value) and cost >= 3
    # the FD Hessian is accurate to ~1e-9 relative here; Lanczos to its 1e-4 Ritz tolerance or better
    assert abs(value - want) <= 1e-5 * max(abs(want), np.abs(H).max()), (value, want)


def test_chunked_problem_gives_the_same_top_eigenvalue_at_three_products_each():
    whole, chunked = deep_linear_problem(), deep_linear_problem(chunk_size=7)
    w = trained(whole)
    a, cost_a = Sharpness(whole).measure(w)
    b, cost_b = Sharpness(chunked).measure(w)
    assert abs(a - b) <= 1e-8 * abs(a)
    products_a, products_b = (cost_a - 1) / 2, (cost_b - 1) / 3
    assert products_a == int(products_a) and products_b == int(products_b)


def test_warm_start_from_the_last_eigenvector_needs_fewer_products():
    problem = deep_linear_problem()
    w = trained(problem)
    instrument = Sharpness(problem)
    _, cold = instrument.measure(w)
    w_next = w - 0.05 * problem.evaluate(w).grad  # the next log point: the top direction barely turned
    value, warm = instrument.measure(w_next)
    _, cold_again = Sharpness(problem).measure(w_next)
    assert warm < cold_again, (warm, cold_again, cold)
    assert abs(value - Sharpness(problem).measure(w_next)[0]) <= 1e-6 * abs(value)


def test_run_logs_sharpness_and_counts_its_products_in_grad_evals(tmp_path):
    common = ["target_ln_n_over_L=20", "dynamics=gd", "n=20"]
    plain, _, _ = start_run("deep-linear", common, tmp_path / "plain", quiet=True)
    summary, _, _ = start_run("deep-linear", common + ["sharpness=true"], tmp_path / "sharp", quiet=True)
    log = Run(tmp_path / "sharp").log
    assert schema.SHARPNESS in log.columns and schema.SHARPNESS not in Run(tmp_path / "plain").log.columns
    values = log[schema.SHARPNESS].to_numpy(dtype=np.float64)
    assert len(values) >= 3 and np.isfinite(values).all()
    # log L is not convex, but at these points gd is on its way down a valley: a positive top
    assert (values > 0).all()
    # same steps (the instrument does not touch the dynamics), more evaluations: >= 3 per log point
    assert summary["steps"] == plain["steps"]
    assert summary["grad_evals"] - plain["grad_evals"] >= 3 * len(values)


def test_resumed_run_continues_the_warm_start(tmp_path, monkeypatch):
    """Stopped by SIGINT after its first log points, a run resumes with the instrument's last
    eigenvector: the same sharpness values and grad_evals as the uninterrupted run."""
    import os
    import signal

    from diralign.runner import resume_run
    from diralign.trainer import Interrupted, Trainer

    common = ["target_ln_n_over_L=20", "dynamics=gd", "n=20", "sharpness=true"]
    whole, _, _ = start_run("deep-linear", common, tmp_path / "whole", quiet=True)
    original, rows = Trainer.log_point, []

    def log_point(self, state):
        row = original(self, state)
        rows.append(row)
        if len(rows) == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler: checkpoint, then stop
        return row

    monkeypatch.setattr(Trainer, "log_point", log_point)
    with pytest.raises(Interrupted):
        start_run("deep-linear", common, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(Trainer, "log_point", original)
    summary, _, _ = resume_run(tmp_path / "cut", quiet=True)
    a, b = Run(tmp_path / "whole").log, Run(tmp_path / "cut").log
    assert len(a) == len(b) > 4
    assert np.array_equal(a[schema.SHARPNESS].to_numpy(), b[schema.SHARPNESS].to_numpy())
    assert summary["grad_evals"] == whole["grad_evals"]


def test_gd_runs_at_the_edge_of_stability(tmp_path):
    """Why gd's alignment is step-size noise: past the early phase its step times the sharpness
    hovers around 2, where an update along the top Hessian direction overshoots and comes back
    (measured on deep-linear to ln(n/L) = 30: 1.2 to 3.0, median ~2.2), while the flow's
    alignment at the same point is ~1."""
    start_run("deep-linear", ["target_ln_n_over_L=30", "dynamics=gd", "sharpness=true"], tmp_path / "gd", quiet=True)
    log = Run(tmp_path / "gd").log
    late = log[log[schema.LN_N_OVER_L] > 5]
    product = (late[schema.STEP_SIZE] * late[schema.SHARPNESS]).to_numpy(dtype=np.float64)
    assert len(product) >= 20 and np.isfinite(product).all()
    assert 1.0 < float(np.median(product)) < 4.0, np.quantile(product, [0, 0.5, 1])
    assert float(product.max()) > 2.0  # it does cross the edge
    alignment = late[schema.ALIGNMENT_COS].to_numpy(dtype=np.float64)
    assert float(alignment.std()) > 0.05  # and its alignment is noise, not a converging curve
