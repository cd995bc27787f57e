"""Concurrent writers: one run directory has one writer.  A second ``run --force``, a resume
beside a live run, or two resumes are refused in one line naming the holder's PID; a
killed holder's lock goes with it; readers never need the lock.

    python -m pytest -q tests/test_faults_concurrency.py
"""

import os
import time

import numpy as np
import pytest

from diralign.rundir import Run, RunWriter, schema
from diralign.rundir.lock import RunBusy
from faults_helpers import QUIET, assert_one_line, cli, spawn


def _staging(parent):
    return [p.name for p in parent.iterdir() if ".diralign-new-" in p.name]


def test_two_new_runs_at_one_path_one_wins(tmp_path):
    out = tmp_path / "run"
    a, b = RunWriter.create(out), RunWriter.create(out)  # both set up, beside --out
    assert not out.exists()
    a.write_json(schema.CONFIG, {"experiment": "linear", "config": {}})
    a.publish()
    with pytest.raises(RunBusy, match=f"filled by another run.*process {os.getpid()}"):
        b.publish()
    b.abandon()
    assert _staging(tmp_path) == [] and (out / schema.CONFIG).is_file()
    with pytest.raises(RunBusy, match=f"process {os.getpid()}"):
        RunWriter.open_existing(out)  # a second writer of a live run
    a.close()
    RunWriter.open_existing(out).close()  # free once the writer is done


def test_force_swap_keeps_one_writer(tmp_path):
    out = tmp_path / "run"
    old = RunWriter.create(out)
    old.write_json(schema.CONFIG, {"experiment": "linear", "config": {}, "old": True})
    old.publish()
    with pytest.raises(RunBusy):
        RunWriter.create(out, force=True)  # refuses to replace a run that is being written
    old.close()

    new = RunWriter.create(out, force=True)  # holds the old run's lock while it sets up
    with pytest.raises(RunBusy):
        RunWriter.open_existing(out)
    with pytest.raises(RunBusy):
        RunWriter.create(out, force=True)
    new.write_json(schema.CONFIG, {"experiment": "linear", "config": {}, "new": True})
    assert "old" in (out / schema.CONFIG).read_text()  # the old run stands until the swap
    new.publish()
    assert "new" in (out / schema.CONFIG).read_text() and _staging(tmp_path) == []
    with pytest.raises(RunBusy):
        RunWriter.open_existing(out)  # the lock moved with the new run
    new.close()
    RunWriter.open_existing(out).close()


def test_live_run_refuses_other_writers_until_it_dies(tmp_path):
    out = tmp_path / "run"
    # Long enough that it is still training when the other writers come; killed below.
    args = ["deep-linear", "--set", "target_ln_n_over_L=3000", "--set", "threads=1", "--set", "checkpoint_every_steps=5"]
    proc = spawn("run", *args, "--out", out, *QUIET)
    try:
        deadline = time.time() + 120
        while not (out / schema.CHECKPOINT).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read()
        assert_one_line(*cli("run", *args, "--out", out, "--force", *QUIET), f"diralign process {proc.pid}")
        assert_one_line(*cli("resume", out, *QUIET), f"diralign process {proc.pid}", "kill")
        time.sleep(0.3)
        log = Run(out).log  # reading a live run needs no lock, and sees whole rows only
        assert np.all(np.diff(log[schema.STEP].to_numpy()) > 0)
        assert proc.poll() is None, "the run ended during the test; make it longer"
    finally:
        proc.kill()
        proc.wait()
    RunWriter.open_existing(out).close()  # the kernel dropped the dead writer's lock
