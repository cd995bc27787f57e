"""diralign.models.ntk: the NTK linearisation."""

from __future__ import annotations

import torch
from torch.func import functional_call

from diralign.data.planar import embed, planar_teacher
from diralign.models import (
    SquaredReLUNet,
    SquaredReLUNTK,
    homogeneity_degree,
    ntk_linearize,
    squared_relu_ntk,
)

F64 = torch.float64

EPS = torch.finfo(F64).eps


def _net(width=7, signs="random", seed=0):
    return SquaredReLUNet(3, width, signs=signs, generator=torch.Generator().manual_seed(seed))


def test_ntk_linearize_closed_form_and_affine():
    net = _net(width=11)
    x = embed(planar_teacher(20, seed=1)[0])
    lin = ntk_linearize(net)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == ["theta.weight"]
    f0 = net(x).detach()
    assert float((lin(x) - f0).abs().max()) < 1e-13 * float(f0.abs().max())  # f_lin(theta0) = f(theta0)
    gen = torch.Generator().manual_seed(5)
    d1, d2 = (torch.randn(net.weight.shape, dtype=F64, generator=gen) for _ in range(2))
    theta0 = net.weight.detach()

    def f_lin(theta):
        return functional_call(lin, {"theta.weight": theta}, (x,)).detach()

    # Affine: f_lin(theta0 + a d1 + b d2) = f_lin(theta0) + a (f_lin(theta0 + d1) - f_lin(theta0)) + b (...).
    a, b = 2.7, -1.3
    lhs = f_lin(theta0 + a * d1 + b * d2)
    rhs = f0 + a * (f_lin(theta0 + d1) - f0) + b * (f_lin(theta0 + d2) - f0)
    assert float((lhs - rhs).abs().max()) < 1e-12 * float(lhs.abs().max())
    # Closed form on this model: f_lin(x; V) = 2 sum_j s_j <V_j, x> relu(<w0_j, x>) - f(x; w0).
    V = theta0 + d1
    ntk = SquaredReLUNTK(theta0, net.signs, v0=V)
    closed = 2.0 * ntk(x).detach() - f0
    assert float((f_lin(V) - closed).abs().max()) < 1e-12 * float(closed.abs().max())
    # The first-order Taylor model: (f(theta0 + h d) - f(theta0)) / h -> J d.
    h = 1e-7
    with torch.no_grad():
        moved = functional_call(net, {"weight": theta0 + h * d1, "signs": net.signs}, (x,))
    fd = (moved - f0) / h
    assert float((fd - (f_lin(theta0 + d1) - f0)).abs().max()) < 1e-5 * float(fd.abs().max())


def test_ntk_model_features_and_degrees():
    net = _net(width=13)
    x = embed(planar_teacher(25, seed=2)[0])
    ntk = squared_relu_ntk(net)
    assert float((ntk(x) - net(x)).abs().max()) < 1e-13 * float(net(x).abs().max())  # v0 = w0: starts as the net
    F = ntk.features(x)
    assert F.shape == (25, 13 * 3)
    assert float((F @ ntk.v.reshape(-1) - ntk(x)).abs().max()) < 1e-13 * float(ntk(x).abs().max())
    v_only = homogeneity_degree(ntk, x)
    joint = homogeneity_degree(squared_relu_ntk(net, joint=True), x)
    assert v_only.degree == 1 and abs(v_only.fitted_degree - 1.0) < 1e-12
    assert joint.degree == 2 and abs(joint.fitted_degree - 2.0) < 1e-12 and joint.violation < 1e3 * EPS
