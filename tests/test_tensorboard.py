"""TensorBoard streams read back with tensorboard's own loaders: scalars are the log.csv
rows, histograms the margins.bin rows, hparams the config and summary; a run that
crashes or is SIGKILLed after a checkpoint and is resumed leaves one stream, no step twice."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from diralign import cli, runner
from diralign.experiments.deep_linear import DeepLinearExperiment
from diralign.rundir import read_array_log
from diralign.tensorboard import EVENT_GLOB, HISTOGRAM_TAG, HPARAMS_RUN, read_scalars, tag_of
from diralign.trainer import Callback

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["target_ln_n_over_L=5"]


def accumulator(path):
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0}, purge_orphaned_data=False)
    acc.Reload()
    return acc


def assert_stream_is_log(directory, run_dir):
    """One event file whose every scalar tag has exactly the log.csv steps and values."""
    assert len(list(directory.glob(EVENT_GLOB))) == 1
    log = pd.read_csv(run_dir / "log.csv")
    scalars = read_scalars(directory)  # raw records: duplicates would show here
    assert set(scalars) == {tag_of(c) for c in log.columns}
    for column in log.columns:
        steps = [s for s, _ in scalars[tag_of(column)]]
        assert steps == list(log["step"]), column
        values = np.array([v for _, v in scalars[tag_of(column)]])
        np.testing.assert_array_equal(values, log[column].to_numpy(dtype=np.float32), err_msg=column)
    assert np.all(np.diff(log["step"]) > 0)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    runner.start_run("deep-linear", TINY + ["tensorboard=true"], out, quiet=True)
    return out


def test_live_stream_is_the_log(finished_run):
    directory = finished_run / "tensorboard"
    assert_stream_is_log(directory, finished_run)
    acc = accumulator(directory)
    margins = np.asarray(read_array_log(finished_run, "margins"))
    histograms = acc.Histograms(HISTOGRAM_TAG)
    assert [h.step for h in histograms] == list(pd.read_csv(finished_run / "log.csv")["step"])
    for h, row in zip(histograms, margins):
        assert h.histogram_value.num == len(row)
        assert h.histogram_value.min == pytest.approx(float(row.min()))
        assert h.histogram_value.max == pytest.approx(float(row.max()))
    # wall time = creation time + the run's own clock, so resumes keep "relative" time
    walls = [e.wall_time for e in acc.Scalars("wall_seconds")]
    assert np.all(np.diff(walls) >= 0)


def test_hparams_hold_config_and_summary(finished_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    hp_dir = finished_run / "tensorboard" / HPARAMS_RUN
    acc = accumulator(hp_dir)
    content = acc.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    config = json.loads((finished_run / "config.json").read_text())["config"]
    assert session.hparams["experiment"].string_value == "deep-linear"
    assert session.hparams["tensorboard"].number_value == 1  # torch records bools as numbers
    assert session.hparams["target_ln_n_over_L"].number_value == config["target_ln_n_over_L"]
    summary = json.loads((finished_run / "summary.json").read_text())
    scalars = read_scalars(hp_dir)
    assert scalars["summary/min_normalized_margin"][0][1] == pytest.approx(summary["min_normalized_margin"], rel=1e-6)
    assert scalars["summary/steps"][0][1] == summary["steps"]


def test_export_equals_live_stream(finished_run, tmp_path):
    out = tmp_path / "tb"
    assert cli.main(["export", str(finished_run), "--tensorboard", str(out)]) == 0
    assert read_scalars(out) == read_scalars(finished_run / "tensorboard")
    live, exported = accumulator(finished_run / "tensorboard"), accumulator(out)
    assert [e.wall_time for e in exported.Scalars("ln_n_over_L")] == pytest.approx(
        [e.wall_time for e in live.Scalars("ln_n_over_L")]
    )
    assert len(exported.Histograms(HISTOGRAM_TAG)) == len(live.Histograms(HISTOGRAM_TAG))
    assert read_scalars(out / HPARAMS_RUN) == read_scalars(finished_run / "tensorboard" / HPARAMS_RUN)


def test_export_of_a_sweep_writes_one_stream_per_point(finished_run, tmp_path):
    import shutil

    from diralign import sweep

    swept = tmp_path / "S"
    sweep.prepare_dir(swept, sweep.sweep_record("deep-linear", [("seed", ["0"])], ["target_ln_n_over_L=5"]))
    shutil.copytree(finished_run, swept / "seed=0")
    assert cli.main(["export", str(swept), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert read_scalars(tmp_path / "tb" / "seed=0") == read_scalars(finished_run / "tensorboard")


def test_export_refuses_bad_targets(finished_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli.main(["export", str(finished_run), "--tensorboard", str(tmp_path / "full")]) == 2
    assert cli.main(["export", str(tmp_path / "nowhere"), "--tensorboard", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "not empty" in err[0] and "not a diralign run directory" in err[1]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "o").exists()
    # --force replaces event files only, never other files
    assert cli.main(["export", str(finished_run), "--tensorboard", str(tmp_path / "full"), "--force"]) == 0
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


class _Crash(Callback):
    key = "crash"

    def on_step(self, ctx, state):
        if state.steps == 27:
            raise RuntimeError("simulated crash")


class _CrashingDeepLinear(DeepLinearExperiment):
    def callbacks(self, setup, config):
        return [_Crash()]


def test_crash_after_checkpoint_then_resume_leaves_one_stream(tmp_path):
    out = tmp_path / "run"
    overrides = ["target_ln_n_over_L=20", "tensorboard=true", "checkpoint_every_steps=10"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.start_run(_CrashingDeepLinear(), overrides, out, quiet=True)
    # The hazard is real: events were written for rows the resume will log again.
    before = [s for s, _ in read_scalars(out / "tensorboard")["step"]]
    assert max(before) > 20
    # An interrupted run exports too: what its log holds on disk.
    assert cli.main(["export", str(out), "--tensorboard", str(tmp_path / "interrupted")]) == 0
    assert_stream_is_log(tmp_path / "interrupted", out)
    runner.resume_run(out, quiet=True)
    assert_stream_is_log(out / "tensorboard", out)
    assert (out / "tensorboard" / HPARAMS_RUN).is_dir()


def test_sigkill_then_resume_leaves_one_stream(tmp_path):
    out = tmp_path / "run"
    args = [
        "--set",
        "target_ln_n_over_L=400",
        "--set",
        "tensorboard=true",
        "--set",
        "checkpoint_every_steps=23",
        "--set",
        "threads=1",
        "--quiet",
        "--no-plot",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "diralign", "run", "deep-linear", "--out", str(out), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists(), "run finished before the kill; make it longer"
    runner.resume_run(out, quiet=True)  # in-process: the same code as `diralign resume`, one import less
    assert_stream_is_log(out / "tensorboard", out)


def test_missing_tensorboard_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys, finished_run):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert cli.main(["run", "deep-linear", "--out", str(out), "--set", "tensorboard=true", "--quiet", "--no-plot"]) == 2
    assert cli.main(["export", str(finished_run), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("diralign[tensorboard]" in line for line in err)
    assert not out.exists() and not (tmp_path / "tb").exists()
