"""The distributed flow is exact (issue 16, item 11).

* Hessian-vector products of chunked and sharded problems combine exactly in log space
  (``H v = sum_p pi_p (H_p v + g_p <g_p, v>) - g <g, v>``), against the unsharded double
  backward and finite differences, also far below float64's smallest risk.
* A run's arithmetic is its ``pieces`` (fixed when it starts): the same pieces give the same
  bits on any number of processes, for every oracle call and every dynamics, resumes across
  process counts included.  Against a run in *one* piece the numbers agree to rounding only
  (the summation order differs; CVODE's Newton and GMRES iterations amplify last bits to
  ~1e-8 relative at rtol 1e-6), so the reference of a W-process run is one process with
  ``pieces = W``, which is what a W-process run records in its config.
"""

import collections
import contextlib
import json
import math
import subprocess
import sys
import threading

import pandas as pd
import pytest
import torch

from diralign.config import apply_overrides
from diralign.experiments import get_experiment
from diralign.problem import Problem
from diralign.rundir import schema
from diralign.runner import resume_run, start_run
from diralign.trainer import Interrupted, Trainer
from simulated_ranks import on_ranks

N = 60


def setup_and_config(*overrides):
    experiment = get_experiment("deep-linear")
    config = apply_overrides(experiment.default_config(), [f"n={N}", *overrides])
    return experiment.setup(config, torch.float64, torch.device("cpu")), config


