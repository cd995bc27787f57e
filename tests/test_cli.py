"""The CLI contracts of DESIGN section 4: bad input is one line and exit 2, nothing
on disk is overwritten, and a run killed with SIGKILL resumes to the same result."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

QUICK = ["--set", "target_ln_n_over_L=20", "--quiet", "--no-plot"]


def diralign(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "diralign", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_npz(path, X, y):
    np.savez(path, X=X, y=y)
    return path


@pytest.fixture
def good_xy():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3))
    y = np.where(X[:, 0] > 0, 1.0, -1.0)
    X[:, 0] += 0.5 * y
    return X, y


def test_nan_in_X(tmp_path, good_xy):
    X, y = good_xy
    X[4, 1] = np.nan
    data = write_npz(tmp_path / "d.npz", X, y)
    assert_user_error(diralign("run", "linear", "--out", tmp_path / "o", "--set", f"data={data}", *QUICK), "NaN or inf")
    assert not (tmp_path / "o").exists()


def test_inf_in_X(tmp_path, good_xy):
    X, y = good_xy
    X[0, 0] = np.inf
    data = write_npz(tmp_path / "d.npz", X, y)
    assert_user_error(diralign("run", "deep-linear", "--out", tmp_path / "o", "--set", f"data={data}", *QUICK), "NaN or inf")


def test_labels_outside_pm1(tmp_path, good_xy):
    X, y = good_xy
    y = (y > 0).astype(float)  # 0/1 labels
    data = write_npz(tmp_path / "d.npz", X, y)
    assert_user_error(diralign("run", "linear", "--out", tmp_path / "o", "--set", f"data={data}", *QUICK), "-1 or +1")


def test_mismatched_lengths(tmp_path, good_xy):
    X, y = good_xy
    data = write_npz(tmp_path / "d.npz", X, y[:-3])
    assert_user_error(diralign("run", "linear", "--out", tmp_path / "o", "--set", f"data={data}", *QUICK), "30 rows", "27 labels")


def test_missing_data_file(tmp_path):
    assert_user_error(diralign("run", "linear", "--out", tmp_path / "o", "--set", f"data={tmp_path / 'nope.npz'}", *QUICK), "does not exist")


def test_unknown_key_suggests_the_close_one(tmp_path):
    result = diralign("run", "deep-linear", "--out", tmp_path / "o", "--set", "widht=3", *QUICK)
    assert_user_error(result, "widht", "did you mean", "'widths'")
    result = diralign("run", "margins", "--out", tmp_path / "m", "--set", "bath_size=5", *QUICK)
    assert_user_error(result, "bath_size", "did you mean", "'batch_size'")
    result = diralign("run", "deep-linear", "--out", tmp_path / "q", "--set", "zzqqxx=1", *QUICK)
    assert_user_error(result, "zzqqxx", "diralign config")


def test_badly_typed_value(tmp_path):
    assert_user_error(diralign("run", "deep-linear", "--out", tmp_path / "o", "--set", "rtol=tight", *QUICK), "rtol")


def test_unknown_experiment(tmp_path):
    assert_user_error(diralign("run", "nonsense", "--out", tmp_path / "o"), "unknown experiment")


def test_nonempty_out_without_force_keeps_files(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_user_error(diralign("run", "linear", "--out", out, *QUICK), "not empty", "--force")
    assert (out / "precious.txt").read_text() == "keep me"
    # --force does not delete a folder that is not a run directory either
    assert_user_error(diralign("run", "linear", "--out", out, "--force", *QUICK), "not a diralign run directory")
    assert (out / "precious.txt").read_text() == "keep me"


def test_resume_of_non_run_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("hello")
    assert_user_error(diralign("resume", tmp_path / "x"), "not a diralign run directory")
    assert (tmp_path / "x" / "file").read_text() == "hello"


def test_truncated_and_foreign_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert diralign("run", "linear", "--out", out, *QUICK).returncode == 0
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert_user_error(diralign("resume", out), "corrupt or truncated")
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before == after
    import torch

    torch.save({"model": 1}, ckpt)
    assert_user_error(diralign("resume", out), "not a diralign checkpoint")


def test_force_replaces_a_run(tmp_path):
    out = tmp_path / "run"
    assert diralign("run", "linear", "--out", out, *QUICK).returncode == 0
    result = diralign("run", "linear", "--out", out, "--force", *QUICK)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ln_n_over_L"] >= 20


def _compare_runs(a, b):
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        if key == "wall_seconds":
            continue
        other = sb[key]
        if isinstance(value, float):
            assert other == pytest.approx(value, rel=1e-12, abs=1e-300), key
        elif isinstance(value, list):
            np.testing.assert_allclose(other, value, rtol=1e-12)
        else:
            assert other == value, key
    la = pd.read_csv(a / "log.csv").drop(columns="wall_seconds")
    lb = pd.read_csv(b / "log.csv").drop(columns="wall_seconds")
    assert la.shape == lb.shape  # none lost, none duplicated
    np.testing.assert_array_equal(la["step"].to_numpy(), lb["step"].to_numpy())
    np.testing.assert_allclose(lb.to_numpy(dtype=float), la.to_numpy(dtype=float), rtol=1e-12, equal_nan=True)
    from diralign.rundir import read_array_log

    ma, mb = read_array_log(a, "margins"), read_array_log(b, "margins")
    assert ma.shape == mb.shape == (len(la), 60)
    np.testing.assert_array_equal(np.asarray(ma), np.asarray(mb))


@pytest.mark.slow
@pytest.mark.parametrize("dynamics", ["flow", "gd"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, dynamics):
    # Long enough (several seconds of training) that the kill lands mid-run on fast machines.
    target = 1000 if dynamics == "flow" else 150
    args = ["--set", f"target_ln_n_over_L={target}", "--set", "checkpoint_every_steps=23", "--set", f"dynamics={dynamics}",
            "--set", "threads=1", "--quiet", "--no-plot"]
    if dynamics == "gd":
        args += ["--set", "eta_growth=1.02", "--set", "max_update_ratio=0.02"]
    reference = tmp_path / "reference"
    assert diralign("run", "deep-linear", "--out", reference, *args).returncode == 0
    reference_steps = json.loads((reference / "summary.json").read_text())["steps"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diralign", "run", "deep-linear", "--out", str(killed), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "run finished before the kill; make it longer"
    result = diralign("resume", killed, "--quiet", "--no-plot")
    assert result.returncode == 0, result.stderr
    assert json.loads((killed / "summary.json").read_text())["steps"] == reference_steps
    _compare_runs(reference, killed)


@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_resumes(tmp_path):
    args = ["--set", "target_ln_n_over_L=150", "--set", "threads=1", "--quiet", "--no-plot"]
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "diralign", "run", "deep-linear", "--out", str(out), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while not (out / "log.csv").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "diralign resume" in err
    assert (out / "checkpoint.pt").exists()
    result = diralign("resume", out, "--quiet", "--no-plot")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["ln_n_over_L"] >= 150
