"""diralign.models.squared_relu: the Figure 1 network and its hand-written derivatives."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call, grad, jvp

from diralign.data.planar import embed, planar_teacher
from diralign.models import (
    SquaredReLUNet,
    build_model,
    homogeneity_degree,
)

F64 = torch.float64

EPS = torch.finfo(F64).eps


def _net(width=7, signs="random", seed=0):
    return SquaredReLUNet(3, width, signs=signs, generator=torch.Generator().manual_seed(seed))


def test_forward_matches_a_numpy_loop_and_signs():
    net = _net()
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    W, s = net.weight.detach().numpy(), net.signs.numpy()
    ref = [sum(s[j] * max(0.0, float(W[j] @ xi)) ** 2 for j in range(len(s))) for xi in x.numpy()]
    np.testing.assert_allclose(net(x).detach().numpy(), ref, rtol=1e-13, atol=1e-15)
    assert set(np.unique(s).tolist()) <= {-1.0, 1.0}
    assert list(build_model("srelu", in_features=3, width=4).signs) == [-1.0, 1.0, -1.0, 1.0]  # (-1)^j, j = 1..m
    assert isinstance(build_model("squared-relu", in_features=3, width=4), SquaredReLUNet)
    assert not any(name == "signs" for name, _ in net.named_parameters())  # signs are not trained


def test_network_is_two_homogeneous():
    net = _net(width=50)
    x = embed(planar_teacher(30, seed=0)[0])
    report = homogeneity_degree(net, x)
    assert report.degree == 2 and abs(report.fitted_degree - 2.0) < 1e-12 and report.violation < 1e3 * EPS


def _plain(x, w, s):
    return torch.relu(x @ w.T).square() @ s


def test_hand_written_derivatives_match_finite_differences_and_plain_autograd():
    """Gradient (in w and x), double backward, jvp-of-grad and jvp of the custom backward."""
    net = _net(width=9)
    w0 = net.weight.detach()
    s = net.signs
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    c = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(3))
    v = torch.randn_like(w0)

    def risk(w):  # a smooth scalar of the outputs
        return torch.logsumexp(-c * functional_call(net, {"weight": w, "signs": s}, (x,)), 0)

    g = grad(risk)(w0)
    h = 1e-6
    fd = (risk(w0 + h * v) - risk(w0 - h * v)) / (2 * h)
    assert abs(float((g * v).sum()) - float(fd)) < 1e-8 * max(1.0, abs(float(fd)))
    hvp = jvp(grad(risk), (w0,), (v,))[1]
    fd_hvp = (grad(risk)(w0 + h * v) - grad(risk)(w0 - h * v)) / (2 * h)
    assert float((hvp - fd_hvp).abs().max()) < 1e-6 * float(fd_hvp.abs().max())
    wr = w0.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(risk(wr), wr, create_graph=True)
    (hvp2,) = torch.autograd.grad((g2 * v).sum(), wr)
    assert float((hvp2 - hvp).abs().max()) < 1e-12 * float(hvp.abs().max())
    # Against plain autograd on the plain formula, including the input gradient.
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(net(xr).sum(), xr)
    xr2 = x.clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(_plain(xr2, w0, s).sum(), xr2)
    assert float((gx - gx_ref).abs().max()) < 1e-13 * float(gx_ref.abs().max())
    tangent = jvp(lambda w: functional_call(net, {"weight": w, "signs": s}, (x,)), (w0,), (v,))[1]
    tangent_ref = jvp(lambda w: _plain(x, w, s), (w0,), (v,))[1]
    assert float((tangent - tangent_ref).abs().max()) < 1e-13 * float(tangent_ref.abs().max())
