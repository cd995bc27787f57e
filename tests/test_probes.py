"""diralign.probes: the instrument panel against its definitions."""

import math

import pytest
import torch

from diralign import losses, probes
from diralign.data import separable_gaussian
from diralign.models import DeepLinear
from diralign.problem import Problem


def _problem(loss="logistic", chunk_size=None):
    X, y = separable_gaussian(40, 4, 0.1, seed=3)
    model = DeepLinear(4, (5, 3), init_scale=1.0, generator=torch.Generator().manual_seed(1)).double()
    return Problem(model, X, y, loss, degree=3, chunk_size=chunk_size)


def test_probes_match_definitions():
    problem = _problem()
    w = problem.flat_params() * 1.5  # L of order 1: alpha's closed form is safe in float64
    ev = problem.evaluate(w)
    assert -3 < ev.log_risk < 5
    row = probes.panel(problem, w, ev, 3)
    norm = float(w.norm())
    assert row["ln_n_over_L"] == pytest.approx(math.log(40) - ev.log_risk)
    assert row["min_normalized_margin"] == pytest.approx(float(ev.margins.min()) / norm**3)
    cos = float(torch.dot(w, -ev.grad) / (w.norm() * ev.grad.norm()))
    assert row["alignment_cos"] == pytest.approx(cos)
    # beta = <grad alpha, W>/k; for homogeneous models Euler gives <grad p_i, W> = k p_i.
    alpha = losses.smoothed_margin(ev.log_risk, "logistic")
    w_req = w.clone().requires_grad_(True)
    log_L = problem.log_risk_fn(w_req)
    alpha_t = -torch.log(torch.expm1(torch.exp(log_L)))
    (g_alpha,) = torch.autograd.grad(alpha_t, w_req)
    assert row["beta"] == pytest.approx(float(g_alpha @ w) / 3, rel=1e-9)
    assert row["smoothed_margin"] == pytest.approx(alpha, rel=1e-12)
    blocks = probes.block_panel(problem, w, ev.grad, probes.block_groups(problem.names))
    assert sum(v for k, v in blocks.items() if k.startswith("share:")) == pytest.approx(1.0)
