"""Kill points: a run killed at any moment -- while it is set up beside ``--out``, the moment
``--out`` appears, or at random later -- is either absent (and ``run`` starts it afresh) or
resumable to the result of an uninterrupted run; Ctrl-C or SIGTERM during start-up is one
line and leaves nothing behind.

    python -m pytest -q tests/test_faults_killpoints.py
"""

import random
import signal
import subprocess
import sys
import time

import pytest

from diralign.rundir import schema
from faults_helpers import QUIET, SHORT, as_args, assert_one_line, assert_same_run, cli, reference_run, spawn

ARGS = as_args(SHORT)


def _staged(out) -> bool:
    return any(p.name.startswith(f".{out.name}.diralign-new-") for p in out.parent.iterdir())


def _start(out):
    """``run`` where the run is absent, else ``resume``: what a user would type next."""
    if (out / schema.CONFIG).exists():
        return spawn("resume", out, *QUIET)
    return spawn("run", "linear", "--out", out, *ARGS, *QUIET)


def _kill_when(proc, ready, delay: float) -> None:
    deadline = time.time() + 120
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path, tmp_path_factory):
    reference = reference_run(tmp_path_factory, "linear", SHORT)
    out = tmp_path / "killed"
    # 1. while it is set up beside --out, or the moment --out appears: then either nothing is
    # at --out (`run` starts afresh, no --force needed) or its step-0 checkpoint is there
    proc = _start(out)
    _kill_when(proc, lambda: _staged(out) or out.exists(), 0.0)
    assert not out.exists() or (out / schema.CHECKPOINT).exists()
    # 2. at a random moment of training (or of the set-up again, if nothing was at --out)
    proc = _start(out)
    _kill_when(proc, lambda: (out / schema.CHECKPOINT).exists(), random.uniform(0.0, 0.6))
    assert (out / schema.CHECKPOINT).exists()
    rc, err = cli("resume", out, *QUIET)
    assert rc == 0, err
    assert_same_run(reference, out)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_during_startup_is_one_line(tmp_path, signum):
    out = tmp_path / "run"
    # The `diralign` entry point, announcing when it is about to start (imports come after).
    code = "import sys; from diralign.cli import main; print('ready', flush=True); sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "run", "linear", "--out", str(out), *ARGS, *QUIET],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(random.uniform(0.0, 0.3))  # importing torch and building the problem take longer
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert_one_line(proc.returncode, err, "interrupted before training began", code=130)
    assert not out.exists() and not _staged(out)
