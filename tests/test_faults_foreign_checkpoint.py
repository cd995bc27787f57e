"""Foreign and corrupted checkpoints: another run's checkpoint, flipped bytes in tensor
data, a cut file -- each refused in one line before any file of the run changes.

    python -m pytest -q tests/test_faults_foreign_checkpoint.py
"""

import json
import shutil
import struct
import zipfile

import pytest

from diralign.rundir import load_checkpoint_file, schema
from diralign.runner import start_run
from faults_helpers import QUIET, assert_one_line, cli, fingerprint

ARGS = ["target_ln_n_over_L=15", "dynamics=gd", "threads=1"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    start_run("linear", ARGS + ["seed=0"], root / "seed0", quiet=True)
    start_run("linear", ARGS + ["seed=1"], root / "seed1", quiet=True)
    return root / "seed0", root / "seed1"


@pytest.fixture
def run(two_runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_runs[0], out)
    return out


def test_ids_and_hashes_are_recorded(two_runs):
    metas = [json.loads((d / schema.CONFIG).read_text()) for d in two_runs]
    for meta, d in zip(metas, two_runs):
        assert len(meta[schema.META_RUN_ID]) == 32
        assert len(meta[schema.META_DATA_SHA256]) == 64 and len(meta[schema.META_INITIAL_WEIGHTS_SHA256]) == 64
        assert load_checkpoint_file(d / schema.CHECKPOINT)[schema.CKPT_RUN_ID] == meta[schema.META_RUN_ID]
    assert metas[0][schema.META_RUN_ID] != metas[1][schema.META_RUN_ID]
    assert metas[0][schema.META_DATA_SHA256] != metas[1][schema.META_DATA_SHA256]


def test_another_runs_checkpoint_is_refused(run, two_runs):
    shutil.copy(two_runs[1] / schema.CHECKPOINT, run / schema.CHECKPOINT)
    before = fingerprint(run)
    assert_one_line(*cli("resume", run, *QUIET), "belongs to another run")
    assert fingerprint(run) == before


def _tensor_data_offset(path) -> int:
    """Where the bytes of the largest tensor start inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_flipped_bytes_in_tensor_data_are_refused(run):
    path = run / schema.CHECKPOINT
    data = bytearray(path.read_bytes())
    at = _tensor_data_offset(path)
    data[at : at + 4] = bytes(b ^ 0xFF for b in data[at : at + 4])
    path.write_bytes(bytes(data))
    before = fingerprint(run)
    assert_one_line(*cli("resume", run, *QUIET), "does not match its checksum")
    assert fingerprint(run) == before


def test_truncated_checkpoint_is_refused(run):
    path = run / schema.CHECKPOINT
    path.write_bytes(path.read_bytes()[:-300])
    before = fingerprint(run)
    assert_one_line(*cli("resume", run, *QUIET), "corrupt or truncated")
    assert fingerprint(run) == before


def test_own_checkpoint_still_resumes(run, two_runs):
    rc, err = cli("resume", run, *QUIET)
    assert rc == 0, err
    assert json.loads((run / schema.SUMMARY).read_text())["steps"] == json.loads(
        (two_runs[0] / schema.SUMMARY).read_text())["steps"]
