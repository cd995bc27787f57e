"""diralign.dynamics.gd: the paper's normalised GD."""

import numpy as np

from diralign.runner import start_run


def test_gd_reaches_target_and_never_logs_rejected_steps(tmp_path):
    summary, _, _ = start_run("deep-linear", ["dynamics=gd", "target_ln_n_over_L=100"], tmp_path / "gd", quiet=True)
    assert summary["ln_n_over_L"] >= 100
    assert summary["rejected_steps"] > 0 and summary["faithful_to_flow"] is False
    log = __import__("pandas").read_csv(tmp_path / "gd" / "log.csv")
    # accepted steps only: the risk never rises from one logged point to the next
    assert (np.diff(log["log_risk"].to_numpy()) <= 0).all()
    assert 1 - summary["svm_cos"] < 1e-4
