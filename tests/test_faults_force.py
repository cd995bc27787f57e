"""``run --force`` never loses the old run to a failure: a value that cannot be written, a
disk error or Ctrl-C during set-up leave it byte for byte, and nothing beside it.

    python -m pytest -q tests/test_faults_force.py
"""

import errno
import json
import os
import shutil

import pytest

from diralign.rundir import checkpoint as checkpoint_module
from diralign.rundir import schema
from diralign.runner import start_run
from faults_helpers import QUIET, assert_one_line, cli, fingerprint

QUICK = ["--set", "target_ln_n_over_L=8", "--set", "dynamics=gd", "--set", "threads=1", *QUIET]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("force") / "run"
    start_run("linear", ["target_ln_n_over_L=8", "dynamics=gd", "threads=1"], out, quiet=True)
    return out


@pytest.fixture
def old_run(made, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(made, out)
    return out


def _beside(out):
    return sorted(p.name for p in out.parent.iterdir() if p != out)


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_a_value_json_cannot_hold_keeps_the_old_run(old_run, value):
    before, beside = fingerprint(old_run), _beside(old_run)
    line = assert_one_line(*cli("run", "linear", "--out", old_run, "--force", *QUICK,
                                "--set", f"checkpoint_every_seconds={value}"), "cannot be stored in config.json")
    assert "checkpoint_every_seconds" in line
    assert fingerprint(old_run) == before and _beside(old_run) == beside


def _failing_write(exc):
    def write(*args, **kwargs):
        raise exc
    return write


@pytest.mark.parametrize("mount_point", [False, True])
def test_failure_during_set_up_keeps_the_old_run(old_run, monkeypatch, mount_point):
    if mount_point:  # --out a mount point: staged inside it, moved up file by file
        monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == os.fspath(old_run))
    before, beside = fingerprint(old_run), _beside(old_run)
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "write_atomic", _failing_write(OSError(errno.ENOSPC, "No space left")))
        assert_one_line(*cli("run", "linear", "--out", old_run, "--force", *QUICK), "the disk is full", "is unchanged")
    assert fingerprint(old_run) == before and _beside(old_run) == beside
    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "write_atomic", _failing_write(KeyboardInterrupt()))
        assert_one_line(*cli("run", "linear", "--out", old_run, "--force", *QUICK), "interrupted before training", code=130)
    assert fingerprint(old_run) == before and _beside(old_run) == beside
    # and when nothing fails, the new run replaces the old one completely
    old_id = json.loads((old_run / schema.CONFIG).read_text())[schema.META_RUN_ID]
    rc, err = cli("run", "linear", "--out", old_run, "--force", *QUICK, "--set", "seed=3")
    assert rc == 0, err
    meta = json.loads((old_run / schema.CONFIG).read_text())
    assert meta[schema.META_RUN_ID] != old_id and meta[schema.META_CONFIG]["seed"] == 3
    assert _beside(old_run) == beside and not [p for p in old_run.iterdir() if "diralign-new" in p.name]
    rc, err = cli("resume", old_run, *QUIET)  # a whole, consistent run
    assert rc == 0, err
