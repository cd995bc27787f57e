"""diralign verify: references (LPs, counterexample), the row logic, and a small table run.

    python -m pytest tests/test_verify.py -q
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from diralign.cli import main
from diralign.verify import Profile, format_table, run_verify
from diralign.verify_checks import FAIL, PASS, RunData, lemma_c5, path_length_plateau

# -- LP references ------------------------------------------------------------------------------


# -- the counterexample -------------------------------------------------------------------------


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


def test_full_profile_runs_h_alexnet_on_the_sliding_flow(tmp_path):
    """The full profile's H-AlexNet rows are measured on the faithful dynamics (issue 12): gd
    for the transient, then the sliding flow from ln(n/L) = 2.  (Run here only a hair past the
    handover; the whole case takes ~half an hour.)"""
    from diralign.verify import FULL
    from diralign.verify_cases import alexnet_case

    setting = [x for x in FULL.cases["h-alexnet"] if not x.startswith(("target_ln_n_over_L=", "subset="))]
    rows = alexnet_case(setting + ["subset=10", "target_ln_n_over_L=2.05"], tmp_path)
    run = RunData(tmp_path / "h-alexnet")
    assert run.faithful and 2.0 <= run.summary["faithful_from_ln_n_over_L"] < 2.05
    assert run.summary["kink_events"]["captured"] > 0  # the flow ran, and met kinks
    assert all("(Cor 3.2 is about the flow)" not in r.note for r in rows)
