"""Log-space losses against mpmath at 50 digits, and their gradients everywhere."""

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diralign import losses

mp.mp.dps = 50

MARGIN = st.floats(min_value=-1e4, max_value=1e6, allow_nan=False, allow_infinity=False)


def exact_log_loss(z: float, loss: str):
    z = mp.mpf(z)
    return -z if loss == "exp" else mp.log(mp.log1p(mp.exp(-z)))


def exact_log_risk(zs, counts, loss):
    return mp.log(mp.fsum(c * mp.exp(exact_log_loss(z, loss)) for z, c in zip(zs, counts)))


def ulps(got: float, exact, dtype=np.float64) -> float:
    """Error in units of the last place of max(|exact|, 1).

    Relative ulps for |log L| >= 1; near log L = 0 (where ``log`` of a sum of n terms
    cancels against ``ln n``) the absolute error of one rounding of an O(1) quantity.
    """
    scale = max(abs(float(exact)), 1.0)
    return float(abs(mp.mpf(float(got)) - exact)) / float(np.spacing(dtype(scale)))


@settings(max_examples=150, deadline=None)
@given(
    zs=st.lists(MARGIN, min_size=1, max_size=4),
    counts=st.lists(st.integers(min_value=1, max_value=250_000), min_size=4, max_size=4),
    loss=st.sampled_from(["logistic", "exp"]),
)
def test_log_risk_matches_mpmath_to_4_ulp(zs, counts, loss):
    counts = counts[: len(zs)]
    margins = torch.repeat_interleave(torch.tensor(zs, dtype=torch.float64), torch.tensor(counts))
    got = losses.log_risk(margins, loss)
    assert torch.isfinite(got)
    assert ulps(got.item(), exact_log_risk(zs, counts, loss)) <= 4


@settings(max_examples=300, deadline=None)
@given(z=MARGIN, loss=st.sampled_from(["logistic", "exp"]))
def test_single_log_loss_is_exact_in_float64_and_float32(z, loss):
    exact = exact_log_loss(z, loss)
    got64 = losses.binary_log_losses(torch.tensor([z], dtype=torch.float64), loss).item()
    # Pure relative ulps here: each log l(z) is computed to a few ulps even at its root.
    spacing = float(np.spacing(abs(float(exact)))) if exact != 0 else 5e-324
    assert float(abs(mp.mpf(got64) - exact)) <= 4 * spacing
    z32 = float(np.float32(z))
    exact32 = exact_log_loss(z32, loss)
    got32 = losses.binary_log_losses(torch.tensor([z32], dtype=torch.float32), loss).item()
    spacing32 = float(np.spacing(np.float32(abs(float(exact32))))) if exact32 != 0 else 1e-45
    assert float(abs(mp.mpf(got32) - exact32)) <= 4 * spacing32


@pytest.mark.parametrize("z", [-0.5413248546129181, -0.54132485, -0.5413248546129182, -2.0, 0.0, 1e-300, 745.2, 1e6])
def test_log_logistic_loss_hard_points(z):
    got = losses.log_logistic_loss(torch.tensor([z], dtype=torch.float64)).item()
    exact = exact_log_loss(z, "logistic")
    spacing = float(np.spacing(abs(float(exact)))) if exact != 0 else 5e-324
    assert float(abs(mp.mpf(got) - exact)) <= 4 * spacing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss", ["logistic", "exp"])
