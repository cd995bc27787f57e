"""diralign.dynamics.sgd: the paper's minibatch SGD against hand-written updates."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diralign.config import apply_overrides
from diralign.dynamics import make_dynamics
from diralign.dynamics.sgd import MinibatchSGD
from diralign.experiments.margins import MarginsExperiment
from diralign.models import build_model


def small_problem(dtype=torch.float64, **overrides):
    experiment = MarginsExperiment()
    pairs = ["data=synthetic-images", "n=40", "batch_size=16", "dtype=float64"] + [f"{k}={v}" for k, v in overrides.items()]
    config = apply_overrides(experiment.default_config(), pairs)
    setup = experiment.setup(config, dtype, torch.device("cpu"))
    return setup, config


def test_sgd_epoch_matches_hand_written_minibatch_updates():
    setup, config = small_problem(eta=0.5, batch_size=16)
    problem = setup.problem
    w0 = setup.w0.clone()
    ev = problem.evaluate(w0)
    sgd = MinibatchSGD(problem, config)
    order = torch.randperm(problem.n, generator=torch.Generator().manual_seed(config.seed + 20_200_612))
    result = sgd.step(w0, ev)
    assert result.rejected == 0  # (else the hand-written epoch below is not what ran)
    # Reference: plain autograd on the summed cross-entropy, step eta * grad L_B / L_full.
    model = build_model("h-alexnet").double()
    L_full = math.exp(ev.log_risk)
    w = w0.clone()
    for batch in order.split(16):
        problem.load_into_model(w)
        model.load_state_dict(problem.model.state_dict())
        loss = F.cross_entropy(model(problem.X[batch]), problem.y[batch], reduction="sum")
        grads = torch.autograd.grad(loss, list(model.parameters()))
        w = w - 0.5 * torch.cat([g.reshape(-1) for g in grads]) / L_full
    np.testing.assert_allclose(result.w.numpy(), w.numpy(), rtol=1e-10, atol=1e-12)
    assert result.ev.log_risk <= ev.log_risk


def test_sgd_rejects_risk_increase_and_caps_updates():
    setup, config = small_problem(eta=1e6, max_update_ratio=0.05)
    problem = setup.problem
    ev = problem.evaluate(setup.w0)
    sgd = MinibatchSGD(problem, config)
    result = sgd.step(setup.w0, ev)
    assert sgd.capped_updates > 0
    assert result.ev.log_risk <= ev.log_risk and math.isfinite(result.ev.log_risk)
    step = (result.w - setup.w0).norm()
    assert step <= 0.05 * setup.w0.norm() * math.ceil(problem.n / 16) * 1.5


def test_sgd_is_deterministic_and_resumable():
    def run(epochs, split=None):
        setup, config = small_problem(eta=0.3)
        dyn = make_dynamics(setup.problem, config)
        w, ev = setup.w0, setup.problem.evaluate(setup.w0)
        for epoch in range(epochs):
            if epoch == split:  # a checkpoint round trip into a fresh dynamics object
                state = pickle.loads(pickle.dumps(dyn.state_dict()))
                dyn = make_dynamics(setup.problem, config)
                dyn.load_state_dict(state)
            result = dyn.step(w, ev)
            w, ev = result.w, result.ev
        return w

    straight = run(6)
    assert torch.equal(straight, run(6))
    assert torch.equal(straight, run(6, split=3))


def test_gd_accumulates_chunks():
    setup, config = small_problem(chunk_size=7, dynamics="gd")
    problem = setup.problem
    chunked = problem.evaluate(setup.w0)
    problem.chunk_size = None
    whole = problem.evaluate(setup.w0)
    assert chunked.log_risk == pytest.approx(whole.log_risk, rel=1e-13)
    np.testing.assert_allclose(chunked.grad.numpy(), whole.grad.numpy(), rtol=1e-10, atol=1e-14)
    part = problem.evaluate_subset(setup.w0, torch.arange(5, 23))
    reference = F.cross_entropy(problem.forward(setup.w0, problem.X[5:23]), problem.y[5:23], reduction="sum")
    assert part.log_risk == pytest.approx(math.log(float(reference)), rel=1e-12)


# -- issue 13: the controller on the device --------------------------------------------------------
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
    setup, config = small_problem(eta=50.0, max_update_ratio=0.02)
    problem = setup.problem
    ev = problem.evaluate(setup.w0)
    sgd = MinibatchSGD(problem, config)
    order = torch.randperm(problem.n, generator=torch.Generator().manual_seed(3))
    sgd._spent = 0.0
    w_dev = sgd._epoch(setup.w0, ev, order)
    w_host, eta_host, capped = host_epoch(problem, setup.w0, ev.log_risk, order, 50.0, 16, 0.02)
    assert capped > 0 and sgd.capped_updates == capped
    assert math.isclose(sgd._eta_after_epoch, eta_host, rel_tol=1e-13)
    torch.testing.assert_close(w_dev, w_host, rtol=1e-12, atol=1e-14)
    assert sgd._spent == 1.0  # three minibatches of 16, 16 and 8 of the 40 examples


def test_non_finite_minibatch_rejects_the_epoch_and_halves_eta(monkeypatch):
    setup, config = small_problem(eta=0.1)
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


def test_caps_taken_in_a_rejected_epoch_do_not_outlive_it(monkeypatch):
    """An overshooting epoch makes a later minibatch's risk e^k times the epoch's starting risk,
    and the norm cap cuts eta by ~e^k.  When the epoch is rejected, the next try must start
    from half the epoch's *starting* eta: keeping the cut collapsed eta from 2e-4 to 1e-9 in
    one epoch on H-AlexNet with all digits."""
    setup, config = small_problem(eta=0.1, max_update_ratio=0.1)
    problem = setup.problem
    ev = problem.evaluate(setup.w0)
    sgd = MinibatchSGD(problem, config)
    real_minibatch, real_check = problem.minibatch, sgd._check
    calls = {"minibatch": 0, "check": 0}

    def overshooting(w, index):
        calls["minibatch"] += 1
        log_risk, grad = real_minibatch(w, index)
        if calls["minibatch"] == 2:  # the first epoch's second minibatch: its risk is e^30 too high
            log_risk = log_risk + 30.0
        return log_risk, grad

    def first_rejected(w_new, with_grad):
        calls["check"] += 1
        return None if calls["check"] == 1 else real_check(w_new, with_grad)

    monkeypatch.setattr(problem, "minibatch", overshooting)
    monkeypatch.setattr(sgd, "_check", first_rejected)
    result = sgd.step(setup.w0, ev)
    assert result.rejected == 1 and sgd.capped_updates >= 1  # the cap did act in the rejected epoch
    assert math.isfinite(result.ev.log_risk)
    # halved once from 0.1, grown once; the e^-30 cut is gone (unless the second try was capped too)
    caps_in_second_try = sgd.capped_updates - 1
    if caps_in_second_try == 0:
        assert math.isclose(sgd.eta, 0.1 * 0.5 * config.eta_growth, rel_tol=1e-12)
    assert sgd.eta > 1e-6
