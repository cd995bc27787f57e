"""Non-separable data (issue 16, item 7).

* Refused before training where it is cheap to know: contradictory duplicates (any model)
  and linear predictors (binary, multi-class, the deep-linear product) by a linear program;
  one line, exit 2, nothing written.
* Elsewhere the stall goal stops the run (``stop_reason: "stalled"`` and a message), and
  budgets and signals reach inside the step in which the flow spins towards the risk's
  positive limit: on one process and on several.
"""

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import diralign
from diralign.cli import main
from diralign.config import apply_overrides
from diralign.errors import UserError
from diralign.experiments.custom import CustomExperiment
from diralign.models import SquaredReLUNet
from diralign.runner import start_run
from diralign.stall import StallWatch, fresh_state
from simulated_ranks import on_ranks

SRC = Path(__file__).resolve().parents[1] / "src"


def separable(n=30, d=4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, np.where(X[:, 0] > 0, 1.0, -1.0)


def save(path, X, y):
    np.savez(path, X=X, y=y)
    return str(path)


# -- refused up front ----------------------------------------------------------------------
def refused(capsys, args, out):
    assert main(["run", *args, "--out", str(out), "--quiet", "--no-plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diralign: error: "), err
    assert not out.exists()
    return err[0]


def test_contradictory_duplicates_are_refused_for_any_model(tmp_path, capsys):
    X, y = separable()
    X, y = np.vstack([X, X[3:4]]), np.concatenate([y, -y[3:4]])
    line = refused(capsys, ["linear", "--set", f"data={save(tmp_path / 'dup.npz', X, y)}"], tmp_path / "r")
    assert "examples 3 and 30 have the same input and different labels" in line
    # a nonlinear model, from Python; -0.0 and 0.0 are the same input
    X2 = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-0.0, 1.0]], dtype=torch.float64)
    with pytest.raises(UserError, match="examples 0 and 2 have the same input"):
        diralign.train(SquaredReLUNet(2, 4), X2, torch.tensor([1.0, -1.0, -1.0]), out=tmp_path / "p", quiet=True)
    with pytest.raises(UserError, match="examples 1 and 2 have the same input and different labels \\(2 and 0\\)"):
        diralign.train(torch.nn.Linear(2, 3, bias=False), torch.tensor([[0.0, 1.0], [2.0, 1.0], [2.0, 1.0]]),
                       torch.tensor([1, 2, 0]), out=tmp_path / "m", quiet=True)


@pytest.mark.parametrize("experiment", ["linear", "deep-linear"])
def test_linearly_inseparable_data_are_refused_for_linear_models(tmp_path, capsys, experiment):
    X, y = separable()
    y[0] = -y[0]  # one flipped label: not linearly separable (checked by the LP), no duplicate
    line = refused(capsys, [experiment, "--set", f"data={save(tmp_path / 'noisy.npz', X, y)}"], tmp_path / "r")
    assert "not linearly separable" in line and "linear program" in line


def test_multiclass_linear_and_bottlenecked_products_are_checked_too(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(30, 4))
    y = np.argmax(X[:, :3], axis=1)
    X, y = torch.tensor(np.vstack([X, 2 * X[:1]])), torch.tensor(np.concatenate([y, [(y[0] + 1) % 3]]))
    for model in (torch.nn.Linear(4, 3, bias=False),
                  torch.nn.Sequential(torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(2, 3, bias=False))):
        with pytest.raises(UserError, match="not multi-class linearly separable"):
            diralign.train(model, X, y, out=tmp_path / "m", quiet=True)
    # separable data pass the check (and train)
    run = diralign.train(torch.nn.Linear(4, 3, bias=False), X[:30], y[:30], target_ln_n_over_L=3, out=tmp_path / "ok",
                         quiet=True, dynamics="gd")
    assert run.summary["stop_reason"] == "target_ln_n_over_L"


# -- the stall goal ----------------------------------------------------------------------
def replay(trajectory, seconds=1.0, tolerance=1e-3, dt=0.01, until=300.0):
    """The time at which the watch stops ``s(T)``, or None."""
    watch = StallWatch(seconds, tolerance, fresh_state(), n=10)
    T = 0.0
    while T <= until:
        watch.observe_s(trajectory(T))
        if watch.stalled(T):
            return T
        T += dt
    return None


@pytest.mark.parametrize("name, trajectory", [
    ("constant-step gd, L ~ 1/t", lambda T: 0.4 + math.log1p(T)),
    ("normalised gd, s grows geometrically", lambda T: 0.4 * math.exp(0.05 * T)),
    ("saddle escape from a tiny init", lambda T: 0.367 + 1e-12 * math.exp(T / 3)),
    ("crawling but steady flow", lambda T: 1.0 + 0.01 * T),
])
def test_progress_never_stalls(name, trajectory):
    assert replay(trajectory) is None, name


@pytest.mark.parametrize("name, trajectory, by", [
    # windows [0, 1], [1, 2], [2, 4], ...: the first whose rise is below 1e-3 (and no more
    # than the one before) ends the run
    ("risk converging to a positive limit", lambda T: 1.06 - 0.7 * math.exp(-T), 16.5),  # rise 2.3e-4 in [8, 16]
    ("flow spinning inside one step", lambda T: min(1.0, 0.4 + T), 2.5),  # no rise at all in [1, 2]
    ("sublinear approach", lambda T: 1.06 - 0.7 / (1 + T), 1100.0),  # rise ~0.35/T per doubling
])
def test_a_risk_with_a_positive_limit_stalls(name, trajectory, by):
    T = replay(trajectory, dt=0.01 if by < 100 else 0.5, until=2 * by)
    assert T is not None and 2.0 <= T <= by, (name, T)


