"""Data-parallel runs (issue 7): exact log-space reduction, identical decisions on every
rank, rank 0 alone writing, resume across rank counts, bounded exit when a rank dies.

Unit checks run the real reducer on W simulated ranks (threads sharing an all-gather);
end-to-end checks launch 2 CPU processes with ``python -m torch.distributed.run`` (gloo)
and compare against a single-process run of the same problem.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from diralign import distributed as dd
from diralign.config import apply_overrides
from diralign.errors import UserError
from diralign.experiments import get_experiment
from diralign.problem import Problem
from diralign.rundir import read_array_log
from diralign.runner import resume_run, start_run

# ---------------------------------------------------------------------------------------
# simulated ranks: the real DataParallel code, with all_gather done through shared memory


class SharedGather:
    """An all-gather among W threads (what gloo does among W processes)."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots = [None] * world

    def __call__(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor.detach().clone()
        self.barrier.wait()
        out = torch.stack(self.slots)
        self.barrier.wait()
        return out


def deep_linear_setup(seed=0, n=60):
    experiment = get_experiment("deep-linear")
    config = apply_overrides(experiment.default_config(), [f"seed={seed}", f"n={n}"])
    return experiment.setup(config, torch.float64, torch.device("cpu")), config


def on_ranks(world: int, work, n=60, seed=0):
    """Run ``work(rank, dp, setup)`` on ``world`` simulated ranks; return their results."""
    gather = SharedGather(world)
    results, errors = [None] * world, []

    def body(rank):
        try:
            setup, config = deep_linear_setup(seed, n)
            dp = dd.DataParallel(rank, world, 0)
            dp._all_gather = lambda tensor, what, rank=rank: gather(rank, tensor)
            setup = dp.prepare(setup, config)
            results[rank] = work(rank, dp, setup)
        except Exception as exc:  # reported below, per rank
            errors.append((rank, exc))
            if not isinstance(exc, dd.DistributedError):  # raised after a completed gather
                gather.barrier.abort()  # unblock the other ranks

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    real_is_initialized = torch.distributed.is_initialized
    torch.distributed.is_initialized = lambda: True  # prepare() must not open a real group
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.distributed.is_initialized = real_is_initialized
    return results, errors


def separating_parameters(problem, X, y, scale):
    """Rank-one layers whose product is ``scale^3`` times the SVM direction: every margin is
    at least ``scale^3 * gamma_svm``, so ``log L`` sits far below log(float64 min)."""
    from diralign.maxmargin import hard_margin_svm

    u = torch.as_tensor(hard_margin_svm(X, y).direction, dtype=torch.float64)
    w = torch.zeros(problem.dim, dtype=torch.float64)
    first, middle, last = problem.unflatten(w).values()
    first[0] = scale * u
    middle[0, 0] = scale
    last[0, 0] = scale
    return w


@pytest.mark.parametrize("world", [2, 7])
def test_sharded_evaluation_equals_full_data(world):
    """log L = logsumexp_r log L_r, grad = sum_r softmax_r grad_r: equal to the unsharded
    oracle to rounding, bit-equal on every rank, margins back in example order."""
    full_setup, _ = deep_linear_setup()
    w = full_setup.w0 * 1.7
    reference = full_setup.problem.evaluate(w)

    def work(rank, dp, setup):
        ev = setup.problem.evaluate(w)
        local = ev.margins.clone()
        return ev, local, dp.complete(ev), dp.bounds

    results, errors = on_ranks(world, work)
    assert not errors, errors
    bounds = results[0][3]
    assert bounds[0][0] == 0 and bounds[-1][1] == 60 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    for rank, (ev, local, full, _) in enumerate(results):
        assert math.isfinite(ev.log_risk)
        assert ev.log_risk == results[0][0].log_risk  # identical on every rank, bit for bit
        assert torch.equal(ev.grad, results[0][0].grad)
        assert math.isclose(ev.log_risk, reference.log_risk, rel_tol=1e-14)
        torch.testing.assert_close(ev.grad, reference.grad, rtol=1e-12, atol=1e-15)
        assert ev.correct == reference.correct
        a, b = bounds[rank]
        # (a forward pass on fewer rows may round differently in the BLAS)
        torch.testing.assert_close(local, reference.margins[a:b], rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(full.margins, reference.margins, rtol=1e-13, atol=1e-15)
        assert torch.equal(full.margins[a:b], local)


def test_two_ranks_bit_equal_to_two_chunks_and_far_below_float64():
    """The reduction is combine_log_space in rank order: a 2-rank evaluation is bit-identical
    to a single-process one with chunk_size = n/2, also where L itself underflows."""
    full_setup, _ = deep_linear_setup()
    problem = full_setup.problem
    w = separating_parameters(problem, full_setup.extras["X"], full_setup.extras["y"], scale=60.0)
    chunked = Problem(problem.model, problem.X, problem.y, problem.loss, problem.degree, chunk_size=30).evaluate(w)
    assert chunked.log_risk < -1000 and torch.isfinite(chunked.grad).all() and chunked.grad.norm() > 0

    results, errors = on_ranks(2, lambda rank, dp, setup: setup.problem.evaluate(w))
    assert not errors, errors
    for ev in results:
        assert ev.log_risk == chunked.log_risk
        assert torch.equal(ev.grad, chunked.grad)
    # and against the unchunked oracle, to rounding
    whole = problem.evaluate(w)
    assert math.isclose(results[0].log_risk, whole.log_risk, rel_tol=1e-14)
    torch.testing.assert_close(results[0].grad, whole.grad, rtol=1e-10, atol=0)


def test_minibatch_is_the_same_minibatch_on_any_number_of_ranks():
    """SGD's sampler: a global index set, each rank evaluating the members it holds (also
    none), reduced; equal to the single-process minibatch."""
    full_setup, _ = deep_linear_setup()
    w = full_setup.w0
    batches = [torch.tensor([3, 59, 17, 31, 0, 44]), torch.tensor([1, 2, 5]), torch.tensor([40, 41])]
    references = [full_setup.problem.evaluate_subset(w, b) for b in batches]

    results, errors = on_ranks(3, lambda rank, dp, setup: [setup.problem.evaluate_subset(w, b) for b in batches])
    assert not errors, errors
    for per_rank in results:
        for ev, ref in zip(per_rank, references):
            assert math.isclose(ev.log_risk, ref.log_risk, rel_tol=1e-14)
            torch.testing.assert_close(ev.grad, ref.grad, rtol=1e-12, atol=1e-15)
            assert ev.correct == ref.correct


def test_parameter_drift_is_an_error_on_every_rank():
    def work(rank, dp, setup):
        ev = setup.problem.evaluate(setup.w0)
        w = setup.w0.clone()
        if rank == 1:
            w[0] = torch.nextafter(w[0], torch.tensor(math.inf, dtype=w.dtype))  # one ulp
        dp.check_in_sync(SimpleNamespace(w=w, ev=ev, steps=7))

    _, errors = on_ranks(2, work)
    assert sorted(r for r, _ in errors) == [0, 1]
    for _, exc in errors:
        assert isinstance(exc, dd.DistributedError) and "ranks [1] differ from rank 0 in parameters at step 7" in str(exc)


def test_different_data_on_ranks_is_refused():
    gather = SharedGather(2)
    errors = []

    def body(rank):
        try:
            setup, config = deep_linear_setup(seed=rank)  # rank 1 builds other data
            dp = dd.DataParallel(rank, 2, 0)
            dp._all_gather = lambda tensor, what: gather(rank, tensor)
            dp.prepare(setup, config)
        except Exception as exc:
            errors.append(exc)

    real = torch.distributed.is_initialized
    torch.distributed.is_initialized = lambda: True
    try:
        threads = [threading.Thread(target=body, args=(r,)) for r in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        torch.distributed.is_initialized = real
    assert len(errors) == 2 and all("differ from rank 0 in data and initial parameters" in str(e) for e in errors)


def test_launch_rules(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    run = lambda wanted: dd.coordinator_for("run", wanted, "cpu", None)  # noqa: E731
    assert run(False) is None
    assert dd.coordinator_for("resume", True, "cpu", None) is None
    with pytest.raises(UserError, match="needs a torchrun launch"):
        run(True)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="add --set distributed=true"):
        run(False)
    ctx = run(True)
    assert (ctx.rank, ctx.world_size, ctx.is_writer) == (1, 2, False)
    assert dd.coordinator_for("resume", True, "cpu", None).rank == 1


# ---------------------------------------------------------------------------------------
# end to end: 2 processes under torchrun (gloo) against one process

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun_command(nproc, *args):
    return [*TORCHRUN, str(nproc), "-m", "diralign", *map(str, args)]


def torchrun(nproc, *args, timeout=240):
    result = subprocess.run(torchrun_command(nproc, *args), capture_output=True, text=True, timeout=timeout, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def summary_of(path):
    return json.loads((path / "summary.json").read_text())


def assert_same_run(got: dict, want: dict, rel=1e-8):
    """Every number of the summary: floats to ``rel``, counts to 1% (a step-size decision
    may flip on rounding), the rest exactly."""
    compared = 0
    for key, value in want.items():
        if "seconds" in key:
            continue
        other = got[key]
        if isinstance(value, bool) or value is None or isinstance(value, str):
            assert other == value, key
        elif isinstance(value, int):
            assert abs(other - value) <= 0.01 * max(abs(value), 1), (key, other, value)
        elif isinstance(value, float):
            # abs_tol: measured rounding residues (homogeneity violations ~1e-16) are noise
            assert math.isfinite(other) and math.isclose(other, value, rel_tol=rel, abs_tol=1e-12), (key, other, value)
        elif isinstance(value, list):
            np.testing.assert_allclose(np.asarray(other, float), np.asarray(value, float), rtol=rel, atol=1e-12, err_msg=key)
        compared += 1
    assert compared >= 15


DEEP_LINEAR = ["--set", "threads=1", "--set", "rtol=1e-8"]


@pytest.mark.slow
def test_two_processes_equal_one_and_only_rank_zero_writes(tmp_path):
    sets = [*DEEP_LINEAR, "--set", "target_ln_n_over_L=8"]
    out = tmp_path / "two"
    torchrun(2, "run", "deep-linear", "--out", out, "--set", "distributed=true", *sets, "--quiet", "--no-plot")
    overrides = [s for s in sets if s != "--set"]
    want, _, _ = start_run("deep-linear", overrides, tmp_path / "one", quiet=True)
    got = summary_of(out)
    assert_same_run(got, summary_of(tmp_path / "one"))
    assert got["train_accuracy"] == 1.0 and got["ln_n_over_L"] >= 8
    # margins gathered at every log point, in example order
    np.testing.assert_allclose(np.load(out / "final_margins.npy"), np.load(tmp_path / "one" / "final_margins.npy"), rtol=1e-8)
    log = pd.read_csv(out / "log.csv")
    assert len(log) == len(pd.read_csv(tmp_path / "one" / "log.csv")) and log["step"].is_unique
    margins = read_array_log(out, "margins")  # one writer: one row of all n margins per log point
    assert margins.shape == (len(log), 60)
    np.testing.assert_allclose(margins, read_array_log(tmp_path / "one", "margins"), rtol=1e-6)
    assert json.loads((out / "config.json").read_text())["data"]["distributed"]["world_size"] == 2
    # determinism: bit-identical to one process evaluating the same two halves as chunks
    chunked, _, _ = start_run("deep-linear", [*overrides, "chunk_size=30"], tmp_path / "chunks", quiet=True)
    assert {k: v for k, v in got.items() if "seconds" not in k} == {
        k: v for k, v in summary_of(tmp_path / "chunks").items() if "seconds" not in k
    }
    assert np.array_equal(np.load(out / "final_margins.npy"), np.load(tmp_path / "chunks" / "final_margins.npy"))


def _rank_pid(launcher_pid: int, rank: int):
    """The pid of the torchrun worker with RANK=rank (read from /proc)."""
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.slow
def test_rank_death_exits_bounded_and_resumes_on_one_and_two_processes(tmp_path):
    sets = [*DEEP_LINEAR, "--set", "target_ln_n_over_L=15", "--set", "checkpoint_every_steps=10"]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        torchrun_command(2, "run", "deep-linear", "--out", out, "--set", "distributed=true", *sets, "--quiet", "--no-plot"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None and proc.poll() is None, "the run ended before a rank could be killed"
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        _, stderr = proc.communicate(timeout=60)
        exit_seconds = time.time() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert exit_seconds < 30, exit_seconds
    message = [line for line in stderr.splitlines() if line.startswith("diralign: error: rank 0/2")]
    assert message and "died or hung" in message[0] and "resume" in message[0], stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["experiment"] == "deep-linear"
    assert not (out / "summary.json").exists()

    copy = tmp_path / "killed-copy"
    shutil.copytree(out, copy)
    resume_run(out, quiet=True)  # 2 processes -> 1
    torchrun(2, "resume", copy, "--quiet", "--no-plot")  # 2 processes -> 2
    start_run("deep-linear", [s for s in sets if s != "--set"], tmp_path / "one", quiet=True)
    want = summary_of(tmp_path / "one")
    for run in (out, copy):
        assert_same_run(summary_of(run), want)
        log = pd.read_csv(run / "log.csv")
        assert log["step"].is_monotonic_increasing and log["step"].is_unique
        assert len(log) == len(pd.read_csv(tmp_path / "one" / "log.csv"))


@pytest.mark.slow
def test_fig1_width_1000_two_processes_equal_one(tmp_path):
    """The explicit reference integrator (dopri5): with cvode, whose Newton/GMRES iteration
    counts react to last-bit differences, the runs agree to its tolerance instead (~2e-8
    at rtol 1e-7, measured) -- and bit for bit with one process using chunk_size = n/2."""
    sets = ["--set", "threads=1", "--set", "width=1000", "--set", "target_ln_n_over_L=5",
            "--set", "integrator=dopri5", "--set", "ntk_target_ln_n_over_L=3"]
    out = tmp_path / "two"
    torchrun(2, "run", "fig1", "--out", out, "--set", "distributed=true", *sets, "--quiet", "--no-plot")
    # The reference in a process of its own with the workers' environment: finish() solves
    # the NTK SVM with numpy/Clarabel, whose BLAS threads (OMP_NUM_THREADS) change rounding.
    one = subprocess.run([sys.executable, "-m", "diralign", "run", "fig1", "--out", tmp_path / "one", *sets, "--quiet", "--no-plot"],
                         capture_output=True, text=True, timeout=240, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    got, want = summary_of(out), summary_of(tmp_path / "one")
    assert_same_run(got, want)
    assert got["train_accuracy"] == 1.0 and got["first_separable_step"] == want["first_separable_step"]
    for name in ("fig1_a.npz", "fig1_b.npz", "fig1_c.npz", "surfaces.bin"):
        assert (out / name).is_file(), name
