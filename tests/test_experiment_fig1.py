"""diralign.experiments.fig1: Figure 1 end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from diralign.data.planar import embed
from diralign.errors import UserError
from diralign.models import (
    SquaredReLUNet,
)
from diralign.rundir import read_array_log

F64 = torch.float64

EPS = torch.finfo(F64).eps


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
