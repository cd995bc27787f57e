"""The paper's SGD with its controller on the device (issue 13): the same epochs as the host-side
controller it replaced, caps and rejections included, with one host read-back per epoch."""

import math

import torch

from diralign.config import apply_overrides
from diralign.dynamics.sgd import MinibatchSGD
from diralign.experiments.margins import MarginsExperiment


def _setup(**overrides):
    experiment = MarginsExperiment()
    pairs = ["data=synthetic-images", "n=40", "batch_size=16", "dtype=float64"] + [f"{k}={v}" for k, v in overrides.items()]
    config = apply_overrides(experiment.default_config(), pairs)
    return experiment.setup(config, torch.float64, torch.device("cpu")), config


def host_epoch(problem, w, log_full, order, eta, batch_size, ratio):
    """The controller as it was written before (Python floats, a host read per minibatch)."""
    capped = 0
    for batch in order.split(batch_size):
        part = problem.evaluate_subset(w, batch)
        scale = math.exp(min(part.log_risk - log_full, 700.0))
        length = eta * scale * float(part.grad.norm())
        cap = ratio * float(w.norm())
        if length > cap and cap > 0:
            eta *= 0.99 * cap / length
            capped += 1
        w = w - (eta * scale) * part.grad
    return w, eta, capped


def test_device_controller_equals_host_controller_with_caps():
    setup, config = _setup(eta=50.0, max_update_ratio=0.02)
    problem = setup.problem
    ev = problem.evaluate(setup.w0)
    sgd = MinibatchSGD(problem, config)
    order = torch.randperm(problem.n, generator=torch.Generator().manual_seed(3))
    sgd._spent = 0.0
    w_dev = sgd._epoch(setup.w0, ev, order)
    w_host, eta_host, capped = host_epoch(problem, setup.w0, ev.log_risk, order, 50.0, 16, 0.02)
    assert capped > 0 and sgd.capped_updates == capped
    assert math.isclose(sgd.eta, eta_host, rel_tol=1e-13)
    torch.testing.assert_close(w_dev, w_host, rtol=1e-12, atol=1e-14)
    assert sgd._spent == 1.0  # three minibatches of 16, 16 and 8 of the 40 examples


def test_non_finite_minibatch_rejects_the_epoch_and_halves_eta(monkeypatch):
    setup, config = _setup(eta=0.1)
    problem = setup.problem
    ev = problem.evaluate(setup.w0)
    sgd = MinibatchSGD(problem, config)
    real = problem.minibatch
    calls = {"n": 0}

    def sometimes_nan(w, index):
        calls["n"] += 1
        log_risk, grad = real(w, index)
        if calls["n"] == 2:  # the second minibatch of the first epoch overflows
            grad = grad.clone()
            grad[0] = float("nan")
        return log_risk, grad

    monkeypatch.setattr(problem, "minibatch", sometimes_nan)
    result = sgd.step(setup.w0, ev)
    assert result.rejected == 1 and math.isfinite(result.ev.log_risk)
    assert torch.isfinite(result.w).all()
    assert sgd.eta == 0.1 * 0.5 * config.eta_growth  # halved once, grown once on acceptance
