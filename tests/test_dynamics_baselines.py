"""diralign.dynamics.constant_gd and loss_based: the baselines against hand-written loops."""

import math

import numpy as np
import pytest
import torch

from diralign.bench.baseline import float64_limit
from diralign.bench.follow import clock
from diralign.config import TrainConfig, apply_overrides
from diralign.data import separable_gaussian
from diralign.dynamics import make_dynamics
from diralign.dynamics.loss_based import GROWTH, SHRINK
from diralign.models import DeepLinear, LinearModel
from diralign.problem import Problem


def _linear_problem(n=30, d=4, seed=5):
    X, y = separable_gaussian(n, d, 0.2, seed=seed)
    model = LinearModel(d, init_scale=0.1, generator=torch.Generator().manual_seed(seed)).double()
    return Problem(model, X, y, "logistic", degree=1), X.numpy(), y.numpy()


def _deep_problem():
    X, y = separable_gaussian(40, 4, 0.1, seed=3)
    model = DeepLinear(4, (5, 3), init_scale=1.0, generator=torch.Generator().manual_seed(1)).double()
    return Problem(model, X, y, "logistic", degree=3)


def _config(**changes):
    return apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in changes.items()])


def test_constant_gd_matches_a_hand_written_loop():
    problem, X, y = _linear_problem()
    eta = 0.05
    dynamics = make_dynamics(problem, _config(dynamics="constant-gd", constant_gd_eta=eta))
    w = problem.flat_params()
    ev = problem.evaluate(w)
    u = w.numpy().copy()
    for _ in range(25):
        # grad of L = sum_i log(1 + exp(-y_i <x_i, u>)) is -sum_i y_i x_i sigmoid(-y_i <x_i, u>)
        margins = y * (X @ u)
        u = u - eta * (-(X * (y / (1.0 + np.exp(margins)))[:, None]).sum(axis=0))
        result = dynamics.step(w, ev)
        w, ev = result.w, result.ev
        assert result.grad_evals == 1 and result.rejected == 0
    np.testing.assert_allclose(w.numpy(), u, rtol=1e-12, atol=1e-14)
    assert ev.log_risk == pytest.approx(float(np.log(np.log1p(np.exp(-y * (X @ u))).sum())), rel=1e-12)


def test_constant_gd_stops_where_float64_does():
    problem, X, y = _linear_problem()
    svm_like = torch.as_tensor(np.linalg.lstsq(X, y, rcond=None)[0])
    w = svm_like * (800.0 / float((torch.as_tensor(y) * (torch.as_tensor(X) @ svm_like)).min()))
    ev = problem.evaluate(w)
    assert ev.log_risk < -745  # L itself is below float64's smallest subnormal
    dynamics = make_dynamics(problem, _config(dynamics="constant-gd", constant_gd_eta=1e6))
    result = dynamics.step(w, ev)
    assert torch.equal(result.w, w) and dynamics.stalled_steps == 1
    limit = float64_limit(problem, w, ev.grad, ev.log_risk, 1e6)
    assert limit["rounded_away_at_ln_n_over_L"] <= clock(problem, ev)
    fresh = make_dynamics(problem, _config(dynamics="constant-gd", constant_gd_eta=1e6))
    fresh.load_state_dict(dynamics.state_dict())
    assert fresh.stalled_steps == 1
    deep = _deep_problem()  # a step so large that the degree-3 margins overflow: plain GD diverges
    w0 = deep.flat_params()
    with pytest.raises(FloatingPointError):
        make_dynamics(deep, _config(dynamics="constant-gd", constant_gd_eta=1e200)).step(w0, deep.evaluate(w0))


def test_loss_based_rolls_back_failed_epochs():
    problem = _deep_problem()
    alpha0 = 1e4  # far too large: the first tries raise the risk and are undone
    dynamics = make_dynamics(problem, _config(dynamics="loss-based", eta=alpha0))
    w = problem.flat_params()
    ev = problem.evaluate(w)
    result = dynamics.step(w, ev)
    r = result.rejected
    assert r > 0 and result.grad_evals == r + 1
    accepted_alpha = alpha0 / SHRINK**r
    # The accepted point is one step of the last rate from the *original* W (rolled back).
    torch.testing.assert_close(result.w, w - accepted_alpha * ev.grad, rtol=1e-13, atol=1e-13)
    assert result.ev.log_risk < ev.log_risk
    assert dynamics.alpha == pytest.approx(accepted_alpha * GROWTH, rel=1e-15)
    for k in range(r):  # every rejected try really failed the risk test
        tried = problem.evaluate(w - (alpha0 / SHRINK**k) * ev.grad, need_grad=False)
        assert not (math.isfinite(tried.log_risk) and tried.log_risk < ev.log_risk)
    # Resumable: a copy restored from state_dict takes the identical next step.
    twin = make_dynamics(problem, _config(dynamics="loss-based", eta=1.0))
    twin.load_state_dict(dynamics.state_dict())
    a, b = dynamics.step(result.w, result.ev), twin.step(result.w, result.ev)
    assert torch.equal(a.w, b.w) and a.rejected == b.rejected
