"""benchmarks/gpu_check.py --dry-run (issue 13): the GPU check's own code runs on CPU.

A reduced dry run (three of its steps, small sizes) so the suite stays quick; the whole dry run
is `bash benchmarks/gpu_check.sh --dry-run` (a few minutes on 2 cores).
"""

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reduced_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "check.json"
    rc = _driver().main(["--dry-run", "--steps", "env,margins,epochs", "--models", "h-alexnet", "--epoch-n", "24",
                         "--subset", "20", "--json", str(out), "--keep", str(tmp_path / "runs")])
    report = json.loads(out.read_text())
    assert rc == 0 and report["all_ok"], report
    assert report["dry_run"] and report["steps"]["env"]["result"]["device"] == "cpu"
    margins = report["steps"]["margins"]["result"]
    assert margins["fig2_png"] and margins["n"] == 20 and margins["ln_n_over_L"] >= math.log(20) + 18.42
    epoch = report["steps"]["epochs"]["result"]["h-alexnet"]
    assert 1 <= epoch["epochs"] <= 2 and epoch["seconds_per_epoch"] > 0 and epoch["n"] == 24
    assert epoch["target_ln_n_over_L"] == math.log(24) - math.log(1e-8)
    assert set(report["steps"]) == {"env", "margins", "epochs"}


def test_unknown_step_is_a_usage_error(capsys):
    import pytest

    with pytest.raises(SystemExit):
        _driver().main(["--dry-run", "--steps", "margins,warp"])
    assert "warp" in capsys.readouterr().err
