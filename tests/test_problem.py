"""diralign.problem: the flat-vector oracle against finite differences, chunked exactly; the
sgd hot path (issue 13): per-tensor autograd leaves, the minibatch fast path, deferred gradients
and the streaming log-space fold that bounds a chunked evaluation's memory."""

import math

import pytest
import torch
from torch import nn

from diralign.data import separable_gaussian
from diralign.models import DeepLinear
from diralign.problem import LogSpaceSum, Problem, combine_log_space


def _problem(loss="logistic", chunk_size=None):
    X, y = separable_gaussian(40, 4, 0.1, seed=3)
    model = DeepLinear(4, (5, 3), init_scale=1.0, generator=torch.Generator().manual_seed(1)).double()
    return Problem(model, X, y, loss, degree=3, chunk_size=chunk_size)


@pytest.mark.parametrize("loss", ["logistic", "exp"])
def test_oracle_gradient_matches_finite_differences(loss):
    problem = _problem(loss)
    w = problem.flat_params() * 3.0
    ev = problem.evaluate(w)
    direction = torch.randn(problem.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    h = 1e-6
    fd = (problem.evaluate(w + h * direction, need_grad=False).log_risk - problem.evaluate(w - h * direction, need_grad=False).log_risk) / (2 * h)
    assert float(ev.grad @ direction) == pytest.approx(fd, rel=1e-7)


def test_chunked_evaluation_is_exact():
    whole = _problem()
    chunked = _problem(chunk_size=7)
    w = whole.flat_params() * 10.0  # risk far below l(0)
    a, b = whole.evaluate(w), chunked.evaluate(w)
    assert a.log_risk == pytest.approx(b.log_risk, rel=1e-14)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.margins, b.margins)


# -- issue 13: the hot path ---------------------------------------------------------------------
class TwoHeads(nn.Module):
    """A net with a parameter the loss never touches (its gradient must come back as zeros)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6, bias=False)
        self.b = nn.Linear(6, 3, bias=False)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _multiclass_problem(chunk_size=None):
    torch.manual_seed(0)
    model = TwoHeads().double()
    X = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (30,))
    return Problem(model, X, y, "cross-entropy", degree=None, chunk_size=chunk_size)


def test_leaf_gradients_equal_the_flat_vector_gradient():
    problem = _multiclass_problem()
    w = problem.flat_params() * 3.0
    ev = problem.evaluate(w)
    w_req = w.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(problem.log_risk_fn(w_req), w_req)
    torch.testing.assert_close(ev.grad, reference, rtol=1e-13, atol=1e-15)
    (unused,) = [block for name, block in problem.blocks(ev.grad) if name == "unused"]
    assert torch.equal(unused, torch.zeros(2, dtype=torch.float64))


def test_minibatch_fast_path_equals_evaluate_subset():
    problem = _multiclass_problem(chunk_size=4)  # a batch of 11 in chunks of 4, 4 and 3
    w = problem.flat_params()
    index = torch.tensor([3, 29, 0, 17, 8, 8, 12, 25, 1, 2, 14])
    log_risk, grad = problem.minibatch(w, index)
    ev = problem.evaluate_subset(w, index)
    assert isinstance(log_risk, torch.Tensor) and float(log_risk) == ev.log_risk
    assert torch.equal(grad, ev.grad)


def test_chunked_evaluation_equals_whole_and_far_below_float64():
    problem, whole = _multiclass_problem(chunk_size=7), _multiclass_problem()
    w = problem.flat_params() * 40.0  # margins in the hundreds: L ~ e^-hundreds per example
    a, b = problem.evaluate(w), whole.evaluate(w)
    assert a.log_risk == pytest.approx(b.log_risk, rel=1e-13)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-11, atol=0)
    assert torch.equal(a.margins, b.margins) and a.correct == b.correct


def test_log_space_fold_is_exact_in_any_order_and_keeps_single_pieces_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    logs = torch.tensor([-1e5, -1e5 + 3.0, float("-inf"), -1e5 - 40.0], dtype=torch.float64)
    grads = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in logs]
    margins = [torch.randn(2, generator=gen, dtype=torch.float64) for _ in logs]
    total, grad, m = combine_log_space(list(zip(logs, grads, margins)))
    shifted = logs + 1e5  # exact; differences of numbers near -1e5 would lose 1e-11 to rounding
    expected = torch.logsumexp(shifted, 0)
    weights = torch.exp(shifted - expected)
    assert float(total) == pytest.approx(float(expected) - 1e5, rel=1e-15)
    torch.testing.assert_close(grad, sum(wt * g for wt, g in zip(weights, grads)), rtol=1e-14, atol=1e-16)
    assert torch.equal(m, torch.cat(margins))
    # reversed order: same values to rounding (the fold rescales whenever the maximum moves)
    total_r, grad_r, _ = combine_log_space(list(zip(logs, grads, margins))[::-1])
    assert float(total_r) == pytest.approx(float(total), rel=1e-15)
    torch.testing.assert_close(grad_r, grad, rtol=1e-14, atol=1e-16)
    one, first = LogSpaceSum(), logs[0]
    one.add(first, grads[0], margins[0])
    t1, g1, m1 = one.result()
    assert t1 is first and g1 is grads[0] and m1 is margins[0]
    # the first piece's gradient belongs to the caller: folding more must not change it
    before = grads[0].clone()
    combine_log_space([(logs[0], grads[0], margins[0]), (logs[1], grads[1], margins[1])])
    assert torch.equal(grads[0], before)
    assert math.isinf(float(combine_log_space([(logs[2], grads[2], margins[2])])[0]))


def test_deferred_gradient_equals_evaluate_in_one_chunk_and_in_several():
    for chunk in (None, 7):
        problem = _multiclass_problem(chunk_size=chunk)
        w = problem.flat_params() * 2.0
        ev = problem.evaluate(w)
        lazy, gradient = problem.evaluate_deferred(w)
        assert lazy.grad is None and lazy.log_risk == ev.log_risk and lazy.correct == ev.correct
        assert torch.equal(lazy.margins, ev.margins)
        assert torch.equal(gradient(), ev.grad)  # bit for bit: the same operations
