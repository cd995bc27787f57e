"""Shared by the tests/test_faults_*.py modules: run the CLI in this process or in a child,
check the one-line error contract, and fingerprint a run directory byte for byte.

    python -m pytest -q tests/test_faults_damage.py
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from diralign.rundir import read_array_log, schema
from diralign.rundir.integrity import config_checksum

QUIET = ["--quiet", "--no-plot"]
# A short run shared by the modules that compare an interrupted run with an uninterrupted one.
SHORT = ["target_ln_n_over_L=10", "dynamics=gd", "threads=1", "checkpoint_every_steps=25"]


def as_args(settings) -> list[str]:
    return [x for s in settings for x in ("--set", s)]


def reference_run(tmp_path_factory, experiment: str, settings) -> Path:
    """The uninterrupted run of ``settings``, made once per test session (in this process)."""
    import hashlib

    from diralign.runner import start_run

    key = hashlib.sha256(repr((experiment, list(settings))).encode()).hexdigest()[:12]
    out = tmp_path_factory.getbasetemp() / f"reference-{experiment}-{key}"
    if not (out / schema.SUMMARY).is_file():
        start_run(experiment, list(settings), out, quiet=True, force=True)
    return out


def cli(*args) -> tuple[int, str]:
    """``diralign ARGS`` in this process: (exit status, stderr).  A traceback is an exception here."""
    from diralign.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main([str(a) for a in args])
    return rc, err.getvalue()


def spawn(*args, **kwargs) -> subprocess.Popen:
    """``diralign ARGS`` as a child process (for kills, locks held by another PID, rlimits)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "diralign", *map(str, args)], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)


def assert_one_line(rc: int, err: str, *fragments, code: int = 2) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def fingerprint(directory) -> dict:
    """Every file under ``directory`` (hidden ones included): relative path -> bytes."""
    root = Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def reseal_config(run_dir, edit) -> None:
    """Edit config.json with ``edit(meta)`` and recompute its checksum (a careful forger)."""
    path = Path(run_dir) / schema.CONFIG
    meta = json.loads(path.read_text())
    edit(meta)
    meta[schema.META_CHECKSUM] = config_checksum(meta, schema.META_CHECKSUM)
    path.write_text(json.dumps(meta, indent=2))


def assert_same_run(a, b) -> None:
    """Two run directories hold the same results, timing keys (schema.TIMING_KEYS) aside."""
    a, b = Path(a), Path(b)
    sa = json.loads((a / schema.SUMMARY).read_text())
    sb = json.loads((b / schema.SUMMARY).read_text())
    assert sa.keys() == sb.keys()
    for key in sa:
        if key not in schema.TIMING_KEYS:
            assert sa[key] == sb[key], key
    la = pd.read_csv(a / schema.LOG).drop(columns=list(schema.TIMING_KEYS), errors="ignore")
    lb = pd.read_csv(b / schema.LOG).drop(columns=list(schema.TIMING_KEYS), errors="ignore")
    assert la.shape == lb.shape  # none lost, none duplicated
    np.testing.assert_array_equal(la.to_numpy(dtype=float), lb.to_numpy(dtype=float))
    for name in schema.ARRAY_LOGS:
        ma, mb = read_array_log(a, name), read_array_log(b, name)
        assert (ma is None) == (mb is None), name
        if ma is not None:
            assert ma.shape[0] == len(la), name
            np.testing.assert_array_equal(np.asarray(ma), np.asarray(mb))
    for name in (schema.FINAL_MARGINS, schema.ANGLE_TO_FINAL):
        if (a / name).exists() or (b / name).exists():
            np.testing.assert_array_equal(np.load(a / name), np.load(b / name))
