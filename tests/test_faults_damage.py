"""Damaged run directories: every file a resume or a plot reads, cut, deleted or edited, is
one line and exit status 2, and the refusal changes no byte of the run.

    python -m pytest -q tests/test_faults_damage.py
"""

import json
import shutil

import pytest
import torch

from diralign.errors import UserError
from diralign.rundir import RunWriter, schema
from diralign.rundir.checkpoint import save_checkpoint_file
from diralign.runner import start_run
from faults_helpers import QUIET, assert_one_line, cli, fingerprint, reseal_config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("damage") / "run"
    start_run("linear", ["target_ln_n_over_L=15", "dynamics=gd", "threads=1"], out, quiet=True)
    return out


@pytest.fixture
def run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


# -- logs shorter than the checkpoint says: refused, never padded ---------------------------
LOG_DAMAGE = {
    "log.csv cut mid-line": (lambda d: _cut(d / schema.LOG, lambda n: n // 2 + 7), "log was cut"),
    "log.csv deleted": (lambda d: (d / schema.LOG).unlink(), "is missing"),
    "margins.bin short": (lambda d: _cut(d / "margins.bin", lambda n: n - 100), "rows but the checkpoint recorded"),
    "margins.bin deleted": (lambda d: (d / "margins.bin").unlink(), "is missing"),
    "directions.bin short": (lambda d: _cut(d / "directions.bin", lambda n: n // 3), "rows but the checkpoint recorded"),
    "directions.bin deleted": (lambda d: (d / "directions.bin").unlink(), "is missing"),
    "margins.json deleted": (lambda d: (d / "margins.json").unlink(), "is missing"),
    "margins.json damaged": (lambda d: (d / "margins.json").write_text("{bad"), "damaged"),
    "directions.json of other rows": (lambda d: (d / "directions.json").write_text('{"width": 2, "dtype": "<f8"}'),
                                      "belongs to another run"),
}


@pytest.mark.parametrize("case", list(LOG_DAMAGE))
def test_resume_refuses_logs_shorter_than_the_checkpoint(run, case):
    damage, fragment = LOG_DAMAGE[case]
    damage(run)
    before = fingerprint(run)
    assert_one_line(*cli("resume", run, *QUIET), fragment)
    assert fingerprint(run) == before  # nothing cut, nothing padded, nothing created


def test_an_array_log_opened_later_is_checked_too(run):
    # fig1's surfaces log opens at its first log point; the checkpoint records its rows.
    (run / "surfaces.json").write_text('{"width": 4, "dtype": "<f4"}')
    (run / "surfaces.bin").write_bytes(b"\0" * 16 * 3)
    writer = RunWriter(run)
    with pytest.raises(UserError, match="holds 3 rows but the checkpoint recorded 5"):
        writer.check_positions({"log_bytes": 0, "array_rows": {"surfaces": 5}}, {})
    (run / "surfaces.json").unlink()
    with pytest.raises(UserError, match="missing or damaged"):
        writer.check_positions({"log_bytes": 0, "array_rows": {"surfaces": 5}}, {})


# -- config.json ----------------------------------------------------------------------------
CONFIG_DAMAGE = {
    "invalid JSON": ("{not json", "unreadable"),
    "a list": ("[1, 2]", "not a JSON object"),
    "no experiment": ('{"config": {}}', "'experiment'"),
    "experiment not a string": ('{"experiment": 3, "config": {}}', "'experiment'"),
}


@pytest.mark.parametrize("command", ["resume", "plot"])
@pytest.mark.parametrize("case", list(CONFIG_DAMAGE))
def test_damaged_config_is_one_line(run, case, command):
    content, fragment = CONFIG_DAMAGE[case]
    (run / schema.CONFIG).write_text(content)
    before = fingerprint(run)
    assert_one_line(*cli(command, run, *(QUIET if command == "resume" else [])), fragment)
    assert fingerprint(run) == before


@pytest.mark.parametrize("command", ["resume", "plot"])
def test_hand_edited_config_is_refused_with_the_way_on(run, command):
    meta = json.loads((run / schema.CONFIG).read_text())
    meta[schema.META_CONFIG]["seed"] = 7
    (run / schema.CONFIG).write_text(json.dumps(meta, indent=2))
    before = fingerprint(run)
    line = assert_one_line(*cli(command, run, *(QUIET if command == "resume" else [])), "changed after the run was created")
    assert "restore the original" in line and "diralign run linear" in line
    assert fingerprint(run) == before


@pytest.mark.parametrize("value", ['"fast"', "true", "[1]", "null"])
def test_config_values_of_the_wrong_type(run, value):
    reseal_config(run, lambda meta: meta[schema.META_CONFIG].update(max_steps=json.loads(value)))
    before = fingerprint(run)
    assert_one_line(*cli("resume", run, *QUIET), "max_steps")
    assert fingerprint(run) == before


def test_config_edited_to_another_seed_builds_other_data(run):
    # Even with a recomputed checksum, the data rebuilt from the edited config are not the run's.
    reseal_config(run, lambda meta: meta[schema.META_CONFIG].update(seed=1))
    before = fingerprint(run)
    assert_one_line(*cli("resume", run, *QUIET), "data rebuilt from", "differ from the run's")
    assert fingerprint(run) == before


# -- the checkpoint ---------------------------------------------------------------------------
def test_checkpoint_without_state(run):
    run_id = json.loads((run / schema.CONFIG).read_text())[schema.META_RUN_ID]
    save_checkpoint_file(run / schema.CHECKPOINT, {"dynamics": {}, "positions": {}}, run_id=run_id)
    before = fingerprint(run)
    assert_one_line(*cli("resume", run, *QUIET), "holds no training state")
    assert fingerprint(run) == before
    torch.save({"format": "diralign-checkpoint"}, run / schema.CHECKPOINT)
    assert_one_line(*cli("resume", run, *QUIET), "checkpoint version")


# -- plot's files -------------------------------------------------------------------------------
PLOT_DAMAGE = {
    "summary.json invalid": (schema.SUMMARY, "{oops", "unreadable"),
    "summary.json a list": (schema.SUMMARY, "[]", "not a JSON object"),
    "summary.json wrong types": (schema.SUMMARY, '{"homogeneity_degree": "two", "ln_n_over_L": [1]}', "summary.json"),
    "margins.json invalid": ("margins.json", "{bad", "damaged"),
    "margins.json zero width": ("margins.json", '{"width": 0, "dtype": "<f4"}', "damaged"),
    "margins.json strange dtype": ("margins.json", '{"width": 60, "dtype": "<U3"}', "damaged"),
    "log.csv header": (schema.LOG, "garbage,header\n1,2\n", "no column"),
    "log.csv not numbers": (schema.LOG, "step,ln_n_over_L\n0,abc\n", "not a number"),
    "log.csv empty": (schema.LOG, "", "unreadable"),
}


@pytest.mark.parametrize("case", list(PLOT_DAMAGE))
def test_plot_of_damaged_files_is_one_line(run, case):
    name, content, fragment = PLOT_DAMAGE[case]
    (run / name).write_text(content)
    assert_one_line(*cli("plot", run), fragment)
