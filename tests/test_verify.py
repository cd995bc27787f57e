"""diralign verify: references (LPs, counterexample), the row logic, and a small table run.

    python -m pytest tests/test_verify.py -q
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from diralign import maxmargin
from diralign.cli import main
from diralign.models.counterexample import (
    MexicanHatMargin,
    hat_margin,
    planar_gradient,
    planar_reference,
    sphere_gradient,
    spiral_flow,
)
from diralign.models.homogeneity import homogeneity_degree
from diralign.verify import Profile, format_table, run_verify
from diralign.verify_checks import FAIL, PASS, RunData, lemma_c5, path_length_plateau

# -- LP references ------------------------------------------------------------------------------


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


# -- the counterexample -------------------------------------------------------------------------


def test_mexican_hat_is_homogeneous_and_matches_the_planar_gradient():
    model = MexicanHatMargin(degree=2)
    report = homogeneity_degree(model, torch.ones(1, 1, dtype=torch.float64))
    assert report.homogeneous and report.degree == 2
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = rng.uniform(-0.7, 0.7, 2)
        r2 = p @ p
        u = np.concatenate([2 * p, [1 - r2]]) / (1 + r2)  # inverse stereographic projection
        grad, q = sphere_gradient(u)
        ga, gb, f = planar_gradient(*p)
        assert 1 - q == pytest.approx(f, abs=1e-14)
        # the sphere's tangential gradient is minus the planar one pushed forward by the metric
        eps = 1e-6
        inv = lambda v: np.concatenate([2 * v, [1 - v @ v]]) / (1 + v @ v)  # noqa: E731
        J = np.stack([(inv(p + eps * e) - inv(p - eps * e)) / (2 * eps) for e in np.eye(2)], 1)
        pushed = J @ (-((1 + r2) ** 2) / 4 * np.array([ga, gb]))
        tangent = grad - (grad @ u) * u
        np.testing.assert_allclose(tangent, pushed, atol=1e-8)
    assert float(hat_margin(torch.tensor([0.6, 0.0, -0.8], dtype=torch.float64))) == pytest.approx(1.0)  # flat below the equator


def test_spiral_flow_keeps_winding_and_matches_the_planar_reference():
    flow = spiral_flow(1e4, points_per_decade=20)
    sigma, zeta = flow.sigma, flow.path_length

    def grow(a, b):
        return float(np.interp(math.log(b), np.log(sigma[1:]), zeta[1:]) - np.interp(math.log(a), np.log(sigma[1:]), zeta[1:]))

    assert grow(1e3, 1e4) >= grow(1e2, 1e3) > 0.5  # no plateau: about a radian per decade, and growing
    assert np.all(np.diff(flow.normalized_margin) >= -1e-8)  # alpha~ = q(theta~) nondecreasing
    assert flow.tan_alignment[-1] < 0.2 * flow.tan_alignment[np.searchsorted(sigma, 1e3)]  # aligns anyway
    early = sigma <= 5.0
    np.testing.assert_allclose(planar_reference(sigma[early]), flow.direction[early], atol=1e-6)


# -- row logic on synthetic run directories -----------------------------------------------------


def _fake_run(tmp_path, path_of_s, alpha_beta=None):
    s = np.geomspace(1.0, 1000.0, 300)
    n = 5
    alpha = s - 1.0
    beta = alpha + 1.0 if alpha_beta is None else alpha_beta(alpha)
    log = pd.DataFrame({
        "step": np.arange(len(s)), "ln_n_over_L": s, "path_length": path_of_s(s), "below_loss_at_zero": (s > 2.0).astype(int),
        "smoothed_margin": alpha, "beta": beta, "param_norm": s, "normalized_smoothed_margin": alpha / s,
        "alignment_cos": np.full_like(s, 0.999),
    })
    tmp_path.mkdir(parents=True, exist_ok=True)
    log.to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "summary.json").write_text(json.dumps({"path_length": float(path_of_s(s)[-1]), "homogeneity_degree": 1, "faithful_to_flow": True}))
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "fake", "config": {"rtol": 1e-7}}))
    run = RunData(tmp_path)
    run.n = n
    return run


def test_plateau_row_tells_a_spiral_from_a_converging_path(tmp_path):
    converging = _fake_run(tmp_path / "a", lambda s: 1.0 - 1.0 / s)  # finite length, rate 1/s
    spiral = _fake_run(tmp_path / "b", lambda s: np.log(s))  # grows linearly in the log of the clock
    assert path_length_plateau(converging, "c").status == PASS
    assert path_length_plateau(spiral, "s").status == FAIL


def test_lemma_c5_row_fails_when_violated(tmp_path):
    good = _fake_run(tmp_path / "a", lambda s: 1 - 1 / s)
    bad = _fake_run(tmp_path / "b", lambda s: 1 - 1 / s, alpha_beta=lambda a: a - 0.5)  # beta < alpha
    assert lemma_c5(good, "g").status == PASS
    assert lemma_c5(bad, "b").status == FAIL


# -- a small table, end to end ------------------------------------------------------------------


def test_small_verify_table_passes_and_writes_json(tmp_path):
    profile = Profile("test", {
        "deep-linear": ["dynamics=flow", "threads=1", "n=20", "d=4", "widths=4,4", "layer_scales=1.5,1,0.5", "target_ln_n_over_L=150"],
        "counterexample": 1e4,
    })
    rows = run_verify(profile, tmp_path, jobs=1, cases=["deep-linear", "counterexample"])
    statuses = {(r["source"], r["quantity"]): r["status"] for r in rows}
    assert len(rows) >= 15
    failed = [r for r in rows if r["status"] not in (PASS,)]
    assert not failed, format_table(failed)
    json.dumps(rows, allow_nan=False)  # JSON-safe: no NaN or inf
    assert any(source.startswith("Prop 4.4") for source, _ in statuses)
    table = format_table(rows)
    assert "PASS" in table and "Lemma C.5" in table


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["verify", "--only", "nonsense"]) == 2
    assert "unknown case" in capsys.readouterr().err
    assert main(["verify", "--json", str(tmp_path / "missing" / "out.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_refuses_a_non_empty_keep_folder(tmp_path, capsys):
    (tmp_path / "something").write_text("mine")
    assert main(["verify", "--keep", str(tmp_path), "--only", "counterexample"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "something").read_text() == "mine"


def test_srelu_experiment_reports_prop46_references(tmp_path):
    from diralign.runner import start_run

    summary, _, _ = start_run(
        "srelu", ["n=10", "width=6", "target_ln_n_over_L=30", "integrator=cvode", "lp_grid_points=300", "lp_certificate_step=0.05"],
        tmp_path / "run", quiet=True,
    )
    keys = ("local_lp_margin", "infinite_width_margin_lower", "infinite_width_margin_upper", "covering_epsilon")
    assert all(math.isfinite(summary[k]) for k in keys)
    trained = summary["min_normalized_margin"]
    assert trained == pytest.approx(summary["trained_margin_from_shares"], rel=1e-9)  # eq. 4.5 bookkeeping
    assert 0 < trained <= summary["local_lp_margin"] + 1e-12  # the trained shares are feasible for the LP
    assert summary["local_lp_margin"] <= summary["infinite_width_margin_upper"] + 1e-12  # m atoms are a measure
    assert 0 < summary["covering_epsilon"] <= 2.0
