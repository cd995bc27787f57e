"""diralign.models.counterexample: the Mexican-hat flow that never converges in direction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diralign.models.counterexample import (
    MexicanHatMargin,
    hat_margin,
    planar_gradient,
    planar_reference,
    sphere_gradient,
    spiral_flow,
)
from diralign.models.homogeneity import homogeneity_degree


def test_mexican_hat_is_homogeneous_and_matches_the_planar_gradient():
    model = MexicanHatMargin(degree=2)
    report = homogeneity_degree(model, torch.ones(1, 1, dtype=torch.float64))
    assert report.homogeneous and report.degree == 2
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = rng.uniform(-0.7, 0.7, 2)
        r2 = p @ p
        u = np.concatenate([2 * p, [1 - r2]]) / (1 + r2)  # inverse stereographic projection
        grad, q = sphere_gradient(u)
        ga, gb, f = planar_gradient(*p)
        assert 1 - q == pytest.approx(f, abs=1e-14)
        # the sphere's tangential gradient is minus the planar one pushed forward by the metric
        eps = 1e-6
        inv = lambda v: np.concatenate([2 * v, [1 - v @ v]]) / (1 + v @ v)  # noqa: E731
        J = np.stack([(inv(p + eps * e) - inv(p - eps * e)) / (2 * eps) for e in np.eye(2)], 1)
        pushed = J @ (-((1 + r2) ** 2) / 4 * np.array([ga, gb]))
        tangent = grad - (grad @ u) * u
        np.testing.assert_allclose(tangent, pushed, atol=1e-8)
    assert float(hat_margin(torch.tensor([0.6, 0.0, -0.8], dtype=torch.float64))) == pytest.approx(1.0)  # flat below the equator


def test_spiral_flow_keeps_winding_and_matches_the_planar_reference():
    flow = spiral_flow(1e4, points_per_decade=20)
    sigma, zeta = flow.sigma, flow.path_length

    def grow(a, b):
        return float(np.interp(math.log(b), np.log(sigma[1:]), zeta[1:]) - np.interp(math.log(a), np.log(sigma[1:]), zeta[1:]))

    assert grow(1e3, 1e4) >= grow(1e2, 1e3) > 0.5  # no plateau: about a radian per decade, and growing
    assert np.all(np.diff(flow.normalized_margin) >= -1e-8)  # alpha~ = q(theta~) nondecreasing
    assert flow.tan_alignment[-1] < 0.2 * flow.tan_alignment[np.searchsorted(sigma, 1e3)]  # aligns anyway
    early = sigma <= 5.0
    np.testing.assert_allclose(planar_reference(sigma[early]), flow.direction[early], atol=1e-6)
