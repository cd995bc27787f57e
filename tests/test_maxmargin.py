"""diralign.maxmargin: SVM and LP references against cvxpy/Clarabel and sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diralign import maxmargin
from diralign.data.planar import embed, planar_teacher
from diralign.models import (
    SquaredReLUNet,
    squared_relu_ntk,
)

F64 = torch.float64

EPS = torch.finfo(F64).eps


def _net(width=7, signs="random", seed=0):
    return SquaredReLUNet(3, width, signs=signs, generator=torch.Generator().manual_seed(seed))


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


def _planar_problem(n=12, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.uniform(-1, 1, (n, 2)), np.ones((n, 1))], axis=1)
    X /= np.linalg.norm(X, axis=1).max()
    y = np.where(X[:, 0] * X[:, 1] > 0, 1.0, -1.0)  # XOR-like: needs both signs
    return X, y


def test_local_lp_matches_cvxpy():
    import cvxpy as cp

    X, y = _planar_problem()
    rng = np.random.default_rng(1)
    theta = rng.normal(size=(10, 3))
    theta /= np.linalg.norm(theta, axis=1, keepdims=True)
    signs = np.array([(-1.0) ** j for j in range(1, 11)])
    lp = maxmargin.srelu_local_lp(X, y, theta, signs)
    features = maxmargin.srelu_features(X, y, theta, signs)
    s, t = cp.Variable(10, nonneg=True), cp.Variable()
    cp.Problem(cp.Maximize(t), [features @ s >= t, cp.sum(s) == 1]).solve(solver=cp.CLARABEL)
    assert math.isfinite(lp.value)
    assert lp.value == pytest.approx(float(t.value), abs=1e-7)
    assert lp.weights.min() >= -1e-12 and lp.weights.sum() == pytest.approx(1.0)
    # the dual weights certify the value: min over the simplex of max_j (q^T features)_j
    assert float((lp.dual @ features).max()) == pytest.approx(lp.value, abs=1e-7)


def test_infinite_width_bracket_contains_any_network_and_is_tight():
    X, y = _planar_problem()
    wide = maxmargin.infinite_width_margin(X, y, grid_points=800, certificate_step=0.02)
    assert 0 < wide.lower <= wide.upper
    assert wide.upper - wide.lower <= 0.02 * wide.upper  # the dual certificate closes the gap
    # any finite S-ReLU network is a signed measure of mass 1: its normalised margin is <= V
    rng = np.random.default_rng(2)
    for _ in range(20):
        w = rng.normal(size=(30, 3))
        signs = np.array([(-1.0) ** j for j in range(1, 31)])
        shares = (w**2).sum(1) / (w**2).sum()
        theta = w / np.linalg.norm(w, axis=1, keepdims=True)
        margin = float((maxmargin.srelu_features(X, y, theta, signs) @ shares).min())
        assert margin <= wide.upper + 1e-12


def test_covering_epsilon_limits():
    fine = maxmargin.fibonacci_sphere(4000)
    signs = np.where(np.arange(4000) % 2 == 0, -1.0, 1.0)
    eps_dense = maxmargin.covering_epsilon(fine, fine, signs, step=0.05)
    assert eps_dense < 0.15
    clumped = np.tile([[0.0, 0.0, 1.0]], (4, 1))
    eps_clumped = maxmargin.covering_epsilon(clumped, clumped, np.array([-1.0, 1.0, -1.0, 1.0]), step=0.05)
    assert eps_clumped == pytest.approx(2.0, abs=0.05)  # the south pole is a diameter away