def one_neuron(seed=0, n=30):
    """Data that a single squared ReLU cannot separate (its output has one sign): the
    infimum of the risk is the loss of the other class at margin 0, approached as W grows."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return SquaredReLUNet(3, 1, signs="alternating", generator=g), X, torch.where(X[:, 0] > 0, 1.0, -1.0)


@pytest.mark.parametrize("dynamics", ["flow", "gd"])
def test_nonlinear_model_on_inseparable_data_stops_stalled_with_a_message(tmp_path, dynamics):
    model, X, y = one_neuron()
    start = time.perf_counter()
    run = diralign.train(model, X, y, dynamics=dynamics, target_ln_n_over_L=50, out=tmp_path / "r", quiet=True,
                         stall_seconds=0.5, max_wall_seconds=60)
    s = run.summary
    assert s["stop_reason"] == "stalled" and "the risk has stalled" in s["stop_message"]
    assert s["ln_n_over_L"] < 1.1 and s["wall_seconds"] < 15 and time.perf_counter() - start < 40


def test_budget_ends_the_spinning_flow_step_without_the_stall_goal(tmp_path):
    model, X, y = one_neuron()
    run = diralign.train(model, X, y, dynamics="flow", target_ln_n_over_L=50, out=tmp_path / "r", quiet=True,
                         stall_seconds=0, max_wall_seconds=2.5)
    assert run.summary["stop_reason"] == "max_wall_seconds" and run.summary["stop_message"] is None
    assert 2.5 <= run.summary["wall_seconds"] < 3.5


def interrupt_when_spinning(command, env, out, signum):
    """Start ``command`` (which shows its progress bar), wait until it trains and its log on
    disk has not grown for 1.5 s (the flow is inside the step that cannot end), send
    ``signum``: ``(returncode, seconds to exit, stderr)``."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline, last, changed = time.time() + 120, None, time.time()
        while time.time() < deadline and proc.poll() is None:
            log = out / "log.csv"
            rows = len(log.read_text().splitlines()) if log.exists() else 0
            if rows != last:
                last, changed = rows, time.time()
            elif "ln(n/L)" in "".join(err) and time.time() - changed > 1.5:  # the bar: training
                break
            time.sleep(0.05)
        assert proc.poll() is None, "".join(err)[-2000:]
        proc.send_signal(signum)
        sent = time.time()
        proc.wait(timeout=60)
        took = time.time() - sent
        reader.join(timeout=10)
        return proc.returncode, took, "".join(err)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_signals_inside_the_spinning_step_exit_at_once_and_resume(tmp_path):
    """SIGINT, then (after resume) SIGTERM while CVODE spins inside one step (the data cannot
    be separated, stall goal off): exit 130 within seconds each time, checkpoint written."""
    model, X, y = one_neuron()
    (tmp_path / "onenet.py").write_text(
        "from diralign.models import SquaredReLUNet\n"
        "def make(in_features, generator):\n"
        "    return SquaredReLUNet(in_features, 1, signs='alternating', generator=generator)\n")
    data = save(tmp_path / "d.npz", X.numpy(), y.numpy())
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{SRC}", OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "diralign", "run", "custom", "--set", "model=onenet:make", "--set", f"data={data}",
           "--set", "target_ln_n_over_L=50", "--set", "stall_seconds=0", "--set", "max_wall_seconds=100",
           "--set", "checkpoint_every_steps=1", "--out", str(out), "--no-plot"]  # the log on disk at every step
    # (exit measured at 0.5-1.9 s on a loaded 2-core machine, interpreter shutdown included;
    # it spun for 9 minutes, deaf to signals, before in-step aborts)
    code, took, err = interrupt_when_spinning(run, env, out, signal.SIGINT)
    assert code == 130 and took < 5, (code, took, err[-2000:])
    assert "diralign resume" in err and not (out / "summary.json").exists()
    resume = [sys.executable, "-m", "diralign", "resume", str(out), "--no-plot"]
    code, took, err = interrupt_when_spinning(resume, env, out, signal.SIGTERM)
    assert code == 130 and took < 5, (code, took, err[-2000:])
    log = pd.read_csv(out / "log.csv")
    assert log["step"].is_unique and log["ln_n_over_L"].max() < 1.2


@pytest.mark.parametrize("goal", ["stalled", "max_wall_seconds"])
def test_ranks_leave_the_spinning_step_together(tmp_path, goal):
    """Two data-parallel ranks: the abort is decided at the step's all-gathers, alike on
    every rank, so both stop with the same reason and numbers and nothing hangs."""
    sets = ["distributed=true", "dynamics=flow", "target_ln_n_over_L=50", "threads=1"]
    sets += ["stall_seconds=0.5", "max_wall_seconds=60"] if goal == "stalled" else ["stall_seconds=0", "max_wall_seconds=2"]

    def work(rank, dp):
        model, X, y = one_neuron()
        experiment = CustomExperiment(model, X, y)
        config = apply_overrides(experiment.default_config(), [*sets, "model=in-memory", "data=in-memory"])
        return start_run(experiment, config, tmp_path / "r", quiet=True, coordinator=dp)[0]

    results, errors = on_ranks(2, work)
    assert not errors, errors
    assert results[0]["stop_reason"] == results[1]["stop_reason"] == goal
    assert results[0]["ln_n_over_L"] == results[1]["ln_n_over_L"] and results[0]["steps"] == results[1]["steps"]
