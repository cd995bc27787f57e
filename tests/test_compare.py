"""diralign compare: labels from the differing config keys (a sweep's grid order first),
sweeps expand to their points, the overlays are written as PNG and PDF, bad input is one
line and exit 2 with nothing on disk lost."""

import json

import matplotlib.image
import pytest

from diralign import cli, compare, runner, sweep


def fake_run(path, config, experiment="fig1"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"experiment": experiment, "config": config}))
    (path / "log.csv").write_text("step,ln_n_over_L,alignment_cos\n0,0.5,0.1\n")
    return path


def test_labels_name_the_differing_keys(tmp_path):
    base = {"seed": 0, "width": 200, "rtol": 1e-6, "widths": [8, 8]}
    runs = [
        fake_run(tmp_path / f"r{i}", dict(base, seed=s, width=w))
        for i, (w, s) in enumerate([(200, 0), (200, 1), (400, 0)])
    ]
    assert compare.labels(runs) == ["seed=0, width=200", "seed=1, width=200", "seed=0, width=400"]
    assert compare.labels(runs, ["width", "seed"]) == ["width=200, seed=0", "width=200, seed=1", "width=400, seed=0"]
    same = [fake_run(tmp_path / "a", base), fake_run(tmp_path / "b", base)]
    assert compare.labels(same) == ["a", "b"]  # nothing differs: the directory names
    tuples = [fake_run(tmp_path / "t1", dict(base, widths=[8, 8])), fake_run(tmp_path / "t2", dict(base, widths=[16]))]
    assert compare.labels(tuples) == ["widths=8x8", "widths=16"]
    # sectioned configs (runtime, dynamics, ...) label by their leaf keys
    nested = [fake_run(tmp_path / f"n{s}", {"runtime": {"seed": s}, "dynamics": {"rtol": 1e-6}}) for s in (0, 1)]
    assert compare.labels(nested) == ["seed=0", "seed=1"]
    mixed = [fake_run(tmp_path / "m1", base, "fig1"), fake_run(tmp_path / "m2", base, "srelu")]
    assert compare.labels(mixed) == ["experiment=fig1", "experiment=srelu"]


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """Two real deep-linear runs laid out as a sweep over seed (made in-process: fast)."""
    out = tmp_path_factory.mktemp("cmp") / "S"
    grid = [("seed", ["0", "1"])]
    sweep.prepare_dir(out, sweep.sweep_record("deep-linear", grid, ["target_ln_n_over_L=5"]))
    for point in sweep.expand("deep-linear", grid, ["target_ln_n_over_L=5"]):
        runner.start_run("deep-linear", point.overrides, out / point.name, quiet=True)
    return out


def test_compare_sweep_writes_png_and_pdf_overlays(small_sweep, tmp_path, capsys):
    out = tmp_path / "C"
    out.mkdir()
    (out / "paper.tex").write_text("mine")
    assert cli.main(["compare", str(small_sweep), "--out", str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["compare", str(small_sweep), "--out", str(out), "--force"]) == 0
    printed = capsys.readouterr().out.split()
    figures = sorted(f"{stem}.{ext}" for stem in compare.STEMS for ext in ("png", "pdf"))
    assert sorted(p.name for p in out.iterdir()) == sorted(figures + ["paper.tex"])
    assert sorted(p.split("/")[-1] for p in printed) == figures
    assert (out / "paper.tex").read_text() == "mine"  # --force overwrites figures only
    image = matplotlib.image.imread(out / "compare_one_minus_cos.png")
    assert image.shape[0] > 100 and image.std() > 0
    runs, keys = compare.collect([small_sweep])
    assert [r.name for r in runs] == ["seed=0", "seed=1"] and keys == ["seed"]
    assert compare.labels(runs, keys) == ["seed=0", "seed=1"]


def test_compare_mixes_runs_and_sweeps_without_duplicates(small_sweep, tmp_path):
    runs, _ = compare.collect([small_sweep / "seed=1", small_sweep])
    assert [r.name for r in runs] == ["seed=1", "seed=0"]


def test_bad_input_is_one_line_and_writes_nothing(small_sweep, tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "C")]) == 2
    (tmp_path / "notarun").mkdir()
    assert cli.main(["compare", str(tmp_path / "notarun"), "--out", str(tmp_path / "C")]) == 2
    assert cli.main(["compare", "--out", str(tmp_path / "C")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 3
        and "does not exist" in err[0]
        and "neither a run directory" in err[1]
        and "RUN_OR_SWEEP" in err[2]
    )
    assert not (tmp_path / "C").exists()
