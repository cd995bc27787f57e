"""Core engine: homogeneity check, oracle, probes, and the deep-linear acceptance run."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from diralign import losses, probes
from diralign.data import separable_gaussian
from diralign.models import DeepLinear, LinearModel, homogeneity_degree
from diralign.problem import Problem
from diralign.runner import start_run


def test_homogeneity_degrees():
    x = torch.randn(20, 5, dtype=torch.float64)
    assert homogeneity_degree(LinearModel(5).double(), x).degree == 1
    for widths in [(4,), (6, 3), (3, 3, 3)]:
        report = homogeneity_degree(DeepLinear(5, widths).double(), x)
        assert report.degree == len(widths) + 1 and report.homogeneous
        assert report.violation < 1e-12
    relu = nn.Sequential(nn.Linear(5, 7, bias=False), nn.ReLU(), nn.Linear(7, 1, bias=False)).double()
    assert homogeneity_degree(relu, x).degree == 2


def test_bias_model_is_not_homogeneous():
    torch.manual_seed(0)
    x = torch.randn(20, 5, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1)).double()
    report = homogeneity_degree(model, x)
    assert not report.homogeneous and report.degree is None
    assert report.violation > 1e-3
    assert "not homogeneous" in report.verdict()


def _problem(loss="logistic", chunk_size=None):
    X, y = separable_gaussian(40, 4, 0.1, seed=3)
    model = DeepLinear(4, (5, 3), init_scale=1.0, generator=torch.Generator().manual_seed(1)).double()
    return Problem(model, X, y, loss, degree=3, chunk_size=chunk_size)


@pytest.mark.parametrize("loss", ["logistic", "exp"])
def test_oracle_gradient_matches_finite_differences(loss):
    problem = _problem(loss)
    w = problem.flat_params() * 3.0
    ev = problem.evaluate(w)
    direction = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = 1e-6
    fd = (problem.evaluate(w + h * direction, need_grad=False).log_risk - problem.evaluate(w - h * direction, need_grad=False).log_risk) / (2 * h)
    assert float(ev.grad @ direction) == pytest.approx(fd, rel=1e-7)


def test_chunked_evaluation_is_exact():
    whole = _problem()
    chunked = _problem(chunk_size=7)
    w = whole.flat_params() * 10.0  # risk far below l(0)
    a, b = whole.evaluate(w), chunked.evaluate(w)
    assert a.log_risk == pytest.approx(b.log_risk, rel=1e-14)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.margins, b.margins)


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


def test_deep_linear_acceptance(tmp_path):
    """The issue's acceptance run: default config (flow) to ln(n/L) = 1000."""
    summary, state, _ = start_run("deep-linear", [], tmp_path / "dl", quiet=True)
    assert summary["ln_n_over_L"] >= 1000
    standard = ["ln_n_over_L", "log_risk", "smoothed_margin", "min_normalized_margin", "alignment_cos", "path_length",
                "param_norm", "homogeneity_degree", "train_accuracy", "steps", "grad_evals", "rejected_steps", "wall_seconds"]
    on_disk = json.loads((tmp_path / "dl" / "summary.json").read_text())
    for key in standard:
        assert on_disk[key] is not None and math.isfinite(on_disk[key]), key
    assert 1 - summary["svm_cos"] <= 1e-6
    assert summary["margin_ratio"] >= 0.98
    assert summary["alignment_cos"] >= 0.995
    assert summary["train_accuracy"] == 1.0
    assert all(r > 0.99 for r in summary["layer_rank_one_ratios"])
    np.testing.assert_allclose(summary["layer_norm_shares"], 1 / 3, rtol=1e-6)  # balanced layers stay balanced
    log = __import__("pandas").read_csv(tmp_path / "dl" / "log.csv")
    late = log[log["ln_n_over_L"] > 50]
    # Theorem 4.1 along the flow: alignment rises (to integrator noise) in the late phase.
    assert (np.diff(late["alignment_cos"].to_numpy()) > -1e-6).all()
    # Lemma C.5: alpha <= beta <= alpha + 2 ln n + 1 once L < l(0)
    below = log[log["below_loss_at_zero"] == 1]
    assert (below["beta"] >= below["smoothed_margin"] - 1e-9 * below["smoothed_margin"].abs()).all()
    assert (below["beta"] <= below["smoothed_margin"] + 2 * math.log(60) + 1).all()


def test_gd_reaches_target_and_never_logs_rejected_steps(tmp_path):
    summary, _, _ = start_run("deep-linear", ["dynamics=gd", "target_ln_n_over_L=100"], tmp_path / "gd", quiet=True)
    assert summary["ln_n_over_L"] >= 100
    assert summary["rejected_steps"] > 0 and summary["faithful_to_flow"] is False
    log = __import__("pandas").read_csv(tmp_path / "gd" / "log.csv")
    # accepted steps only: the risk never rises from one logged point to the next
    assert (np.diff(log["log_risk"].to_numpy()) <= 0).all()
    assert 1 - summary["svm_cos"] < 1e-4
