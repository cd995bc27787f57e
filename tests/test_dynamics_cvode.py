"""integrator=cvode (the default flow): its direction against a tight explicit reference,
its exact Jacobian-vector products against finite differences, its segment grid, and
bit-exact resume through segment replay."""

import copy
import dataclasses
import io
import math

import pytest
import torch

from diralign.config import TrainConfig
from diralign.data import separable_gaussian
from diralign.data.planar import embed, planar_teacher
from diralign.dynamics import make_dynamics
from diralign.dynamics.cvode import CvodeFlow, SClockSystem, segment_end
from diralign.errors import UserError
from diralign.models import DeepLinear
from diralign.models.squared_relu import SquaredReLUNet
from diralign.problem import Problem


def deep_linear(chunk_size=None):
    X, y = separable_gaussian(60, 6, 0.1, 0, dtype=torch.float64)
    model = DeepLinear(6, (8, 8), 1.0, generator=torch.Generator().manual_seed(1)).double()
    problem = Problem(model, X, y, "logistic", degree=3, chunk_size=chunk_size)
    return problem, problem.flat_params()


def squared_relu(width=200):
    """Fig. 1's network on Fig. 1's planar teacher data, at width 200."""
    X, y = planar_teacher(100, 0.1, seed=0)
    model = SquaredReLUNet(3, width, generator=torch.Generator().manual_seed(1))
    problem = Problem(model, embed(X), y, "logistic", degree=2)
    return problem, problem.flat_params()


def run_to(problem, w, target, dynamics=None, ev=None, **config):
    """Step ``dynamics`` (a fresh one from ``config`` if None) until ln(n/L) >= target."""
    dynamics = dynamics or make_dynamics(problem, dataclasses.replace(TrainConfig(), **config))
    ev = ev or problem.evaluate(w)
    evals = 0
    while math.log(problem.n) - ev.log_risk < target:
        result = dynamics.step(w, ev, target)
        w, ev, evals = result.w, result.ev, evals + result.grad_evals
    return w, ev, evals, dynamics


def direction_gap(a, b):
    return float((a / a.norm() - b / b.norm()).norm())


# Measured gaps at the default rtol 1e-6: 1.0e-6 (deep linear), 4.4e-6 (squared ReLU, in the
# transient where the activation pattern still changes thousands of times per unit of s).
@pytest.mark.slow
@pytest.mark.parametrize("case, target, tol", [("deep-linear", 30.0, 5e-6), ("squared-relu-200", 6.0, 2e-5)])
def test_direction_matches_tight_dopri5_at_matched_s(case, target, tol):
    problem, w0 = deep_linear() if case == "deep-linear" else squared_relu()
    w_ref, ev_ref, evals_ref, _ = run_to(problem, w0, target, integrator="dopri5", rtol=1e-9, atol=1e-12)
    w, ev, evals, _ = run_to(problem, w0, target)  # the default: cvode, rtol 1e-6
    s, s_ref = (math.log(problem.n) - e.log_risk for e in (ev, ev_ref))
    assert s == pytest.approx(target, rel=1e-6) and s_ref == pytest.approx(target, rel=1e-8)
    assert direction_gap(w, w_ref) < tol
    k = problem.degree
    margins, margins_ref = ev.margins / w.norm() ** k, ev_ref.margins / w_ref.norm() ** k
    assert float((margins - margins_ref).abs().max()) < tol
    cos = float(torch.dot(w, -ev.grad) / (w.norm() * ev.grad.norm()))
    cos_ref = float(torch.dot(w_ref, -ev_ref.grad) / (w_ref.norm() * ev_ref.grad.norm()))
    assert abs(cos - cos_ref) < 10 * tol
    assert evals < evals_ref  # stiff already at s <= 30: fewer evaluations than the explicit pair
    # Tighter tolerance, closer agreement: the gap is the integrator's, not a bias.
    w_tight, _, _, _ = run_to(problem, w0, target, rtol=1e-8)
    assert direction_gap(w_tight, w_ref) < 0.2 * max(direction_gap(w, w_ref), 1e-9)


def test_jacobian_vector_product_matches_finite_differences_and_jacfwd():
    problem, w0 = squared_relu(width=12)
    w = (4.0 * w0).detach()  # a separating-ish point, risk well below l(0)
    system = SClockSystem(problem)
    y = w.numpy().copy()
    f = torch.empty_like(w)
    system.rhs(0.0, y, f.numpy())
    g = problem.evaluate(w).grad
    assert torch.allclose(f, -g / torch.dot(g, g), rtol=1e-13, atol=0)
    system.jac_setup(0.0, y, f.numpy())
    assert system.graph_evals == 0  # the right-hand side's graph at the same point is reused
    v = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    jv = torch.empty_like(w)
    system.jac_times(0.0, y, f.numpy(), v.numpy(), jv.numpy())

    def rhs(point):
        out = torch.empty_like(point)
        SClockSystem(problem).rhs(0.0, point.numpy().copy(), out.numpy())
        return out

    h = 1e-5 * float(w.norm() / v.norm())
    fd = (rhs(w + h * v) - rhs(w - h * v)) / (2 * h)
    assert float((jv - fd).norm()) < 1e-6 * float(fd.norm())

    def f_torch(point):
        grad = torch.func.grad(problem.log_risk_fn)(point)
        return -grad / torch.dot(grad, grad)

    exact = torch.func.jacfwd(f_torch)(w) @ v
    assert float((jv - exact).norm()) < 1e-10 * float(exact.norm())
    assert system.grad_evals == 1 + 2 * 1  # one right-hand side, one Hessian-vector product (2)


