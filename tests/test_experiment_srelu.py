"""diralign.experiments.srelu: Prop. 4.6 references."""

from __future__ import annotations

import math

import pytest


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
