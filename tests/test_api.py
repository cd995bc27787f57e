"""The Python API and CLI hooks for a user's own model (issue 8).

    python -m pytest tests/test_api.py -q
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import diralign
from diralign import UserError
from diralign.cli import main
from diralign.data import separable_gaussian
from diralign.models.structure import nonsmooth_operations

REPO = Path(__file__).resolve().parents[1]


def mlp3(d: int, width: int = 10, bias: bool = False, out: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d, width, bias=bias), nn.ReLU(),
        nn.Linear(width, width, bias=bias), nn.ReLU(),
        nn.Linear(width, out, bias=bias),
    )


@pytest.fixture(scope="module")
def separable():
    X, y = separable_gaussian(40, 5, margin=0.1, seed=0)
    return X, y


@pytest.fixture(scope="module")
def mlp_run(separable, tmp_path_factory):
    X, y = separable
    torch.manual_seed(0)
    model = mlp3(5)
    w_before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    run = diralign.train(model, X, y, target_ln_n_over_L=100, out=tmp_path_factory.mktemp("mlp") / "run", quiet=True)
    return model, w_before, run


# -- acceptance: a bias-free 3-layer MLP --------------------------------------------------


def test_train_mlp_reaches_target_with_degree_3(mlp_run, separable):
    model, w_before, run = mlp_run
    s = run.summary
    assert s["homogeneity_degree"] == 3
    assert s["train_accuracy"] == 1.0
    assert s["ln_n_over_L"] >= 100.0 and s["stop_reason"] == "target_ln_n_over_L"
    assert all(math.isfinite(s[k]) for k in ("log_risk", "min_normalized_margin", "path_length", "param_norm"))
    # auto dynamics: ReLU kinks on 40 x 20 units, so gd to ln(n/L) = 5 and then the sliding flow.
    assert run.config["dynamics"] == "flow" and run.config["flow_from_ln"] == 5.0
    assert s["dynamics"] == "flow/sliding" and s["faithful_to_flow"] is True
    assert 5.0 <= s["faithful_from_ln_n_over_L"] < 6.0
    # The caller's model is untouched; the run's model carries the trained weights.
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), w_before)
    assert run.model is not model


def test_run_artifacts_agree_with_an_independent_recomputation(mlp_run, separable):
    X, y = separable
    _, _, run = mlp_run
    # Recompute margins and log risk from the returned model with plain torch ops.
    with torch.no_grad():
        margins = y * run.model(X)[:, 0]
    norm = torch.cat([p.detach().reshape(-1) for p in run.model.parameters()]).norm()
    q = (margins / norm**3).numpy()
    log_risk = float(torch.logsumexp(torch.log(torch.log1p(torch.exp(-margins))), 0))
    assert run.summary["log_risk"] == pytest.approx(log_risk, rel=1e-9, abs=1e-9)
    assert run.summary["min_normalized_margin"] == pytest.approx(q.min(), rel=1e-9)
    np.testing.assert_allclose(run.final_margins, q, rtol=1e-9)
    # Trajectories [T, n] (float32 on disk) end at the final margins; the log has T rows.
    assert run.margins.shape == (len(run.log), 40)
    np.testing.assert_allclose(run.margins[-1], q, rtol=1e-6)
    assert run.log["ln_n_over_L"].iloc[-1] == pytest.approx(run.summary["ln_n_over_L"])
    # Assumptions: measured, stored, and the late Assumption 2.3 step recorded.
    stored = json.loads((run.path / "assumptions.json").read_text())
    assert stored["homogeneity"]["degree"] == 3 and stored["has_bias"] is False
    assert stored["nonsmooth_operations"] == ["ReLU"]
    assert run.assumptions["initially_below_loss_at_zero"] is False
    assert run.assumptions["assumption_2_3_step"] == run.summary["assumption_2_3_step"] >= 1
    # The probe of the returned model reproduces the trainer's numbers.
    panel = diralign.probe(run.model, X, y)
    assert panel["homogeneity_degree"] == 3
    assert panel["ln_n_over_L"] == pytest.approx(run.summary["ln_n_over_L"], rel=1e-12)
    assert panel["min_normalized_margin"] == pytest.approx(run.summary["min_normalized_margin"], rel=1e-12)


def test_plot_and_load_run(mlp_run, separable):
    X, y = separable
    _, _, run = mlp_run
    paths = run.plot()
    names = {p.name for p in paths}
    assert {"curves.png", "margins.png"} <= names and all(p.stat().st_size > 0 for p in paths)
    again = diralign.load_run(run.path)
    assert again.summary == run.summary and len(again.log) == len(run.log)
    # An in-memory model cannot be rebuilt from config.json; the reason is kept.
    assert again.model is None and "in-memory" in again.model_error
    # Given the architecture, load_run puts the final weights into it.
    loaded = diralign.load_run(run.path, model=mlp3(5).double()).model
    for a, b in zip(loaded.parameters(), run.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="parameters"):
        diralign.load_run(run.path, model=mlp3(5, width=7))
    with pytest.raises(UserError, match="not a diralign run"):
        diralign.load_run(run.path / "nowhere")


def test_probe_model_with_biases_is_not_homogeneous(separable):
    X, y = separable
    torch.manual_seed(1)
    model = mlp3(5, bias=True).double()
    with torch.no_grad():  # biases large enough that the violation is unmistakable
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(0.5, 1.0)
    panel = diralign.probe(model, X, y)
    assert panel["homogeneous"] is False and panel["homogeneity_degree"] is None
    assert panel["has_bias"] is True
    # The violation is measured: compare with f(2W) against 2^k f(W) computed here.
    with torch.no_grad():
        base = model(X[:40])[:, 0]
        twice = torch.func.functional_call(model, {k: 2 * v for k, v in model.named_parameters()}, (X[:40],))[:, 0]
    k = round(panel["homogeneity"]["fitted_degree"])
    direct = float((twice - 2**k * base).abs().max() / (2**k * base.abs().max()))
    assert panel["homogeneity"]["violation"] >= direct > 1e-2
    assert "not homogeneous" in panel["verdict"] and "relative violation" in panel["verdict"]
    assert panel["min_normalized_margin"] is None and math.isfinite(panel["min_median_normalized_margin"])
    # Probing does not change the model (eval mode restored, weights untouched).
    assert model.training


def test_probe_matches_closed_form_on_a_linear_model():
    # Binary linear model: p_i = y_i <u, x_i>, alignment cos(u, -grad log L) in closed form.
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    u = torch.randn(4, generator=gen, dtype=torch.float64)
    y = torch.sign(X @ u)
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.3 * u[None])
    p = diralign.probe(model, X, y, loss="exp")
    margins = y * (X @ (0.3 * u))
    weights = torch.softmax(-margins, 0)  # grad log L for exp loss = -sum_i w_i y_i x_i
    grad = -(weights[:, None] * y[:, None] * X).sum(0)
    cos = float(torch.dot(0.3 * u, -grad) / ((0.3 * u).norm() * grad.norm()))
    assert p["homogeneity_degree"] == 1
    assert p["alignment_cos"] == pytest.approx(cos, rel=1e-12)
    assert p["log_risk"] == pytest.approx(float(torch.logsumexp(-margins, 0)), rel=1e-12)
    np.testing.assert_allclose(p["normalized_margins"], (margins / (0.3 * u).norm()).numpy(), rtol=1e-12)
    assert p["layers"]["weight"]["share"] == pytest.approx(1.0)


def test_labels_follow_the_output_shape(separable):
    X, y = separable
    torch.manual_seed(0)
    # 0/1 labels with a scalar output are read as -1/+1; ±1 with two logits as 0/1.
    scalar, two = nn.Linear(5, 1, bias=False).double(), nn.Linear(5, 2, bias=False).double()
    zero_one = (y > 0).long()
    assert diralign.probe(scalar, X, zero_one)["log_risk"] == diralign.probe(scalar, X, y)["log_risk"]
    assert diralign.probe(two, X, y)["log_risk"] == diralign.probe(two, X, zero_one)["log_risk"]
    with torch.no_grad():  # and the two-logit margin is f_y - f_other
        out = two(X)
    expected = (out.gather(1, zero_one[:, None])[:, 0] - out.gather(1, 1 - zero_one[:, None])[:, 0]).min()
    assert diralign.probe(two, X, y)["min_margin"] == pytest.approx(float(expected), rel=1e-12)
    with pytest.raises(UserError, match="class indices 0..2"):
        diralign.probe(nn.Linear(5, 3, bias=False).double(), X, torch.arange(40) % 5)
    with pytest.raises(UserError, match="one output per example"):
        diralign.probe(nn.Linear(5, 1, bias=False).double(), X, torch.arange(40) % 3)
    with pytest.raises(UserError, match="output must be"):
        diralign.probe(nn.Sequential(nn.Linear(5, 6, bias=False), nn.Unflatten(1, (2, 3))).double(), X, y)
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        diralign.train(mlp3(5), bad, y, quiet=True)
    with pytest.raises(UserError, match="unknown training option"):
        diralign.train(mlp3(5), X, y, quiet=True, no_such_option=1)


def test_smooth_model_uses_the_flow_and_multiclass(tmp_path):
    # Deep linear (identity activations) is smooth: auto picks the error-controlled flow.
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.argmax(X @ torch.randn(3, 3, generator=gen, dtype=torch.float64), dim=1)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6, bias=False), nn.Linear(6, 3, bias=False))
    assert nonsmooth_operations(model) == []
    run = diralign.train(model, X, y, target_ln_n_over_L=8, out=tmp_path / "r", quiet=True)
    assert run.config["dynamics"] == "flow" and run.summary["faithful_to_flow"] is True
    assert run.summary["homogeneity_degree"] == 2 and run.summary["train_accuracy"] == 1.0
    assert run.summary["ln_n_over_L"] >= 8
    assert "3 classes" in run.meta["data"]["labels"]
    # A finished run resumes to the same summary (wiring of the in-memory experiment).
    again = diralign.resume(run.path, model, X, y, quiet=True)
    assert again.summary["ln_n_over_L"] == run.summary["ln_n_over_L"]


def test_interrupted_train_resumes_bit_identically(tmp_path, monkeypatch):
    import signal

    from diralign.config import TrainConfig
    from diralign.dynamics import FLOW_INTEGRATORS, flow_integrator

    gen = torch.Generator().manual_seed(11)
    X = torch.randn(90, 3, generator=gen, dtype=torch.float64)
    X = X[X.sum(1).abs() > 0.5][:30]
    y = torch.sign(X.sum(1))

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 1, bias=False))

    Flow = FLOW_INTEGRATORS[flow_integrator(net(), TrainConfig())]  # the default flow integrator for this model
    reference = diralign.train(net(), X, y, target_ln_n_over_L=40, out=tmp_path / "ref", quiet=True)
    original_step, calls = Flow.step, []

    def step_then_interrupt(self, *args, **kwargs):  # a SIGINT arrives during step 25
        calls.append(1)
        if len(calls) == 25:
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(Flow, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="diralign.resume"):
        diralign.train(net(), X, y, target_ln_n_over_L=40, out=tmp_path / "cut", quiet=True)
    monkeypatch.setattr(Flow, "step", original_step)
    assert diralign.load_run(tmp_path / "cut").finished is False
    resumed = diralign.resume(tmp_path / "cut", net(), X, y, quiet=True)
    assert resumed.summary["steps"] == reference.summary["steps"]
    for a, b in zip(resumed.model.parameters(), reference.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.log["ln_n_over_L"].tolist() == reference.log["ln_n_over_L"].tolist()


def test_dataloader_with_sgd(tmp_path):
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(48, 4, generator=gen)
    y = torch.where(X @ torch.ones(4) > 0, 1.0, -1.0)
    loader = DataLoader(TensorDataset(X, y), batch_size=16, shuffle=True)
    torch.manual_seed(0)
    run = diralign.train(nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 1, bias=False)),
                         loader, target_ln_n_over_L=15, out=tmp_path / "r", quiet=True)
    assert run.config["dynamics"] == "sgd" and run.config["batch_size"] == 16
    assert run.summary["ln_n_over_L"] >= 15 and run.summary["train_accuracy"] == 1.0
    assert run.meta["data"]["n"] == 48


def test_report_is_printed_and_training_never_refused(separable, tmp_path, capsys):
    X, y = separable
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))  # biases, not homogeneous
    run = diralign.train(model, X, y, target_ln_n_over_L=6, out=tmp_path / "r")
    out = capsys.readouterr().out
    assert "not homogeneous" in out and "has biases" in out and "training anyway" in out
    assert run.summary["homogeneity_degree"] is None and run.summary["ln_n_over_L"] >= 6
    assert run.assumptions["has_bias"] is True


# -- CLI hooks --------------------------------------------------------------------------


NETS = '''
import torch
from torch import nn


def make(num_classes, in_shape):
    c, h, w = in_shape
    return nn.Sequential(nn.Conv2d(c, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * h * w, num_classes, bias=False))


def mlp(in_features, out_features):
    return nn.Sequential(nn.Linear(in_features, 8, bias=False), nn.ReLU(), nn.Linear(8, out_features, bias=False))


def boom(num_classes):
    raise RuntimeError("kaboom")


def notmodule(num_classes):
    return 42
'''


@pytest.fixture(scope="module")
def user_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("userpkg")
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "nets.py").write_text(textwrap.dedent(NETS))
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 8)
    X = rng.normal(size=(24, 1, 6, 6)) + y[:, None, None, None] * np.eye(6)[None, None]
    np.savez(root / "my.npz", X=X, y=y)
    Xf = rng.normal(size=(80, 4))
    Xf = Xf[np.abs(Xf.sum(1)) > 1.0][:30]  # a margin, so that a few hundred GD steps suffice
    np.savez(root / "flat.npz", X=Xf, y=np.where(Xf.sum(1) > 0, 1.0, -1.0))
    sys.path.insert(0, str(root))  # in-process CLI calls see it as if on PYTHONPATH
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


def _cli(args, cwd, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(cwd), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "diralign", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_margins_with_user_factory(user_package):
    out = user_package / "margins-run"
    # An absolute data path, so that load_run can rebuild the model from another directory.
    res = _cli(["run", "margins", "--set", "model=mypkg.nets:make", "--set", f"data={user_package / 'my.npz'}", "--set", "threads=1",
                "--set", "target_ln_n_over_L=12", "--out", str(out), "--quiet", "--no-plot"], user_package)
    assert res.returncode == 0, res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_accuracy"] == 1.0 and summary["homogeneity_degree"] == 2
    # load_run rebuilds the user's model from config.json and its numbers reproduce the summary.
    run = diralign.load_run(out)
    assert run.model is not None, run.model_error
    data = np.load(user_package / "my.npz")
    panel = diralign.probe(run.model, torch.tensor(data["X"]), data["y"], loss="cross-entropy")
    assert panel["ln_n_over_L"] == pytest.approx(summary["ln_n_over_L"], rel=1e-5)


def test_cli_custom_experiment_with_user_factory(user_package):
    out = user_package / "custom-run"
    code = main(["run", "custom", "--set", "model=mypkg.nets:mlp", "--set", f"data={user_package / 'flat.npz'}",
                 "--set", "dynamics=gd", "--set", "target_ln_n_over_L=20", "--out", str(out), "--quiet", "--no-plot"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["homogeneity_degree"] == 2 and summary["ln_n_over_L"] >= 20 and summary["train_accuracy"] == 1.0


@pytest.mark.parametrize("experiment", ["margins", "custom"])
@pytest.mark.parametrize("factory,message", [("boom", "raised RuntimeError: kaboom"), ("notmodule", "returned int, not a torch.nn.Module")])
def test_cli_bad_factory_is_one_line_exit_2(user_package, experiment, factory, message, capsys):
    out = user_package / f"bad-{experiment}-{factory}"
    code = main(["run", experiment, "--set", f"model=mypkg.nets:{factory}", "--set", f"data={user_package / 'my.npz'}", "--out", str(out)])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diralign: error:") and message in lines[0]
    assert not out.exists()


# -- examples --------------------------------------------------------------------------


@pytest.mark.slow
def test_example_own_model_digits(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(REPO / "examples" / "own_model_digits.py"), "--out", str(tmp_path / "r"), "--quiet"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "verdict:" in res.stdout and "homogeneous of degree 2" in res.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["train_accuracy"] == 1.0 and summary["ln_n_over_L"] >= 30
    assert (tmp_path / "r" / "margins.png").exists()


def test_auto_dynamics_by_kinks_and_their_number():
    """Smooth: the flow; ReLU / max-pool with few kink units over the data: gd, then the sliding
    flow from ln(n/L) = 5; many units, or kinks the sliding flow does not follow: gd."""
    from diralign.api import SLIDING_AUTO_UNITS, _auto_dynamics, kink_units

    X = torch.randn(40, 5, dtype=torch.float64)
    small = mlp3(5).double()
    assert kink_units(small, X) == 40 * 20
    assert _auto_dynamics(small, X, False)[0::2] == ("flow", {"flow_from_ln": 5.0})
    wide = mlp3(5, width=SLIDING_AUTO_UNITS // 40).double()
    choice, why, implied = _auto_dynamics(wide, X, False)
    assert choice == "gd" and implied == {} and "units" in why
    leaky = nn.Sequential(nn.Linear(5, 4, bias=False), nn.LeakyReLU(), nn.Linear(4, 1, bias=False)).double()
    assert _auto_dynamics(leaky, X, False)[0] == "gd"
    linear = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Linear(4, 1, bias=False)).double()
    assert _auto_dynamics(linear, X, False)[0] == "flow"
    assert _auto_dynamics(small, X, True)[0] == "sgd"
