"""The disk says no: ``--out`` under a regular file, a read-only directory, a full disk
(a file-size limit in a child process).  Each is one line and exit status 2; a full disk
mid-run leaves the last checkpoint intact and the run resumes to the uninterrupted result.

    python -m pytest -q tests/test_faults_disk.py
"""

import contextlib
import os
import resource
import shutil
import subprocess

import pytest

from diralign.rundir import load_checkpoint_file, schema
from diralign.runner import start_run
from faults_helpers import (
    QUIET,
    SHORT,
    as_args,
    assert_one_line,
    assert_same_run,
    cli,
    fingerprint,
    reference_run,
    spawn,
)

QUICK = ["--set", "target_ln_n_over_L=10", "--set", "dynamics=gd", "--set", "threads=1", *QUIET]


def test_out_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert_one_line(*cli("run", "linear", "--out", tmp_path / "file" / "run", *QUICK), "is under", "a file")
    assert_one_line(*cli("run", "linear", "--out", tmp_path / "file", *QUICK), "not a directory")
    assert (tmp_path / "file").read_text() == "not a folder"


@contextlib.contextmanager
def read_only(path):
    """``path`` and everything in it made unwritable, or the test skipped if this machine
    cannot: as root, permission bits do not stop writes, so root uses the immutable flag."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a directory read-only here")
    if subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
        pytest.skip("running as root on a file system without the immutable flag: cannot make it read-only")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def test_read_only_directory(tmp_path):
    run = tmp_path / "runs" / "run"
    start_run("linear", ["target_ln_n_over_L=10", "dynamics=gd", "threads=1"], run, quiet=True)
    before = fingerprint(run)
    with read_only(tmp_path / "runs"):
        line = assert_one_line(*cli("run", "linear", "--out", tmp_path / "runs" / "new", *QUICK), "cannot create")
        assert "nothing was written" in line
        assert_one_line(*cli("run", "linear", "--out", run, "--force", *QUICK), "cannot")
        assert_one_line(*cli("resume", run, *QUIET), "cannot")
        assert_one_line(*cli("plot", run), "cannot write figures")
        assert fingerprint(run) == before
    assert not (tmp_path / "runs" / "new").exists()


def _limit_file_size(limit):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_keeps_the_last_checkpoint_and_resumes(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory, "linear", SHORT)
    out = tmp_path / "run"
    # Files may not grow past 20 kB: config and the checkpoints fit, the logs soon do not.
    proc = spawn("run", "linear", "--out", out, *as_args(SHORT), *QUIET, preexec_fn=_limit_file_size(20_000))
    _, err = proc.communicate(timeout=300)
    line = assert_one_line(proc.returncode, err, "file-size limit")
    assert "intact" in line and f"diralign resume {out}" in line
    load_checkpoint_file(out / schema.CHECKPOINT)  # whole and checked
    assert not (out / schema.SUMMARY).exists()
    rc, err = cli("resume", out, *QUIET)
    assert rc == 0, err
    assert_same_run(reference, out)
