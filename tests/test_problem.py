"""diralign.problem: the flat-vector oracle against finite differences, chunked exactly."""

import pytest
import torch

from diralign.data import separable_gaussian
from diralign.models import DeepLinear
from diralign.problem import Problem


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
