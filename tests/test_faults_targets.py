"""Targets that mean nothing (issue 16, item 10): a target at or below the ln(n/L) where the
run starts is refused with one line that says where it starts, before --out is touched."""

import pytest
import torch

import diralign
from diralign.cli import main
from diralign.errors import UserError


@pytest.mark.parametrize("target", ["-5", "0", "0.39"])
def test_target_at_or_below_the_start_is_one_line_and_touches_nothing(tmp_path, capsys, target):
    out = tmp_path / "run"
    assert main(["run", "deep-linear", "--out", str(out), "--set", f"target_ln_n_over_L={target}", "--quiet", "--no-plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diralign: error: target_ln_n_over_L=")
    assert "ln(n/L) = 0.396" in err[0] and "target_ln_n_over_L=10" in err[0]  # where it starts, and what to set
    assert not out.exists()


def test_a_refused_target_leaves_the_run_that_force_would_replace(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "linear", "--out", str(out), "--set", "target_ln_n_over_L=3", "--quiet", "--no-plot"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["run", "linear", "--out", str(out), "--force", "--set", "target_ln_n_over_L=-5", "--quiet"]) == 2
    assert "at or below where this run starts" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_python_api_refuses_it_too(tmp_path):
    X = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    model = torch.nn.Linear(2, 1, bias=False).double()
    with pytest.raises(UserError, match="at or below where this run starts"):
        diralign.train(model, X, torch.tensor([1.0, -1.0]), target_ln_n_over_L=0.0, out=tmp_path / "r", quiet=True)
