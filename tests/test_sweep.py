"""Sweeps: the grid and its names, bad input (one line, exit 2, nothing on disk lost), a
local pool that runs, resumes, skips and reports failures, signal forwarding, the point
lock, and the same points through submitit's local executor."""

import fcntl
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from diralign import cli, runner, sweep
from diralign.errors import UserError
from diralign.experiments.deep_linear import DeepLinearExperiment
from diralign.trainer import Callback

TINY = ["--set", "target_ln_n_over_L=5", "--no-plot"]


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_grid_parsing_and_names():
    grid = sweep.parse_grid(["width=200,400", "seed=0,1"])
    assert grid == [("width", ["200", "400"]), ("seed", ["0", "1"])]
    points = sweep.expand("fig1", grid, ["target_ln_n_over_L=30"])
    assert [p.name for p in points] == ["width=200,seed=0", "width=200,seed=1", "width=400,seed=0", "width=400,seed=1"]
    assert points[1].overrides == ["target_ln_n_over_L=30", "width=200", "seed=1"]
    assert sweep.point_name({"data": "/tmp/my data.npz"}) == "data=_tmp_my_data.npz"
    long = sweep.point_name({"data": "x" * 500})
    assert len(long) <= 120 and long != sweep.point_name({"data": "x" * 499})


@pytest.mark.parametrize(
    "specs, fragment",
    [
        ([], "at least one --grid"),
        (["width="], "has no values"),
        (["width=1,2", "width=3"], "given twice"),
        (["width=1,1"], "repeats a value"),
        (["width"], "KEY=V1,V2"),
    ],
)
def test_bad_grids(specs, fragment):
    with pytest.raises(UserError, match=fragment):
        sweep.parse_grid(specs)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--grid", "widht=1,2"], ["unknown config key 'widht'"]),
        (["--grid", "width=1,abc"], ["--grid width", "expected int"]),
        (["--grid", "width="], ["has no values"]),
        ([], ["at least one --grid"]),
        (["--grid", "seed=0,1", "--jobs", "0"], ["--jobs must be a positive integer"]),
        (["--grid", "seed=0,1", "--jobs", "two"], ["--jobs"]),
        (["--grid", "seed=0,1", "--set", "seed=3"], ["both in --grid and --set"]),
        (["--grid", "dtype=float64,float16"], ["--grid dtype", "dtype must be one of"]),  # validated up front
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, fragments):
    out = tmp_path / "S"
    assert cli.main(["sweep", "fig1", "--out", str(out), *args]) == 2
    one_line_error(capsys, *fragments)
    assert not out.exists()


def test_foreign_or_other_sweep_directory_is_refused(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["sweep", "deep-linear", "--grid", "seed=0,1", "--out", str(foreign)]) == 2
    one_line_error(capsys, "holds no sweep.json")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    other = tmp_path / "S"
    sweep.prepare_dir(other, sweep.sweep_record("deep-linear", [("seed", ["0", "1"])], []))
    assert cli.main(["sweep", "deep-linear", "--grid", "seed=0,1,2", "--out", str(other)]) == 2
    one_line_error(capsys, "holds another sweep", "--grid seed=0,1")


class _Crash(Callback):
    key = "crash"

    def on_step(self, ctx, state):
        if state.steps == 12:
            raise RuntimeError("simulated crash")


class _CrashingDeepLinear(DeepLinearExperiment):
    def callbacks(self, setup, config):
        return [_Crash()]


def test_local_pool_resumes_skips_and_reports_failures(tmp_path, capsys, monkeypatch):
    # Two points, three child processes in all: each child imports torch, the slow part.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "S"
    grid = [("data", ["separable", "missing.npz"])]
    argv = ["sweep", "deep-linear", "--grid", "data=separable,missing.npz", "--jobs", "2", "--out", str(out), *TINY]
    # An interrupted point, as a sweep killed mid-way leaves it: a checkpoint, no summary.
    sweep.prepare_dir(out, sweep.sweep_record("deep-linear", grid, ["target_ln_n_over_L=5"]))
    interrupted = out / "data=separable"
    overrides = ["target_ln_n_over_L=5", "data=separable", "checkpoint_every_steps=5"]
    with pytest.raises(RuntimeError):
        runner.start_run(_CrashingDeepLinear(), overrides, interrupted, quiet=True)
    assert (interrupted / "checkpoint.pt").exists() and not (interrupted / "summary.json").exists()

    assert cli.main(argv) == 1  # the missing data file fails its point; the other finishes
    printed = capsys.readouterr().out
    assert "data=separable: finished (resumed)" in printed
    assert "data=missing.npz: failed" in printed and "does not exist" in printed
    table = pd.read_csv(out / "sweep.csv")
    assert list(table["point"]) == ["data=separable", "data=missing.npz"]
    assert list(table["status"]) == ["finished", "failed"]
    assert list(table["data"]) == ["separable", "missing.npz"] and table["ln_n_over_L"].iloc[0] >= 5
    assert table["error"].iloc[1].startswith("diralign: error: data file missing.npz does not exist")
    resumed = pd.read_csv(interrupted / "log.csv")
    assert resumed["step"].is_unique and resumed["step"].is_monotonic_increasing
    mtime = (interrupted / "summary.json").stat().st_mtime_ns

    # The same command again: the finished point is skipped, not redone; the failed one is retried.
    assert cli.main(argv) == 1
    printed = capsys.readouterr().out
    assert "data=separable: skipped" in printed and "data=missing.npz: failed" in printed
    assert (interrupted / "summary.json").stat().st_mtime_ns == mtime
    assert (out / "logs" / "data=missing.npz.log").read_text().count("== ") == 2