def test_underflowing_risk_is_exact_with_finite_gradient(dtype, loss):
    n = 1000
    margins = torch.full((n,), 1e5, dtype=dtype, requires_grad=True)
    value = losses.log_risk(margins, loss)
    assert value.item() == pytest.approx(math.log(n) - 1e5, rel=4 * torch.finfo(dtype).eps)
    (grad,) = torch.autograd.grad(value, margins)
    assert torch.isfinite(grad).all()
    # d log L / d p_i = l'(p_i)/L -> -1/n for equal margins (exactly -1/n for exp).
    torch.testing.assert_close(grad, torch.full_like(grad, -1.0 / n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_everywhere(dtype):
    z = torch.cat(
        [
            torch.linspace(-1e4, 1e6, 2001, dtype=dtype),
            torch.tensor([0.0, -2.0, -0.5413248546, 745.0, 746.0, 88.0, 104.0, 1e-30, -1e-30], dtype=dtype),
        ]
    ).requires_grad_(True)
    (grad,) = torch.autograd.grad(losses.log_logistic_loss(z).sum(), z)
    assert torch.isfinite(grad).all()
    # Closed form: d/dz log l(z) = -sigmoid(-z) / softplus(-z), in float64 where it is safe.
    zz = z.detach().double()
    safe = zz.abs() < 30
    expected = -torch.sigmoid(-zz[safe]) / torch.nn.functional.softplus(-zz[safe])
    torch.testing.assert_close(grad.double()[safe], expected, rtol=10 * torch.finfo(dtype).eps, atol=0)
    # For large z the derivative tends to -1, and to 0 for very negative z.
    assert torch.allclose(grad[zz > 50].double(), torch.tensor(-1.0, dtype=torch.float64))


def test_second_derivative_finite_and_matches_finite_difference():
    z = torch.tensor([-30.0, -2.5, -1.0, -0.54, 0.3, 2.0, 40.0, 800.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(losses.log_logistic_loss(z).sum(), z, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), z)
    assert torch.isfinite(h).all()
    eps = 1e-6
    zd = z.detach()

    def d1(x):
        x = x.clone().requires_grad_(True)
        return torch.autograd.grad(losses.log_logistic_loss(x).sum(), x)[0]

    fd = (d1(zd + eps) - d1(zd - eps)) / (2 * eps)
    torch.testing.assert_close(h, fd, rtol=1e-6, atol=1e-9)


def test_cross_entropy_matches_torch_where_torch_is_accurate():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 7, (50,), generator=gen)
    ours = losses.cross_entropy_log_risk(logits, labels)
    ref = torch.log(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    torch.testing.assert_close(ours, ref, rtol=1e-13, atol=0)
    margins = losses.multiclass_margins(logits, labels)
    true = logits[torch.arange(50), labels]
    others = logits.clone()
    others[torch.arange(50), labels] = -math.inf
    torch.testing.assert_close(margins, true - others.max(1).values)


def test_cross_entropy_far_below_float64():
    # Logit gaps of 1e5: every per-example loss underflows, the log risk does not.
    logits = torch.zeros(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0])
    logits[torch.arange(4), labels] = 1e5
    logits.requires_grad_(True)
    value = losses.cross_entropy_log_risk(logits, labels)
    # each example: log(log1p(2 e^{-1e5})) = ln 2 - 1e5 (to far below an ulp)
    assert value.item() == pytest.approx(math.log(4) + math.log(2) - 1e5, rel=1e-15)
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("log_L", [-1e5, -800.0, -50.0, -20.0, -5.0, 0.0, 3.0, 6.0])
def test_smoothed_margin_against_mpmath(log_L):
    L = mp.exp(mp.mpf(log_L))
    exact_log = -mp.log(mp.expm1(L))
    got = losses.smoothed_margin(log_L, "logistic")
    assert math.isfinite(got)
    assert abs(mp.mpf(got) - exact_log) <= 4 * np.spacing(max(abs(float(exact_log)), 1.0))
    assert losses.smoothed_margin(log_L, "exp") == -log_L
    slope_exact = L * mp.exp(L) / mp.expm1(L)
    assert abs(losses.smoothed_margin_slope(log_L, "logistic") - float(slope_exact)) <= 1e-14 * float(slope_exact)


def test_unknown_loss_is_user_error():
    from diralign.errors import UserError

    with pytest.raises(UserError, match="unknown loss"):
        losses.canonical_loss("hinge")
