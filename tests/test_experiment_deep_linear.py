"""diralign.experiments.deep_linear: Prop. 4.4 end to end."""

import json
import math

import numpy as np

from diralign.runner import start_run


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