def test_point_killed_before_its_first_checkpoint_is_started_again(tmp_path):
    out = tmp_path / "S"
    point = sweep.expand("deep-linear", [("seed", ["0"])], ["target_ln_n_over_L=5"])[0]
    run_dir = out / point.name
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")  # made by `run`, killed before any checkpoint
    assert sweep._action(run_dir) == "run"
    (run_dir / "checkpoint.pt").write_bytes(b"")
    assert sweep._action(run_dir) == "resume"
    (run_dir / "summary.json").write_text("{}")
    assert sweep._action(run_dir) == "skip"


def test_a_locked_point_is_left_alone(tmp_path):
    out = tmp_path / "S"
    (out / "logs").mkdir(parents=True)
    point = sweep.expand("deep-linear", [("seed", ["0"])], [])[0]
    with open(out / "logs" / f"{point.name}.lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # a process (an orphan of a killed sweep) is on it
        outcome = sweep.run_point("deep-linear", str(out), point, plot=False)
    assert outcome.status == "busy" and not (out / point.name).exists()


def test_the_local_pool_waits_for_a_locked_point(tmp_path):
    import threading

    out = tmp_path / "S"
    (out / "logs").mkdir(parents=True)
    point = sweep.expand("deep-linear", [("seed", ["0"])], [])[0]
    held = open(out / "logs" / f"{point.name}.lock", "w")
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            o=sweep.run_point("deep-linear", str(out), point, False, keep_waiting=lambda name: True)
        )
    )
    worker.start()
    time.sleep(0.7)
    assert worker.is_alive()  # waiting, not running the point a second time
    (out / point.name).mkdir()
    (out / point.name / "summary.json").write_text("{}")  # the other process finishes it ...
    held.close()  # ... and exits
    worker.join(timeout=10)
    assert result["o"].status == "skipped"


def test_signals_reach_running_children():
    children = sweep._Children()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    children.register(proc)
    children.stop(signal.SIGTERM)
    assert proc.wait(timeout=10) == -signal.SIGTERM
    late = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    children.register(late)  # started after the signal: stopped at once
    assert late.wait(timeout=10) == -signal.SIGTERM


def test_submitit_local_executor_runs_the_points(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "S"
    started = time.time()
    assert (
        cli.main(["sweep", "deep-linear", "--grid", "seed=3", "--launcher", "submitit-local", "--out", str(out), *TINY])
        == 0
    )
    assert "seed=3: finished" in capsys.readouterr().out
    assert (out / "seed=3" / "summary.json").is_file() and any((out / "submitit").iterdir())
    assert pd.read_csv(out / "sweep.csv")["status"].tolist() == ["finished"]
    assert time.time() - started < 120


def test_missing_submitit_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    out = tmp_path / "S"
    assert cli.main(["sweep", "deep-linear", "--grid", "seed=0", "--launcher", "submitit", "--out", str(out)]) == 2
    one_line_error(capsys, "diralign[cluster]")
    assert not out.exists()


def test_submitit_without_slurm_is_one_line(tmp_path, capsys):
    submitit = pytest.importorskip("submitit")
    if submitit.AutoExecutor.which() == "slurm":
        pytest.skip("this machine has SLURM")
    out = tmp_path / "S"
    assert cli.main(["sweep", "deep-linear", "--grid", "seed=0", "--launcher", "submitit", "--out", str(out)]) == 2
    one_line_error(capsys, "no SLURM here", "submitit-local")
    assert not out.exists()
