"""Hostile checkpoints: a pickle whose ``__reduce__`` would run code never runs, whatever
the container (torch zip, torch legacy, bare pickle); and what diralign writes is plain data.

    python -m pytest -q tests/test_faults_pickle.py
"""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from diralign.errors import UserError
from diralign.rundir import load_checkpoint_file, save_checkpoint_file, schema
from diralign.runner import start_run
from faults_helpers import QUIET, assert_one_line, cli, fingerprint


class MakesAFile:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class RunsAShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("pickle") / "run"
    start_run("linear", ["target_ln_n_over_L=10", "dynamics=gd", "threads=1"], out, quiet=True)
    return out


def _write(path, obj, container):
    if container == "torch-zip":
        torch.save(obj, path)
    elif container == "torch-legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as f:
            pickle.dump(obj, f)


@pytest.mark.parametrize("payload", [MakesAFile, RunsAShell])
@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "pickle"])
def test_hostile_pickle_never_runs(finished, tmp_path, payload, container):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    marker = tmp_path / "pwned"
    _write(run / schema.CHECKPOINT, {"format": "diralign-checkpoint", "state": payload(marker)}, container)
    before = fingerprint(run)
    assert_one_line(*cli("resume", run, *QUIET), "not a diralign checkpoint", "nothing of it was run")
    assert not marker.exists()
    assert fingerprint(run) == before
    with pytest.raises(UserError):  # the reader's path too (load_run(DIR).final_weights())
        load_checkpoint_file(run / schema.CHECKPOINT)
    assert not marker.exists()


def test_payload_is_made_plain_when_written(tmp_path):
    # numpy arrays (fig1's snapshot values) become tensors; numpy scalars Python numbers.
    payload = {"state": {"w": torch.ones(3), "values": np.arange(4.0), "count": np.int64(3)},
               "dynamics": {"times": [(1.0, 2.0)], "h": None}, "positions": {}}
    save_checkpoint_file(tmp_path / "c.pt", payload, run_id="abc")
    back = load_checkpoint_file(tmp_path / "c.pt", run_id="abc")
    assert isinstance(back["state"]["values"], torch.Tensor) and back["state"]["values"].tolist() == [0, 1, 2, 3]
    assert back["state"]["count"] == 3 and type(back["state"]["count"]) is int
    assert back["dynamics"]["times"] == [(1.0, 2.0)]
    with pytest.raises(TypeError, match="a checkpoint holds only"):
        save_checkpoint_file(tmp_path / "d.pt", {"state": {"w": torch.ones(1), "f": object()}})
    assert not (tmp_path / "d.pt").exists()
