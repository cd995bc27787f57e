"""diralign.experiments.margins: Figures 2/3 end to end, batch norm modes, user models."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch

from diralign.cli import main
from diralign.config import apply_overrides
from diralign.dynamics.sgd import MinibatchSGD
from diralign.errors import UserError
from diralign.experiments.margins import MarginsExperiment, margin_change_last_quarter
from diralign.rundir import read_array_log
from diralign.runner import resume_run, start_run


def test_batch_norm_modes_keep_the_risk_a_function_of_the_parameters():
    from diralign.experiments.margins import set_batch_norm

    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).double().eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 2.0)
        net[1].bias.uniform_(-1.0, 1.0)
    conv = net[0](x).detach()
    gamma, beta = net[1].weight.detach()[None, :, None, None], net[1].bias.detach()[None, :, None, None]
    set_batch_norm(net, "frozen")  # running statistics 0/1: an affine map
    np.testing.assert_allclose(net(x).detach().numpy(), (gamma * conv / math.sqrt(1 + 1e-5) + beta).numpy(), rtol=1e-12)
    set_batch_norm(net, "batch")  # this batch's statistics (biased variance), nothing stored
    mean = conv.mean(dim=(0, 2, 3), keepdim=True)
    var = conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = gamma * (conv - mean) / torch.sqrt(var + 1e-5) + beta
    for _ in range(2):
        np.testing.assert_allclose(net(x).detach().numpy(), expected.numpy(), rtol=1e-10, atol=1e-12)
    assert dict(net.named_buffers()) == {}


def test_any_registered_or_user_model_via_set(tmp_path, monkeypatch):
    pkg = tmp_path / "mynets_margins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch\n"
        "def make(num_classes, in_shape):\n"
        "    c, h, w = in_shape\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(c * h * w, 16, bias=False), torch.nn.ReLU(),"
        " torch.nn.Linear(16, num_classes, bias=False))\n"
        "def broken(num_classes):\n"
        "    raise RuntimeError('no')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "my.npz", X=rng.normal(size=(30, 1, 6, 6)), y=np.arange(30) % 3)
    summary, _, setup = start_run(
        "margins",
        ["model=mynets_margins.nets:make", f"data={tmp_path / 'my.npz'}", "dtype=float64", "target_risk=1e-3"],
        tmp_path / "run",
        quiet=True,
    )
    assert summary["homogeneity_degree"] == 2 and summary["train_accuracy"] == 1.0
    assert summary["ln_n_over_L"] >= math.log(30) + math.log(1e3)
    with pytest.raises(UserError, match="raised RuntimeError"):
        start_run("margins", ["model=mynets_margins.nets:broken"], tmp_path / "run2", quiet=True)


def test_margins_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "margins", "--set", "data=digits", "--set", "subset=30", "--set", "dtype=float64", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    meta = json.loads((out / "config.json").read_text())
    n = 30
    assert meta["config"]["target_ln_n_over_L"] == pytest.approx(math.log(n) + math.log(1e8))
    assert summary["ln_n_over_L"] >= math.log(n) + 18.42 and summary["target_reached"]
    assert summary["homogeneity_degree"] == 5 and summary["train_accuracy"] == 1.0
    assert all(summary[k] is not None for k in ("alignment_cos", "path_length", "param_norm", "margin_change_last_quarter"))
    # Final margins against an independent recomputation from the checkpointed weights.
    payload = torch.load(out / "checkpoint.pt", weights_only=False)
    w = payload["state"]["w"].double()
    experiment = MarginsExperiment()
    config = apply_overrides(experiment.default_config(), ["data=digits", "subset=30", "dtype=float64"])
    setup = experiment.setup(config, torch.float64, torch.device("cpu"))
    setup.problem.load_into_model(w)
    with torch.no_grad():
        logits = setup.problem.model(setup.problem.X).numpy()
    labels = setup.problem.y.numpy()
    true = logits[np.arange(n), labels]
    others = np.where(np.eye(10, dtype=bool)[labels], -np.inf, logits)
    margins = (true - others.max(axis=1)) / float(w.norm()) ** 5
    np.testing.assert_allclose(np.load(out / "final_margins.npy"), margins, rtol=1e-9)
    # Risk from the margins' softmax form: L = sum_i log1p(sum_{j != y} exp(f_j - f_y)).
    losses = np.log1p(np.exp(others - true[:, None]).sum(axis=1))
    assert summary["log_risk"] == pytest.approx(math.log(losses.sum()), rel=1e-9)
    traj = read_array_log(out, "margins")
    assert traj.dtype == np.float32 and traj.shape[1] == n and traj.shape[0] >= 20
    np.testing.assert_allclose(traj[-1], margins, rtol=1e-6)
    change = margin_change_last_quarter(out)
    assert change["margin_change_last_quarter"] == pytest.approx(summary["margin_change_last_quarter"])
    assert main(["plot", str(out)]) == 0
    for stem in ("fig2", "margins", "curves"):
        assert (out / f"{stem}.png").stat().st_size > 10_000 and (out / f"{stem}.pdf").exists()


def test_margins_resume_equals_uninterrupted(tmp_path, monkeypatch):
    args = ["data=synthetic-images", "n=40", "batch_size=16", "dtype=float64", "max_steps=8", "log_every_ln=0.01", "checkpoint_every_steps=3"]
    straight, _, _ = start_run("margins", args, tmp_path / "a", quiet=True)
    original = MinibatchSGD.step
    calls = {"n": 0}

    def interrupting_step(self, w, ev, target=None):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # handled by the trainer: checkpoint, then stop
        return original(self, w, ev, target)

    monkeypatch.setattr(MinibatchSGD, "step", interrupting_step)
    from diralign.trainer import Interrupted

    with pytest.raises(Interrupted):
        start_run("margins", args, tmp_path / "b", quiet=True)
    monkeypatch.setattr(MinibatchSGD, "step", original)
    resumed, _, _ = resume_run(tmp_path / "b", quiet=True)
    assert straight["steps"] == 8 and straight["stop_reason"] == "max_steps"
    for key in ("ln_n_over_L", "log_risk", "param_norm", "alignment_cos", "path_length", "steps", "rejected_steps", "grad_evals"):
        assert resumed[key] == straight[key], key
    margins_a = read_array_log(tmp_path / "a", "margins")
    assert len(margins_a) >= 4
    np.testing.assert_array_equal(margins_a, read_array_log(tmp_path / "b", "margins"))
