"""diralign.trainer: milestones measured at the milestone, goals, budgets inside steps."""

import math

import pytest

from diralign.rundir import schema
from diralign.runner import start_run


@pytest.mark.slow
@pytest.mark.parametrize("integrator, long_target", [("cvode", 300), ("dopri5", 120)])
def test_milestone_alignment_does_not_depend_on_the_target(tmp_path, integrator, long_target):
    """The flow lands on ln(n/L) = 10 and 30 whatever the run's goal, so the values agree to
    the integrator's tolerance (formerly interpolated between log points: off by 3e-2)."""
    extra = [f"integrator={integrator}", "rtol=1e-8"]
    short, _, _ = start_run("deep-linear", ["target_ln_n_over_L=30", *extra], tmp_path / "a", quiet=True)
    long, _, _ = start_run("deep-linear", [f"target_ln_n_over_L={long_target}", *extra], tmp_path / "b", quiet=True)
    for milestone in (10.0, 30.0):
        key = schema.milestone_key(milestone)
        assert short[key] is not None and math.isfinite(short[key])
        assert abs(short[key] - long[key]) <= 1e-5, (key, short[key], long[key])
    assert long[schema.milestone_key(100.0)] is not None and short[schema.milestone_key(100.0)] is None


def test_wall_budget_inside_a_long_step(tmp_path):
    """max_wall_seconds stops a run even when one step would take far longer: dopri5 at a
    tolerance so tight that its first steps crawl (thousands of evaluations each)."""
    import time

    start = time.perf_counter()
    summary, state, _ = start_run(
        "fig1", ["width=2000", "integrator=dopri5", "rtol=1e-13", "atol=0", "max_wall_seconds=2", "ntk_target_ln_n_over_L=5"],
        tmp_path / "f", quiet=True,
    )
    assert summary["stop_reason"] == "max_wall_seconds"
    assert summary["wall_seconds"] < 2 + 5
    assert time.perf_counter() - start < 60
