"""The package's shape: no import circle, experiments independent, one owner per setting."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_circle_and_experiments_stand_alone():
    layout = runpy.run_path(str(ROOT / "scripts" / "layout.py"))
    edges, _ = layout["graph"]()
    assert layout["cycles"](edges) == []
    assert layout["violations"](edges) == []


def test_no_config_defaults_hidden_in_getattr():
    pattern = re.compile(r"getattr\((self\.)?config\b")
    offenders = [str(p) for p in (ROOT / "src").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_run_directory_names_live_in_the_schema():
    """File names of the run directory appear as literals only in the schema."""
    names = ("config.json", "summary.json", "assumptions.json", "log.csv", "checkpoint.pt", "final_margins.npy",
             "angle_to_final.npy")
    offenders = []
    for path in (ROOT / "src").rglob("*.py"):
        if path.name == "schema.py":
            continue
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            if any(f'"{n}"' in code or f"'{n}'" in code for n in names):
                offenders.append(f"{path.name}: {line.strip()}")
    assert offenders == []
