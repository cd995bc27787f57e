"""A smooth homogeneous margin whose gradient flow never converges in direction.

    python -c "from diralign.models.counterexample import spiral_flow; r = spiral_flow(1e6); print(r.path_length[-1])"

Theorem 3.1 needs definability (Assumption 2.1): Lyu & Li (2020), *Gradient descent
maximizes the margin of homogeneous neural networks*, ICLR, Appendix J ("Appendix I" in
some versions), show that without it the normalised flow ``W/||W||`` can fail to converge,
with a homogeneous "Mexican hat" margin function.  Stored copies of that appendix lose
its formulas, so this module builds one that provably spirals from the planar Mexican hat
of Absil, Mahony & Andrews (2005), *Convergence of the iterates of descent methods for
analytic cost functions*, SIAM J. Optim. 16(2), whose gradient trajectories have infinite
length:

    f(r, phi) = exp(-1/(1-r^2)) [1 - 4r^4/(4r^4 + (1-r^2)^4) sin(phi - 1/(1-r^2))]  (r < 1),
    f = 0 for r >= 1.

For ``theta in R^3`` let ``Pi(theta) = (x, y)/(||theta|| + z)`` (stereographic projection of
``theta/||theta||`` from the south pole) and ``q(theta) = ||theta||^k (1 - f(Pi(theta)))``.
``f`` is flat where ``|Pi| >= 1`` (the closed lower hemisphere), so ``q`` is C^inf away from
0 and k-homogeneous, but not definable (``sin`` of an unbounded argument).  Train one
example with margin ``q`` (exp loss): the direction follows the spherical gradient ascent
of ``q`` restricted to the sphere in the clock ``d sigma = e^{-q} ||theta||^{k-2} dt``;
projection is conformal, so this is the planar Mexican-hat descent up to a time change,
and the direction winds round the equator forever: about ``ln 10 / (1 + 4/phi)`` radians
per decade of ``sigma``.  Because ``ln ||theta|| ~ k sigma``, that is ``ln(n/L) ~ e^{k^2 sigma}``,
so the flow is integrated in the clock ``tau = ln sigma`` (scipy ``solve_ivp``, LSODA:
the valley narrows like ``1/phi^2``, so the flow is stiff).

Because ``q`` is C^2, Theorem 4.1's second statement still gives alignment: the angle
between ``theta`` and ``grad q`` tends to 0 (``tan = |d theta~/d sigma| / (k q)``) while the
path length diverges -- alignment without directional convergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

START_RADIUS = 0.8  # theta~_0 = (0.8 cos(4/3), 0.8 sin(4/3), 0.6): Pi(theta~_0) has r = 1/2, phi = 4/3
START_ANGLE = 4.0 / 3.0


def start_direction() -> np.ndarray:
    return np.array([START_RADIUS * math.cos(START_ANGLE), START_RADIUS * math.sin(START_ANGLE), 0.6])


def mexican_hat(p: torch.Tensor) -> torch.Tensor:
    """Absil et al.'s ``f`` on planar points ``p [..., 2]`` (Cartesian, smooth at 0).

    ``r sin(phi - u) = b cos u - a sin u`` avoids ``atan2``; every branch is computed on a
    clamped copy so the unused one never feeds ``inf`` or ``nan`` into gradients.  (At
    ``p = 0`` the term ``r^3 (b cos u - a sin u)`` is only C^3; the flow never goes there.)
    """
    a, b = p[..., 0], p[..., 1]
    r2 = a * a + b * b
    inside = r2 < 1.0
    r2_in = torch.where(inside, r2, torch.zeros_like(r2))
    one_minus = 1.0 - r2_in
    u = 1.0 / one_minus
    r_sin = b * torch.cos(u) - a * torch.sin(u)  # r sin(phi - u)
    r = r2_in.clamp(min=torch.finfo(p.dtype).tiny).sqrt()
    # 4r^4/(4r^4 + (1-r^2)^4) sin(phi - u) = 4 r^3 (r sin(phi - u)) / (...)
    value = torch.exp(-u) * (1.0 - 4.0 * r2_in * r * r_sin / (4.0 * r2_in * r2_in + one_minus**4))
    return torch.where(inside, value, torch.zeros_like(value))


def stereographic(u: torch.Tensor) -> torch.Tensor:
    """``Pi(theta) = (x, y)/(||theta|| + z)``; the south pole (where ``f`` is 0 anyway) is guarded."""
    norm = u.norm(dim=-1)
    denominator = (norm + u[..., 2]).clamp(min=torch.finfo(u.dtype).tiny ** 0.5 * norm.clamp(min=1.0))
    return u[..., :2] / denominator[..., None]


def hat_margin(theta: torch.Tensor, degree: int = 2) -> torch.Tensor:
    """``q(theta) = ||theta||^k (1 - f(Pi(theta)))`` for ``theta [..., 3]``."""
    norm = theta.norm(dim=-1)
    return norm**degree * (1.0 - mexican_hat(stereographic(theta)))


class MexicanHatMargin(nn.Module):
    """One-example "network": ``Phi(x; theta) = x_0 q(theta)``, k-homogeneous in ``theta``.

    With ``X = [[1.0]]`` and ``y = [+1]`` the margin is ``q(theta)``; this lets the project's
    :class:`~diralign.problem.Problem`, homogeneity check and dynamics run it.
    """

    def __init__(self, degree: int = 2, start=None):
        super().__init__()
        theta = torch.as_tensor(start_direction() if start is None else start, dtype=torch.float64)
        self.theta = nn.Parameter(theta.clone())
        self.homogeneity_degree = int(degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] * hat_margin(self.theta, self.homogeneity_degree)


def sphere_gradient(u: np.ndarray, degree: int = 2) -> tuple[np.ndarray, float]:
    """``(grad q(u), q(u))`` at a unit vector ``u`` (torch autograd, float64)."""
    t = torch.tensor(u, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        value = hat_margin(t, degree)
        (grad,) = torch.autograd.grad(value, t)
    return grad.numpy(), float(value.detach())


@dataclass
class SpiralFlow:
    """The direction flow sampled on a log grid of the clock ``sigma``."""

    sigma: np.ndarray  # [T] clock values (sigma[0] = 0)
    direction: np.ndarray  # [T, 3] theta~ (unit vectors)
    path_length: np.ndarray  # [T] integral of |d theta~/d sigma| (arc length on the sphere)
    log_norm: np.ndarray  # [T] ln ||theta|| (from ||theta_0|| = 1)
    normalized_margin: np.ndarray  # [T] q(theta~) = alpha~ for the exp loss
    tan_alignment: np.ndarray  # [T] tan of the angle between theta and grad q
    degree: int
    rhs_evaluations: int

    def log_ln_n_over_L(self) -> np.ndarray:
        """``ln ln(n/L) = k ln||theta|| + ln q(theta~)`` (``ln(n/L)`` itself overflows)."""
        return self.degree * self.log_norm + np.log(self.normalized_margin)


def spiral_flow(
    sigma_end: float = 1e6,
    degree: int = 2,
    points_per_decade: int = 200,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    method: str = "LSODA",
) -> SpiralFlow:
    """Integrate the direction flow to ``sigma_end`` in ``sigma`` (to 1), then in ``tau = ln sigma``.

    State ``(theta~, ln||theta||, path length)``; ``d theta~/d sigma = P grad q(theta~)`` (P the
    projection off ``theta~``), ``d ln||theta|| / d sigma = k q(theta~)`` (Euler).  The radial
    drift of ``theta~`` that the integrator introduces is removed by the ``- (|u|^2 - 1) u``
    term (zero on the sphere) and by renormalising the output.  ``method`` is a stiff-capable
    scipy method: LSODA (default, ~15x fewer evaluations here) or Radau.
    """
    import scipy.integrate

    count = [0]

    def velocity(u):
        grad, value = sphere_gradient(u / np.linalg.norm(u), degree)
        count[0] += 1
        unit = u / np.linalg.norm(u)
        tangent = grad - (grad @ unit) * unit
        return tangent - (u @ u - 1.0) * u, value, float(np.linalg.norm(tangent))

    def rhs_sigma(_sigma, state):
        v, value, speed = velocity(state[:3])
        return np.concatenate([v, [degree * value, speed]])

    def rhs_tau(tau, state):
        return math.exp(tau) * rhs_sigma(None, state)

    state0 = np.concatenate([start_direction(), [0.0, 0.0]])
    grid_sigma = np.linspace(0.0, 1.0, 51)
    first = scipy.integrate.solve_ivp(
        rhs_sigma, (0.0, 1.0), state0, method=method, t_eval=grid_sigma, rtol=rtol, atol=atol
    )
    if not first.success:
        raise RuntimeError(f"counterexample flow failed on sigma in [0, 1]: {first.message}")
    decades = max(math.log10(sigma_end), 0.0)
    grid_tau = np.linspace(0.0, decades * math.log(10.0), max(int(points_per_decade * decades), 1) + 1)
    second = scipy.integrate.solve_ivp(
        rhs_tau, (0.0, grid_tau[-1]), first.y[:, -1], method=method, t_eval=grid_tau, rtol=rtol, atol=atol
    )
    if not second.success:
        raise RuntimeError(f"counterexample flow failed in tau = ln sigma: {second.message}")
    sigma = np.concatenate([grid_sigma, np.exp(grid_tau[1:])])
    states = np.concatenate([first.y, second.y[:, 1:]], axis=1).T
    direction = states[:, :3] / np.linalg.norm(states[:, :3], axis=1, keepdims=True)
    margins, tangents = [], []
    for u in direction:
        grad, value = sphere_gradient(u, degree)
        margins.append(value)
        tangents.append(np.linalg.norm(grad - (grad @ u) * u))
    margins = np.asarray(margins)
    return SpiralFlow(
        sigma=sigma,
        direction=direction,
        path_length=states[:, 4],
        log_norm=states[:, 3],
        normalized_margin=margins,
        tan_alignment=np.asarray(tangents) / (degree * margins),
        degree=degree,
        rhs_evaluations=count[0],
    )


# -- an independent reference: the planar Mexican-hat flow in closed form -------------------


def planar_gradient(a: float, b: float) -> tuple[float, float, float]:
    """``(df/da, df/db, f)`` by hand (polar derivatives), no autograd."""
    r2 = a * a + b * b
    if r2 >= 1.0:
        return 0.0, 0.0, 0.0
    r = math.sqrt(r2)
    phi = math.atan2(b, a)
    one_minus = 1.0 - r2
    u = 1.0 / one_minus
    denominator = 4.0 * r2 * r2 + one_minus**4
    A = 4.0 * r2 * r2 / denominator
    A_r = 16.0 * r**3 * one_minus**3 * (1.0 + r2) / denominator**2
    u_r = 2.0 * r * u * u
    s, c = math.sin(phi - u), math.cos(phi - u)
    e = math.exp(-u)
    f = e * (1.0 - A * s)
    f_r = e * (-u_r * (1.0 - A * s) - A_r * s + A * c * u_r)
    f_phi_over_r = -e * (4.0 * r**3 / denominator) * c  # (1/r) df/dphi, smooth at r = 0
    if r == 0.0:
        return 0.0, 0.0, f
    ca, sa = a / r, b / r
    return f_r * ca - f_phi_over_r * sa, f_r * sa + f_phi_over_r * ca, f


def planar_reference(sigma: np.ndarray, rtol: float = 1e-10, atol: float = 1e-12) -> np.ndarray:
    """The same flow computed in the plane: ``dp/d sigma = -((1 + r^2)^2 / 4) grad f(p)``.

    The sphere's metric pulled back by inverse stereographic projection is
    ``4 / (1 + r^2)^2 |dp|^2``, so spherical gradient ascent of ``1 - f o Pi`` is this
    planar ODE; mapping ``p`` back with ``u = (2p, 1 - r^2) / (1 + r^2)`` must reproduce the
    3-D integration.  Returns directions ``[T, 3]`` at the given ``sigma`` (``sigma[0] = 0``).
    """
    import scipy.integrate

    def rhs(_sigma, p):
        ga, gb, _ = planar_gradient(p[0], p[1])
        factor = (1.0 + p[0] ** 2 + p[1] ** 2) ** 2 / 4.0
        return np.array([-factor * ga, -factor * gb])

    p0 = 0.5 * np.array([math.cos(START_ANGLE), math.sin(START_ANGLE)])
    head = sigma[sigma <= 1.0]
    tail = sigma[sigma > 1.0]
    first = scipy.integrate.solve_ivp(rhs, (0.0, 1.0), p0, method="Radau", t_eval=head, rtol=rtol, atol=atol)
    points = [first.y.T]
    if len(tail):
        end = scipy.integrate.solve_ivp(rhs, (0.0, 1.0), p0, method="Radau", rtol=rtol, atol=atol).y[:, -1]
        second = scipy.integrate.solve_ivp(
            lambda tau, p: math.exp(tau) * rhs(None, p),
            (0.0, math.log(tail[-1])),
            end,
            method="Radau",
            t_eval=np.log(tail),
            rtol=rtol,
            atol=atol,
        )
        points.append(second.y.T)
    p = np.concatenate(points)
    r2 = (p**2).sum(axis=1, keepdims=True)
    return np.concatenate([2.0 * p, 1.0 - r2], axis=1) / (1.0 + r2)
