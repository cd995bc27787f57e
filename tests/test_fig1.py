"""Figure 1: planar teacher data, the squared-ReLU network, its NTK, the dual SVM, and the
``fig1`` experiment end to end at a small width.  References are independent: numpy loops,
finite differences, closed forms, the primal cvxpy SVM and sklearn."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch.func import functional_call, grad, jvp

from diralign import maxmargin
from diralign.data.planar import embed, make_teacher, planar_data, planar_teacher
from diralign.errors import UserError
from diralign.models import (
    SquaredReLUNet,
    SquaredReLUNTK,
    build_model,
    homogeneity_degree,
    ntk_linearize,
    squared_relu_ntk,
)
from diralign.rundir import read_array_log

F64 = torch.float64
EPS = torch.finfo(F64).eps


# -- data -----------------------------------------------------------------------------
def test_teacher_data_is_seeded_labelled_and_thresholded():
    X, y = planar_teacher(80, margin_threshold=0.2, seed=3)
    X2, y2 = planar_teacher(80, margin_threshold=0.2, seed=3)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert not torch.equal(X, planar_teacher(80, margin_threshold=0.2, seed=4)[0])
    assert X.shape == (80, 2) and X.abs().max() <= 1.0
    assert set(y.tolist()) == {-1.0, 1.0}
    # The teacher is the generator's first draw: rebuild it and check labels and deletion.
    teacher = make_teacher(8, torch.Generator().manual_seed(3))
    t = teacher(X)
    assert torch.equal(torch.sign(t), y)
    assert float(t.abs().min()) >= 0.2
    # Deletion really removes something: uniform points of the square fall below it.
    uniform = torch.rand(4000, 2, generator=torch.Generator().manual_seed(9), dtype=F64) * 2 - 1
    assert float((teacher(uniform).abs() < 0.2).double().mean()) > 0.02


def test_embedding_appends_a_constant_one():
    X, _ = planar_teacher(10, seed=0)
    Z = embed(X)
    assert Z.shape == (10, 3) and torch.equal(Z[:, :2], X) and torch.all(Z[:, 2] == 1.0)


def test_user_planar_npz(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, X=np.array([[0.1, 0.2], [-0.3, 0.4], [0.5, -0.6]]), y=np.array([1, -1, 1]))
    X, y, info = planar_data(str(good), n=0, margin_threshold=0.1, seed=0)
    assert X.shape == (3, 2) and y.tolist() == [1.0, -1.0, 1.0] and info["n"] == 3
    bad_dim = tmp_path / "bad_dim.npz"
    np.savez(bad_dim, X=np.zeros((3, 3)), y=np.array([1, -1, 1]))
    with pytest.raises(UserError, match=r"\[n, 2\]"):
        planar_data(str(bad_dim), 0, 0.1, 0)
    bad_labels = tmp_path / "bad_labels.npz"
    np.savez(bad_labels, X=np.zeros((3, 2)), y=np.array([0, 1, 1]))
    with pytest.raises(UserError, match="-1 or \\+1"):
        planar_data(str(bad_labels), 0, 0.1, 0)


# -- the network ------------------------------------------------------------------------
def _net(width=7, signs="random", seed=0):
    return SquaredReLUNet(3, width, signs=signs, generator=torch.Generator().manual_seed(seed))


def test_forward_matches_a_numpy_loop_and_signs():
    net = _net()
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    W, s = net.weight.detach().numpy(), net.signs.numpy()
    ref = [sum(s[j] * max(0.0, float(W[j] @ xi)) ** 2 for j in range(len(s))) for xi in x.numpy()]
    np.testing.assert_allclose(net(x).detach().numpy(), ref, rtol=1e-13, atol=1e-15)
    assert set(np.unique(s).tolist()) <= {-1.0, 1.0}
    assert list(build_model("srelu", in_features=3, width=4).signs) == [-1.0, 1.0, -1.0, 1.0]  # (-1)^j, j = 1..m
    assert isinstance(build_model("squared-relu", in_features=3, width=4), SquaredReLUNet)
    assert not any(name == "signs" for name, _ in net.named_parameters())  # signs are not trained


def test_network_is_two_homogeneous():
    net = _net(width=50)
    x = embed(planar_teacher(30, seed=0)[0])
    report = homogeneity_degree(net, x)
    assert report.degree == 2 and abs(report.fitted_degree - 2.0) < 1e-12 and report.violation < 1e3 * EPS


def _plain(x, w, s):
    return torch.relu(x @ w.T).square() @ s


def test_hand_written_derivatives_match_finite_differences_and_plain_autograd():
    """Gradient (in w and x), double backward, jvp-of-grad and jvp of the custom backward."""
    net = _net(width=9)
    w0 = net.weight.detach()
    s = net.signs
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    c = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(3))
    v = torch.randn_like(w0)

    def risk(w):  # a smooth scalar of the outputs
        return torch.logsumexp(-c * functional_call(net, {"weight": w, "signs": s}, (x,)), 0)

    g = grad(risk)(w0)
    h = 1e-6
    fd = (risk(w0 + h * v) - risk(w0 - h * v)) / (2 * h)
    assert abs(float((g * v).sum()) - float(fd)) < 1e-8 * max(1.0, abs(float(fd)))
    hvp = jvp(grad(risk), (w0,), (v,))[1]
    fd_hvp = (grad(risk)(w0 + h * v) - grad(risk)(w0 - h * v)) / (2 * h)
    assert float((hvp - fd_hvp).abs().max()) < 1e-6 * float(fd_hvp.abs().max())
    wr = w0.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(risk(wr), wr, create_graph=True)
    (hvp2,) = torch.autograd.grad((g2 * v).sum(), wr)
    assert float((hvp2 - hvp).abs().max()) < 1e-12 * float(hvp.abs().max())
    # Against plain autograd on the plain formula, including the input gradient.
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(net(xr).sum(), xr)
    xr2 = x.clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(_plain(xr2, w0, s).sum(), xr2)
    assert float((gx - gx_ref).abs().max()) < 1e-13 * float(gx_ref.abs().max())
    tangent = jvp(lambda w: functional_call(net, {"weight": w, "signs": s}, (x,)), (w0,), (v,))[1]
    tangent_ref = jvp(lambda w: _plain(x, w, s), (w0,), (v,))[1]
    assert float((tangent - tangent_ref).abs().max()) < 1e-13 * float(tangent_ref.abs().max())


# -- NTK --------------------------------------------------------------------------------
def test_ntk_linearize_closed_form_and_affine():
    net = _net(width=11)
    x = embed(planar_teacher(20, seed=1)[0])
    lin = ntk_linearize(net)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ["theta.weight"]
    f0 = net(x).detach()
    assert float((lin(x) - f0).abs().max()) < 1e-13 * float(f0.abs().max())  # f_lin(theta0) = f(theta0)
    gen = torch.Generator().manual_seed(5)
    d1, d2 = (torch.randn(net.weight.shape, dtype=F64, generator=gen) for _ in range(2))
    theta0 = net.weight.detach()

    def f_lin(theta):
        return functional_call(lin, {"theta.weight": theta}, (x,)).detach()

    # Affine: f_lin(theta0 + a d1 + b d2) = f_lin(theta0) + a (f_lin(theta0 + d1) - f_lin(theta0)) + b (...).
    a, b = 2.7, -1.3
    lhs = f_lin(theta0 + a * d1 + b * d2)
    rhs = f0 + a * (f_lin(theta0 + d1) - f0) + b * (f_lin(theta0 + d2) - f0)
    assert float((lhs - rhs).abs().max()) < 1e-12 * float(lhs.abs().max())
    # Closed form on this model: f_lin(x; V) = 2 sum_j s_j <V_j, x> relu(<w0_j, x>) - f(x; w0).
    V = theta0 + d1
    ntk = SquaredReLUNTK(theta0, net.signs, v0=V)
    closed = 2.0 * ntk(x).detach() - f0
    assert float((f_lin(V) - closed).abs().max()) < 1e-12 * float(closed.abs().max())
    # The first-order Taylor model: (f(theta0 + h d) - f(theta0)) / h -> J d.
    h = 1e-7
    with torch.no_grad():
        moved = functional_call(net, {"weight": theta0 + h * d1, "signs": net.signs}, (x,))
    fd = (moved - f0) / h
    assert float((fd - (f_lin(theta0 + d1) - f0)).abs().max()) < 1e-5 * float(fd.abs().max())


def test_ntk_model_features_and_degrees():
    net = _net(width=13)
    x = embed(planar_teacher(25, seed=2)[0])
    ntk = squared_relu_ntk(net)
    assert float((ntk(x) - net(x)).abs().max()) < 1e-13 * float(net(x).abs().max())  # v0 = w0: starts as the net
    F = ntk.features(x)
    assert F.shape == (25, 13 * 3)
    assert float((F @ ntk.v.reshape(-1) - ntk(x)).abs().max()) < 1e-13 * float(ntk(x).abs().max())
    v_only = homogeneity_degree(ntk, x)
    joint = homogeneity_degree(squared_relu_ntk(net, joint=True), x)
    assert v_only.degree == 1 and abs(v_only.fitted_degree - 1.0) < 1e-12
    assert joint.degree == 2 and abs(joint.fitted_degree - 2.0) < 1e-12 and joint.violation < 1e3 * EPS


def test_dual_svm_matches_primal_cvxpy_and_sklearn():
    net = _net(width=50, seed=4)
    X, y = planar_teacher(60, seed=5)
    F = squared_relu_ntk(net).features(embed(X)).detach()  # 150 features, 60 points: separable
    dual = maxmargin.hard_margin_svm_dual(F, y)
    primal = maxmargin.hard_margin_svm(F, y)
    sk = maxmargin.svm_sklearn(F, y)
    assert float(dual.direction @ primal.direction) > 1 - 1e-9
    assert abs(dual.margin - primal.margin) < 1e-7 * primal.margin
    assert float(dual.direction @ sk.direction) > 1 - 1e-5
    assert set(dual.support.tolist()) == set(primal.support.tolist())
    # Strong duality: sum(alpha) = ||u||^2 = 1 / gamma^2 for the unnormalised primal.
    assert abs(dual.alpha.sum() - 1.0 / dual.margin**2) < 1e-6 / dual.margin**2
    assert dual.margin > 0 and np.all(dual.alpha >= 0)


# -- the experiment end to end ----------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from diralign.figures import plot_run
    from diralign.runner import start_run

    out = tmp_path_factory.mktemp("fig1") / "run"
    overrides = ["width=200", "target_ln_n_over_L=12", "ntk_target_ln_n_over_L=1000", "contour_resolution=41"]
    summary, state, setup = start_run("fig1", overrides, out, quiet=True)
    paths = plot_run(out)
    return out, summary, paths


def test_fig1_end_to_end(small_run):
    from diralign.rundir.schema import DESIGN_SUMMARY_KEYS as SUMMARY_KEYS

    out, summary, paths = small_run
    saved = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in saved
        if key != "homogeneity_degree":
            assert saved[key] is not None and math.isfinite(saved[key]), key
    assert saved["homogeneity_degree"] == 2
    assert saved["train_accuracy"] == 1.0
    assert saved["ln_n_over_L"] >= 12 - 1e-6
    assert saved["ntk_svm_cos"] >= 0.9999
    assert saved["ntk_svm_margin"] > 0 and saved["ntk_train_accuracy"] == 1.0
    # The trained NTK's min normalised margin approaches the SVM's from below.
    assert saved["ntk_svm_margin"] * (1 - 1e-3) <= saved["ntk_min_normalized_margin"] <= saved["ntk_svm_margin"] * (1 + 1e-9)
    assert abs(saved["homogeneity_degree_measured"] - 2) < 1e-12
    assert abs(saved["ntk_homogeneity_degree_joint"] - 2) < 1e-12
    assert saved["alignment_cos_at_ln10"] is not None and saved["alignment_cos_at_ln100"] is None
    for name in ("fig1_a.npz", "fig1_b.npz", "fig1_c.npz"):
        assert (out / name).is_file()
    b = np.load(out / "fig1_b.npz")
    assert float(b["ln_n_over_L"]) == pytest.approx(saved["first_separable_ln_n_over_L"])
    # Snapshot (b) classifies every point correctly, and it is the *first* such log state.
    net = SquaredReLUNet(3, 200)
    with torch.no_grad():
        net.weight.copy_(torch.as_tensor(b["weights"]).reshape(200, 3))
        net.signs.copy_(torch.as_tensor(b["signs"]))
    margins = torch.as_tensor(b["y"]) * net(embed(torch.as_tensor(b["X"])))
    assert bool((margins > 0).all())
    log = pd.read_csv(out / "log.csv")
    assert (log.loc[log.ln_n_over_L < saved["first_separable_ln_n_over_L"] - 1e-9, "train_accuracy"] < 1).all()
    # One logged surface per log row; the last is the final network's, normalised.
    surfaces = read_array_log(out, "surfaces")
    assert surfaces.shape[0] == len(log)
    names = {p.name for p in paths}
    for stem in ("fig1_contours", "fig1_curves", "fig1a", "fig1b", "fig1c"):
        assert f"{stem}.png" in names and f"{stem}.pdf" in names


def test_margins_are_monotone_after_perfect_classification(small_run):
    """Lyu & Li: the normalised smoothed margin never decreases once L < l(0); measured here
    from the first perfect classification on (logistic loss).  The min normalised margin is
    sandwiched (alpha <= min p_i <= alpha + ln n) and checked from L < l(0) on."""
    out, summary, _ = small_run
    log = pd.read_csv(out / "log.csv")
    after = log[log.ln_n_over_L >= summary["first_separable_ln_n_over_L"]]
    assert len(after) > 20
    alpha = after["normalized_smoothed_margin"].to_numpy()
    tolerance = 1e-6 * np.abs(alpha).max()  # integrator tolerance relative to the margin scale
    assert np.diff(alpha).min() >= -tolerance
    settled = log[log.below_loss_at_zero == 1]
    gamma = settled["min_normalized_margin"].to_numpy()
    assert np.diff(gamma).min() >= -1e-6 * np.abs(gamma).max()
    assert gamma[-1] > gamma[0]  # it really rises


def test_fig1_sgd_runs(tmp_path):
    from diralign.runner import start_run

    summary, _, _ = start_run(
        "fig1",
        ["width=50", "dynamics=sgd", "target_ln_n_over_L=4", "ntk_target_ln_n_over_L=50", "contour_resolution=11", "surface_resolution=5"],
        tmp_path / "sgd",
        quiet=True,
    )
    assert summary["dynamics"] == "sgd" and summary["ln_n_over_L"] >= 4 - 1e-9
    assert summary["ntk_svm_margin"] > 0


def test_fig1_rejects_bad_settings(tmp_path):
    from diralign.runner import start_run

    with pytest.raises(UserError, match="ntk_dynamics"):
        start_run("fig1", ["width=10", "ntk_dynamics=sgd"], tmp_path / "a", quiet=True)
    with pytest.raises(UserError, match="signs"):
        start_run("fig1", ["width=10", "signs=odd"], tmp_path / "b", quiet=True)
