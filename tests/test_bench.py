"""Benchmark dynamics and harness: constant-gd against a hand-written loop, loss-based
rollback, matched-clock measurement, extrapolation, and a tiny ``run_bench`` whose JSON is
checked for structure and finiteness."""

import json
import math

import numpy as np
import pytest
import torch

from diralign.bench import finite_json, run_bench
from diralign.bench.baseline import extrapolate_steps
from diralign.bench.follow import follow
from diralign.bench.suite import Settings
from diralign.cli import main
from diralign.config import TrainConfig, apply_overrides
from diralign.data import separable_gaussian
from diralign.dynamics import make_dynamics
from diralign.models import DeepLinear
from diralign.problem import Problem


def _deep_problem():
    X, y = separable_gaussian(40, 4, 0.1, seed=3)
    model = DeepLinear(4, (5, 3), init_scale=1.0, generator=torch.Generator().manual_seed(1)).double()
    return Problem(model, X, y, "logistic", degree=3)


def _config(**changes):
    return apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in changes.items()])


def test_follow_matches_the_clock_on_the_crossing_step():
    problem = _deep_problem()
    dynamics = make_dynamics(problem, _config(dynamics="gd"))
    out = follow("gd", problem, problem.flat_params(), dynamics, [3.0, 6.0], time_cap=30.0)
    assert out.stop_reason == "all targets reached"
    for target, m in out.matched.items():
        assert m.iterate_ln_n_over_L >= target
        assert m.ln_n_over_L == pytest.approx(target, rel=1e-9)
        assert m.how in ("landed", "interpolated") and -1 <= m.alignment_cos <= 1
        assert float(m.direction.norm()) == pytest.approx(1.0, rel=1e-12)
    assert out.grad_evals >= out.matched[6.0].grad_evals >= out.matched[3.0].grad_evals > 0


def test_extrapolation_recovers_a_logarithmic_law():
    evals = np.geomspace(10, 1e5, 40)
    trace = {"grad_evals": list(evals), "ln_n_over_L": list(2.0 + 1.5 * np.log(evals))}
    out = extrapolate_steps(trace, [30.0])
    assert out["fit"]["b"] == pytest.approx(1.5, rel=1e-10)
    assert out["log10_grad_evals"]["30"] == pytest.approx((30.0 - 2.0) / 1.5 / math.log(10), rel=1e-9)


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_tiny_bench_run_writes_complete_finite_json(tmp_path):
    settings = Settings(
        quick=True,
        problems=("deep-linear",),
        targets=(3.0, 6.0),
        references={"deep-linear": ("dopri5", 1e-9, (3.0, 6.0))},
        time_cap=120.0,
        eval_cap=4000,  # caps in evaluations, not seconds: the same outcome on a busy machine
        reference_cap=120.0,
        check_cap=0.0,
        tolerances={"cvode": (1e-6,), "dopri5": (1e-6,)},
        tune_steps=10,
        overhead_steps=6,
    )
    path = tmp_path / "b.json"
    run_bench(settings, path, tmp_path / "wp", log=lambda *a: None, overhead_cases=("deep-linear",))
    text = path.read_text()
    results = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-finite number {c} in the JSON"))
    assert all(math.isfinite(x) for x in _numbers(results))
    section = results["problems"]["deep-linear"]
    assert set(section["dynamics"]) >= {"gd", "loss-based", "constant-gd", "flow/dopri5 rtol=1e-06", "flow/cvode rtol=1e-06"}
    for _label, record in section["dynamics"].items():
        assert set(record["targets"]) == {"3", "6"}
        for _target, at in record["targets"].items():
            if at["reached"]:
                assert at["grad_evals"] > 0 and at["wall_seconds"] >= 0
                assert at["direction_error"] is not None and 0 <= at["direction_error"] <= 2
                assert -1 <= at["alignment_cos"] <= 1 and at["reference_alignment_cos"] is not None
            else:
                assert at["grad_evals"] is None
        assert record["furthest"]["stop_reason"]
    # An error-controlled flow reaches both targets and stays on the reference's path; the
    # paper's normalised gd reaches them too, but its direction is measurably off the flow's.
    flow = section["dynamics"]["flow/dopri5 rtol=1e-06"]["targets"]["6"]
    gd = section["dynamics"]["gd"]["targets"]["6"]
    assert flow["reached"] and flow["direction_error"] < 1e-5
    assert gd["reached"] and gd["direction_error"] > 100 * flow["direction_error"]
    overhead = results["instrument_cost"]["deep-linear"]
    assert overhead["ratio"] > 0 and overhead["same_steps"] and overhead["logged_rows"] == 1 + 1 + 6  # W0, the warm-up step, every timed step
    assert (tmp_path / "wp.png").exists() and (tmp_path / "wp.pdf").exists()
    # A trace with points where no alignment was logged (sgd's, between its full-gradient
    # points) still plots: it once raised TypeError after a 50-minute H-AlexNet bench.
    from diralign.bench.figures import plot_results

    section["dynamics"]["gd"]["trace"]["alignment_cos"][1] = None
    plot_results(results, tmp_path / "wp-none")
    assert (tmp_path / "wp-none.png").exists()


def test_finite_json_replaces_non_finite():
    assert finite_json({"a": [1.0, float("nan")], "b": float("inf"), "c": 2}) == {"a": [1.0, None], "b": None, "c": 2}


def test_bench_cli_rejects_unknown_problem(capsys):
    assert main(["bench", "--problems", "nope", "--no-figure"]) == 2
    assert "nope" in capsys.readouterr().err
