"""Margin experiment (paper Fig. 2/3): models, image data, the paper's SGD, the run end to end."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diralign.cli import main
from diralign.config import apply_overrides
from diralign.data.images import CIFAR_FOLDER, cifar10, cifar10_raw, class_balanced_subset, digits
from diralign.dynamics import make_dynamics
from diralign.dynamics.sgd import MinibatchSGD
from diralign.errors import UserError
from diralign.experiments.margins import MarginsExperiment, margin_change_last_quarter
from diralign.models import build_model, homogeneity_degree
from diralign.rundir import read_array_log
from diralign.runner import resume_run, start_run


# -- a tiny CIFAR-10 in torchvision's on-disk format ----------------------------------------
def write_tiny_cifar(root, per_batch=6, seed=0):
    """``root/cifar-10-batches-py`` as the real archive unpacks: five training batches, a
    test batch and ``batches.meta``, each a pickled dict with ``data`` uint8 [N, 3072]
    (all red, then green, then blue 32x32 planes) and ``labels``.  Returns the training
    images [5 * per_batch, 3, 32, 32] and labels that were written."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR_FOLDER
    folder.mkdir(parents=True)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        batch_labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        entry = {"batch_label": f"{name} of 6", "labels": batch_labels, "data": data, "filenames": [f"img{i}.png" for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        if name != "test_batch":
            images.append(data.reshape(per_batch, 3, 32, 32))
            labels += batch_labels
    meta = {"num_cases_per_batch": per_batch, "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"], "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return np.concatenate(images), np.asarray(labels)


def test_cifar10_reader_reads_torchvision_layout(tmp_path):
    images, labels = write_tiny_cifar(tmp_path)
    raw, raw_labels = cifar10_raw(tmp_path)
    assert raw.dtype == np.uint8 and raw.shape == (30, 3, 32, 32)
    np.testing.assert_array_equal(raw, images)  # pixel planes in the right channel order
    np.testing.assert_array_equal(raw_labels, labels)
    data = cifar10(tmp_path, dtype=torch.float64)
    X = data.X.numpy()
    expected = images / 255.0
    mean = expected.mean(axis=(0, 2, 3))
    std = expected.std(axis=(0, 2, 3))
    np.testing.assert_allclose(X, (expected - mean[None, :, None, None]) / std[None, :, None, None], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(X.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(X.std(axis=(0, 2, 3)), 1.0, rtol=1e-12)


def test_cifar10_missing_or_partial_is_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "margins", "--set", "data=cifar10", "--set", f"data_root={tmp_path}", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / CIFAR_FOLDER) in err and "--download" in err and "not found" in err
    assert not out.exists() or not any(out.iterdir())
    write_tiny_cifar(tmp_path)
    (tmp_path / CIFAR_FOLDER / "data_batch_3").unlink()
    with pytest.raises(UserError, match="missing data_batch_3"):
        cifar10_raw(tmp_path)
    (tmp_path / CIFAR_FOLDER / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # cut short
    with pytest.raises(UserError, match="corrupt or truncated"):
        cifar10_raw(tmp_path)


# -- models ------------------------------------------------------------------------------
def test_h_alexnet_is_the_bias_free_tutorial_net_of_degree_5():
    torch.manual_seed(0)
    net = build_model("h-alexnet", num_classes=10).double()
    # The tutorial net has 62,006 parameters; its 6+16+120+84+10 biases are gone.
    assert sum(p.numel() for p in net.parameters()) == 62_006 - 236
    assert not any(name.endswith("bias") for name, _ in net.named_parameters())
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64)
    report = homogeneity_degree(net, x)
    assert report.homogeneous and report.degree == 5 and report.declared == 5
    assert report.violation < 1e-12
    # Independently: scale every weight by c and compare with c^5 f.
    with torch.no_grad():
        base = net(x)
        for p in net.parameters():
            p.mul_(1.7)
        np.testing.assert_allclose(net(x).numpy(), 1.7**5 * base.numpy(), rtol=1e-12, atol=1e-12 * float(base.abs().max()) * 1.7**5)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_nets_are_unmodified_and_not_homogeneous(name):
    import torchvision

    torch.manual_seed(0)
    net = build_model(name, num_classes=10)
    reference = getattr(torchvision.models, name)(weights=None, num_classes=10)
    assert [(n, p.shape) for n, p in net.named_parameters()] == [(n, p.shape) for n, p in reference.named_parameters()]
    assert net.homogeneity_degree is None and not net.training
    report = homogeneity_degree(net, torch.randn(2, 3, 32, 32))  # float32: DenseNet overflows c^k
    assert not report.homogeneous and report.degree is None


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


# -- data ----------------------------------------------------------------------------------
def test_class_balanced_subset():
    labels = np.repeat(np.arange(4), [50, 30, 12, 15])
    index = class_balanced_subset(labels, 40, seed=3)
    assert len(index) == 40 and len(set(index.tolist())) == 40 and np.all(np.diff(index) > 0)
    np.testing.assert_array_equal(np.bincount(labels[index]), [10, 10, 10, 10])
    # Classes 2 and 3 run out (12 and 15 examples) and drop out of the rotation.
    np.testing.assert_array_equal(np.bincount(labels[class_balanced_subset(labels, 61, seed=3)]), [17, 17, 12, 15])
    np.testing.assert_array_equal(class_balanced_subset(labels, 40, seed=3), index)
    assert not np.array_equal(class_balanced_subset(labels, 40, seed=4), index)
    with pytest.raises(UserError):
        class_balanced_subset(labels, 108)
    d = digits(subset=105, seed=0)
    assert d.X.shape == (105, 3, 32, 32) and set(np.bincount(d.y).tolist()) <= {10, 11}
    assert np.isfinite(d.X.numpy()).all()


# -- the paper's SGD -------------------------------------------------------------------------
def small_problem(dtype=torch.float64, **overrides):
    experiment = MarginsExperiment()
    pairs = ["data=synthetic-images", "n=40", "batch_size=16", "dtype=float64"] + [f"{k}={v}" for k, v in overrides.items()]
    config = apply_overrides(experiment.default_config(), pairs)
    setup = experiment.setup(config, dtype, torch.device("cpu"))
    return setup, config


def test_sgd_epoch_matches_hand_written_minibatch_updates():
    setup, config = small_problem(eta=0.5, batch_size=16)
    problem = setup.problem
    w0 = setup.w0.clone()
    ev = problem.evaluate(w0)
    sgd = MinibatchSGD(problem, config)
    order = torch.randperm(problem.n, generator=torch.Generator().manual_seed(config.seed + 20_200_612))
    result = sgd.step(w0, ev)
    assert result.rejected == 0  # (else the hand-written epoch below is not what ran)
    # Reference: plain autograd on the summed cross-entropy, step eta * grad L_B / L_full.
    model = build_model("h-alexnet").double()
    L_full = math.exp(ev.log_risk)
    w = w0.clone()
    for batch in order.split(16):
        problem.load_into_model(w)
        model.load_state_dict(problem.model.state_dict())
        loss = F.cross_entropy(model(problem.X[batch]), problem.y[batch], reduction="sum")
        grads = torch.autograd.grad(loss, list(model.parameters()))
        w = w - 0.5 * torch.cat([g.reshape(-1) for g in grads]) / L_full
    np.testing.assert_allclose(result.w.numpy(), w.numpy(), rtol=1e-10, atol=1e-12)
    assert result.ev.log_risk <= ev.log_risk


def test_sgd_rejects_risk_increase_and_caps_updates():
    setup, config = small_problem(eta=1e6, max_update_ratio=0.05)
    problem = setup.problem
    ev = problem.evaluate(setup.w0)
    sgd = MinibatchSGD(problem, config)
    result = sgd.step(setup.w0, ev)
    assert sgd.capped_updates > 0
    assert result.ev.log_risk <= ev.log_risk and math.isfinite(result.ev.log_risk)
    step = (result.w - setup.w0).norm()
    assert step <= 0.05 * setup.w0.norm() * math.ceil(problem.n / 16) * 1.5


def test_sgd_is_deterministic_and_resumable():
    def run(epochs, split=None):
        setup, config = small_problem(eta=0.3)
        dyn = make_dynamics(setup.problem, config)
        w, ev = setup.w0, setup.problem.evaluate(setup.w0)
        for epoch in range(epochs):
            if epoch == split:  # a checkpoint round trip into a fresh dynamics object
                state = pickle.loads(pickle.dumps(dyn.state_dict()))
                dyn = make_dynamics(setup.problem, config)
                dyn.load_state_dict(state)
            result = dyn.step(w, ev)
            w, ev = result.w, result.ev
        return w

    straight = run(6)
    assert torch.equal(straight, run(6))
    assert torch.equal(straight, run(6, split=3))


def test_gd_accumulates_chunks():
    setup, config = small_problem(chunk_size=7, dynamics="gd")
    problem = setup.problem
    chunked = problem.evaluate(setup.w0)
    problem.chunk_size = None
    whole = problem.evaluate(setup.w0)
    assert chunked.log_risk == pytest.approx(whole.log_risk, rel=1e-13)
    np.testing.assert_allclose(chunked.grad.numpy(), whole.grad.numpy(), rtol=1e-10, atol=1e-14)
    part = problem.evaluate_subset(setup.w0, torch.arange(5, 23))
    reference = F.cross_entropy(problem.forward(setup.w0, problem.X[5:23]), problem.y[5:23], reduction="sum")
    assert part.log_risk == pytest.approx(math.log(float(reference)), rel=1e-12)


# -- the experiment end to end ------------------------------------------------------------------
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