def separating_point(problem, X, y, scale):
    """Rank-one layers whose product is ``scale^3`` times the SVM direction (log L << -745)."""
    from diralign.maxmargin import hard_margin_svm

    u = torch.as_tensor(hard_margin_svm(X, y).direction, dtype=torch.float64)
    w = torch.zeros(problem.dim, dtype=torch.float64)
    first, middle, last = problem.unflatten(w).values()
    first[0] = scale * u
    middle[0, 0] = scale
    last[0, 0] = scale
    return w + 1e-3 * torch.randn(problem.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def reference_hvp(problem, w, v):
    leaf = w.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.log_risk_fn(leaf), leaf, create_graph=True)
    (hv,) = torch.autograd.grad(g, leaf, v)
    return hv


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("where", ["early", "late"])
def test_hessian_vector_products_of_pieces_and_chunks_are_exact(where):
    setup, _ = setup_and_config()
    problem = setup.problem
    if where == "early":
        w = setup.w0 * 3.0
    else:
        w = separating_point(problem, setup.extras["X"], setup.extras["y"], 40.0)
    v = torch.randn(problem.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = reference_hvp(problem, w, v)
    whole = problem.curvature(w)
    assert torch.equal(whole.hvp(v), want)  # one piece: the plain double backward
    if where == "late":
        assert whole.log_risk < -1000  # L itself far below the smallest float64
    # Early: rounding.  Late, float64 limits every way of computing H v (margins ~ 1e4 carry
    # 1e-12 absolute error into the softmax weights): measured against a 45-digit mpmath value
    # the whole problem's double backward is 2.1e-11 off and the pieces 0.5-2.5e-11.
    tol = 1e-12 if where == "early" else 1e-10
    for variant in (Problem(problem.model, problem.X, problem.y, problem.loss, problem.degree, chunk_size=7),
                    problem.split(4), problem.split(3)):
        c = variant.curvature(w)
        assert math.isclose(c.log_risk, whole.log_risk, rel_tol=1e-14)
        assert rel(c.grad, whole.grad) < tol
        assert rel(c.hvp(v), want) < tol
    if where == "early":  # and against central differences of the gradient
        eps = 1e-5
        fd = (problem.evaluate(w + eps * v).grad - problem.evaluate(w - eps * v).grad) / (2 * eps)
        assert rel(want, fd) < 1e-7


@pytest.mark.parametrize("world, pieces", [(2, 2), (2, 4), (3, 2)])
def test_the_same_pieces_give_the_same_bits_on_any_number_of_processes(world, pieces):
    """Evaluations, minibatches and Hessian-vector products of W ranks holding a run's P
    pieces (several each, or none) are bit-identical to one process with the P pieces."""
    setup, config = setup_and_config(f"pieces={pieces}")
    one = setup.problem.split(pieces)
    w = setup.w0 * 2.0
    v = torch.randn(one.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batches = [torch.tensor([3, 59, 17, 31, 0, 44]), torch.tensor([1, 2, 5]), torch.tensor([40, 41])]
    ev, curv = one.evaluate(w), one.curvature(w)
    subsets = [one.evaluate_subset(w, b) for b in batches]
    hv = curv.hvp(v)

    def work(rank, dp):
        s, c = setup_and_config(f"pieces={pieces}")
        problem = dp.prepare(s, c).problem
        e = problem.evaluate(w)
        k = problem.curvature(w)
        return e, dp.complete(e), [problem.evaluate_subset(w, b) for b in batches], k, k.hvp(v)

    results, errors = on_ranks(world, work)
    assert not errors, errors
    for e, full, subs, k, h in results:
        assert e.log_risk == ev.log_risk and torch.equal(e.grad, ev.grad) and e.correct == ev.correct
        assert torch.equal(full.margins, ev.margins)
        for got, want in zip(subs, subsets):
            assert got.log_risk == want.log_risk and torch.equal(got.grad, want.grad) and got.correct == want.correct
        assert k.log_risk == curv.log_risk and torch.equal(k.grad, curv.grad)
        assert torch.equal(h, hv)


def numbers(summary):
    return {k: v for k, v in summary.items() if k not in schema.TIMING_KEYS}


DYNAMICS = {
    "flow/cvode": ["target_ln_n_over_L=30"],  # exact J*v from s ~ 21 (k s rtol > DQ_LIMIT)
    "flow/dopri5": ["integrator=dopri5", "target_ln_n_over_L=6"],
    "gd": ["dynamics=gd", "target_ln_n_over_L=15"],
    "sgd": ["dynamics=sgd", "batch_size=16", "target_ln_n_over_L=6"],
    "loss-based": ["dynamics=loss-based", "target_ln_n_over_L=15"],
}


def two_ranks(out, sets=(), resume=False):
    """start_run (or resume_run) of ``out`` on 2 simulated ranks; rank 0 writes."""
    experiment = get_experiment("deep-linear")

    def work(rank, dp):
        if resume:
            return resume_run(out, quiet=True, coordinator=dp)[0]
        config = apply_overrides(experiment.default_config(), ["distributed=true", *sets])
        return start_run(experiment, config, out, quiet=True, coordinator=dp)[0]

    results, errors = on_ranks(2, work)
    if errors and all(isinstance(e, Interrupted) for _, e in errors):
        raise errors[0][1]
    assert not errors, errors
    assert numbers(results[0]) == numbers(results[1])
    return results[0]


@pytest.mark.parametrize("dynamics", list(DYNAMICS))
def test_every_dynamics_on_two_ranks_equals_one_process_bit_for_bit(tmp_path, dynamics, monkeypatch):
    sets = ["threads=1", f"n={N}", *DYNAMICS[dynamics]]
    products = []
    real = Problem.curvature
    monkeypatch.setattr(Problem, "curvature", lambda self, w: products.append(1) or real(self, w))
    two = two_ranks(tmp_path / "two", sets)
    assert json.loads((tmp_path / "two" / schema.CONFIG).read_text())["config"]["pieces"] == 2
    one, _, _ = start_run("deep-linear", [*sets, "pieces=2"], tmp_path / "one", quiet=True)
    assert numbers(two) == numbers(one)
    assert two["dynamics"] == dynamics and two["stop_reason"] == "target_ln_n_over_L"
    if dynamics == "flow/cvode":
        assert products  # the exact sharded J*v was used
        # A run in one piece sums in another order: the same to rounding, and to what the
        # Newton iterations make of last-bit differences (measured 1.2e-8 at s = 1000).
        single, _, _ = start_run("deep-linear", sets, tmp_path / "single", quiet=True)
        for key in ("ln_n_over_L", "min_normalized_margin", "alignment_cos", "param_norm"):
            assert math.isclose(two[key], single[key], rel_tol=1e-6), key


@contextlib.contextmanager
def killed_after_checkpoint(count):
    """Every rank stops (as if killed) right after its ``count``-th checkpoint of the session."""
    real = Trainer.checkpoint
    seen = collections.Counter()

    def checkpoint(self, state, dynamics_state=None):
        real(self, state, dynamics_state)
        seen[threading.get_ident()] += 1
        if seen[threading.get_ident()] == count:
            raise Interrupted("the test")

    Trainer.checkpoint = checkpoint
    try:
        yield
    finally:
        Trainer.checkpoint = real


def test_resume_across_process_counts_is_bit_identical(tmp_path):
    """Cut on 2 ranks, continued and cut on 1 process, finished on 2 ranks: the run ends where
    the uninterrupted one does, bit for bit (the flow replays its segment on resume)."""
    sets = ["threads=1", f"n={N}", "target_ln_n_over_L=30", "checkpoint_every_steps=15"]
    reference, _, _ = start_run("deep-linear", [*sets, "pieces=2"], tmp_path / "whole", quiet=True)
    path = tmp_path / "parts"
    with killed_after_checkpoint(2), pytest.raises(Interrupted):
        two_ranks(path, sets)
    with killed_after_checkpoint(2), pytest.raises(Interrupted):
        resume_run(path, quiet=True)  # one process holding both pieces
    summary = two_ranks(path, resume=True)
    assert numbers(summary) == numbers(reference)
    steps = pd.read_csv(path / schema.LOG)["step"]
    assert steps.is_unique and len(steps) == len(pd.read_csv(tmp_path / "whole" / schema.LOG))


# ---------------------------------------------------------------------------------------
# end to end: torchrun, the acceptance command of the issue

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "diralign"]


def _env():
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.slow
def test_torchrun_default_flow_equals_one_process_and_resumes_on_one(tmp_path):
    sets = ["--set", "threads=1", "--set", "target_ln_n_over_L=60"]
    out = tmp_path / "two"
    done = subprocess.run([*TORCHRUN, "run", "deep-linear", "--out", str(out), "--set", "distributed=true", *sets,
                           "--quiet", "--no-plot"], capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    overrides = [s for s in sets if s != "--set"]
    one, _, _ = start_run("deep-linear", [*overrides, "pieces=2"], tmp_path / "one", quiet=True)
    two = json.loads((out / schema.SUMMARY).read_text())
    assert two["dynamics"] == "flow/cvode"
    assert numbers(two) == numbers(one)
    # cut by its budget under torchrun (inside a step: ranks agree at the all-gathers),
    # finished by one process (the flow replays its segment, the budget waiting for that)
    cut = tmp_path / "cut"
    first = subprocess.run([*TORCHRUN, "run", "deep-linear", "--out", str(cut), "--set", "distributed=true", *sets,
                            "--set", "max_wall_seconds=3", "--set", "checkpoint_every_steps=5", "--quiet", "--no-plot"],
                           capture_output=True, text=True, timeout=300, env=_env())
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((cut / schema.SUMMARY).read_text())
    assert summary["stop_reason"] == "max_wall_seconds"
    for _ in range(30):
        if summary["stop_reason"] == "target_ln_n_over_L":
            break
        summary, _, _ = resume_run(cut, quiet=True)
    assert numbers(summary) == numbers(one)