def test_segment_grid_is_a_fixed_power_of_two_grid():
    for s0 in [-0.7, 0.39, 1.0, 3.999, 4.0, 17.3, 250.0, 1023.9999, 5e4]:
        end = segment_end(s0, None, 4.0)
        spacing = 2.0 ** math.floor(math.log2(4.0 * max(abs(s0), 1.0)))
        assert end > s0 + 0.25 * spacing - 1e-12 and end <= s0 + 1.25 * spacing + 1e-12
        assert (end / spacing) == pytest.approx(round(end / spacing), abs=1e-9)
        assert segment_end(s0, None, 4.0) == end  # a pure function of s0: resume-safe
    assert segment_end(700.0, 1000.0, 4.0) == 1000.0  # lands on the target
    assert segment_end(999.9999, 1000.0, 4.0) == 1000.0
    assert segment_end(1000.0, 1000.0, 4.0) > 1000.0  # always progress


def test_resume_mid_segment_replays_bit_identically():
    problem, w0 = deep_linear()
    config = dataclasses.replace(TrainConfig(), target_ln_n_over_L=60.0)
    dynamics = make_dynamics(problem, config)
    w, ev = w0, problem.evaluate(w0)
    for _ in range(9):
        result = dynamics.step(w, ev, 60.0)
        w, ev = result.w, result.ev
    assert len(dynamics.segment["times"]) > 1 and not dynamics.segment["done"]  # mid-segment
    buffer = io.BytesIO()
    torch.save(dynamics.state_dict(), buffer)
    saved_w, saved_ev = w.clone(), copy.deepcopy(ev)
    w_ref, _, evals_ref, _ = run_to(problem, w, 60.0, dynamics=dynamics, ev=ev)

    resumed = make_dynamics(problem, config)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    w_res, _, evals_res, _ = run_to(problem, saved_w, 60.0, dynamics=resumed, ev=saved_ev)
    assert resumed.replayed_grad_evals > 0  # the segment was replayed, not restarted
    assert torch.equal(w_res, w_ref) and evals_res == evals_ref

    # Resumed from a point that differs by rounding (another process count sums gradients in
    # another order): the replayed solver goes on.  By more: a fresh solve to the same end.
    for nudge, same in ((1e-13, True), (1e-7, False)):
        other = make_dynamics(problem, config)
        buffer.seek(0)
        other.load_state_dict(torch.load(buffer, weights_only=False))
        nudged = saved_w * (1 + nudge)
        w_other, ev_other, _, _ = run_to(problem, nudged, 60.0, dynamics=other, ev=problem.evaluate(nudged))
        assert math.log(problem.n) - ev_other.log_risk >= 60.0
        if same:
            assert torch.equal(w_other, w_ref)
        else:
            assert 0 < direction_gap(w_other, w_ref) < 1e-5


def test_chunked_problem_uses_exact_hvp_and_agrees():
    """Chunks combine Hessian-vector products exactly (Problem.curvature), so a chunked
    problem switches to exact J*v like a whole one and follows it to rounding (measured gap
    8e-8: last-bit differences move the Newton iterates; with difference quotients it was 1e-5)."""
    problem, w0 = deep_linear(chunk_size=16)
    dynamics = make_dynamics(problem, TrainConfig())
    assert isinstance(dynamics, CvodeFlow) and dynamics.jacobian == "auto"
    w_chunked, _, _, _ = run_to(problem, w0, 100.0, dynamics=dynamics)
    assert dynamics.system.hvp_evals > 0  # past k s rtol = DQ_LIMIT the default switches to exact J*v
    whole, w0_whole = deep_linear()
    w_whole, _, _, exact = run_to(whole, w0_whole, 100.0)
    assert exact.system.hvp_evals > 0
    assert direction_gap(w_chunked, w_whole) < 1e-6


def test_float32_problem_follows_the_float64_flow():
    problem, w0 = deep_linear()
    w64, _, _, _ = run_to(problem, w0, 20.0)
    X, y = separable_gaussian(60, 6, 0.1, 0, dtype=torch.float32)
    model = DeepLinear(6, (8, 8), 1.0, generator=torch.Generator().manual_seed(1))
    p32 = Problem(model, X, y, "logistic", degree=3)
    w32, ev32, _, _ = run_to(p32, p32.flat_params(), 20.0, rtol=1e-5)
    assert w32.dtype == torch.float32 and math.isfinite(ev32.log_risk)
    assert direction_gap(w32.double(), w64) < 1e-4


@pytest.mark.parametrize("key, value", [("cvode_jacobian", "exact"), ("cvode_segment", 0.0), ("cvode_krylov_dim", 0), ("rtol", 0.0)])
def test_bad_settings_are_user_errors(key, value):
    problem, _ = deep_linear()
    with pytest.raises(UserError, match=key.split("_")[-1] if key != "rtol" else "rtol"):
        make_dynamics(problem, dataclasses.replace(TrainConfig(), **{key: value}))


def test_default_flow_is_cvode_and_summary_says_so(tmp_path):
    from diralign.runner import start_run

    summary, _, _ = start_run("deep-linear", ["target_ln_n_over_L=20"], tmp_path / "cv", quiet=True)
    assert summary["dynamics"] == "flow/cvode" and summary["faithful_to_flow"] is True
    reference, _, _ = start_run("deep-linear", ["target_ln_n_over_L=20", "integrator=dopri5", "rtol=1e-9"], tmp_path / "dp", quiet=True)
    assert reference["dynamics"] == "flow/dopri5"
    assert summary["alignment_cos"] == pytest.approx(reference["alignment_cos"], abs=1e-6)
    assert summary["grad_evals"] < reference["grad_evals"]
