"""diralign.rundir: the schema names everything, the writer refuses what it does not
declare and never pads, the reader turns damage into one clear error."""

import json

import numpy as np
import pytest

from diralign.errors import UserError
from diralign.rundir import ArrayLog, Run, RunWriter, read_array_log, schema
from diralign.runner import start_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("rundir") / "dl"
    summary, _, _ = start_run("deep-linear", ["target_ln_n_over_L=12", "dynamics=gd"], out, quiet=True)
    return out, summary


def test_reader_sees_what_the_writer_wrote(finished):
    out, summary = finished
    run = Run(out)
    assert run.experiment == "deep-linear" and run.finished
    assert run.summary == json.loads((out / schema.SUMMARY).read_text())
    assert list(run.log.columns[: len(schema.LOG_COLUMNS)]) == list(schema.LOG_COLUMNS)
    assert run.margins.shape == (len(run.log), 60)
    assert run.directions.shape[0] == len(run.log)
    np.testing.assert_allclose(run.ln_n_over_L, run.log[schema.LN_N_OVER_L])
    assert run.final_margins.shape == (60,) and run.angle_to_final.shape == (len(run.log),)
    assert set(run.summary) <= set(schema.summary_keys("deep-linear"))
    for key in schema.DESIGN_SUMMARY_KEYS:
        assert key in run.summary
    assert run.final_weights().numel() == json.loads((out / schema.CONFIG).read_text())["parameters"]


def test_undeclared_names_are_refused(tmp_path):
    with pytest.raises(KeyError, match="not declared"):
        schema.check_summary("deep-linear", {"ln_n_over_L": 1.0, "made_up": 2})
    writer = RunWriter.create(tmp_path / "w", experiment="deep-linear")
    with pytest.raises(KeyError, match="not declared"):
        writer.open_logs([*schema.LOG_COLUMNS, "made_up"], 3, 0, "<f8")
    with pytest.raises(KeyError, match="not declared"):
        writer.array_log("made_up", 3, "<f4")


def test_json_safe_is_the_one_sanitiser():
    value = {"a": np.float32(1.5), "b": [np.int64(2), float("nan")], "c": (np.bool_(True), float("inf")), 3: np.arange(2)}
    assert schema.json_safe(value) == {"a": 1.5, "b": [2, None], "c": [True, None], "3": [0, 1]}
    json.dumps(schema.json_safe(value), allow_nan=False)


def test_array_log_is_cut_back_but_never_padded(tmp_path):
    log = ArrayLog(tmp_path, "margins", 4, "<f4")
    for i in range(5):
        log.append(np.full(4, i, dtype=np.float32))
    assert log.rows() == 5
    log.truncate(3)
    assert read_array_log(tmp_path, "margins").shape == (3, 4)
    with pytest.raises(UserError, match="holds 3 rows but the checkpoint recorded 7"):
        log.truncate(7)
    assert read_array_log(tmp_path, "margins").shape == (3, 4)  # untouched
    log.close()


def test_resume_refuses_a_log_shorter_than_its_checkpoint(finished, tmp_path):
    import shutil

    from diralign.runner import resume_run

    out = tmp_path / "cut"
    shutil.copytree(finished[0], out)
    data = (out / schema.LOG).read_bytes()
    (out / schema.LOG).write_bytes(data[: len(data) // 2])
    before = (out / schema.LOG).read_bytes()
    with pytest.raises(UserError, match="log was cut"):
        resume_run(out, quiet=True)
    assert (out / schema.LOG).read_bytes() == before


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        (schema.CONFIG, "{not json", "unreadable"),
        (schema.CONFIG, "[1, 2]", "not a JSON object"),
        (schema.CONFIG, '{"config": {}}', "'experiment'"),
        (schema.SUMMARY, "{oops", "unreadable"),
        (schema.LOG, "garbage,header\n1,2\n", "no column"),
        ("margins.json", "{bad", "damaged"),
    ],
)
def test_damage_is_one_clear_error(finished, tmp_path, name, content, fragment):
    import shutil

    out = tmp_path / "damaged"
    shutil.copytree(finished[0], out)
    (out / name).write_text(content)
    with pytest.raises(UserError, match=fragment):
        run = Run(out)
        run.summary, run.log, run.margins  # noqa: B018 - reading is the test


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="not a diralign run directory"):
        Run(tmp_path)
