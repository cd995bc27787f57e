"""Neural-tangent linearisation, general and for the Fig. 1a squared-ReLU network.

    python -c "import torch; from diralign.models import SquaredReLUNet, ntk_linearize; net = SquaredReLUNet(3, 8).double(); lin = ntk_linearize(net); x = torch.ones(2, 3, dtype=torch.float64); print(lin(x) - net(x))"

* :func:`ntk_linearize` -- any model ``f(x; theta)`` becomes
  ``f_lin(x; theta) = f(x; theta0) + J(x; theta0) (theta - theta0)`` (one ``torch.func.jvp``
  around ``theta0``); ``theta`` are the new module's trainable parameters, starting at
  ``theta0``.  It is affine in ``theta``, not homogeneous (the offset ``f(x; theta0)``).
* :class:`SquaredReLUNTK` -- the paper's Fig. 1a predictor
  ``x -> sum_j s_j <v_j, x> relu(<w_j, x>)`` with ``w`` frozen at initialisation and only
  ``v`` trained: a linear model in the features ``phi_j(x) = s_j relu(<w_j, x>) x``.  For the
  squared-ReLU network, ``f_lin(x; V) = 2 ntk(x; v=V, w=W0) - f(x; W0)``.
  Its degree is 1 in ``v`` alone and 2 in ``(v, w)`` jointly (``joint=True`` makes ``w``
  trainable so that :func:`~diralign.models.homogeneity_degree` scales both).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, jvp


def _mangle(name: str) -> str:
    return name.replace(".", "__")


class LinearizedModel(nn.Module):
    """``f_lin(x; theta) = f(x; theta0) + J(x; theta0)(theta - theta0)``, built on torch.func."""

    def __init__(self, model: nn.Module):
        super().__init__()
        base = copy.deepcopy(model)
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        for p in base.parameters():
            p.requires_grad_(False)  # the base is a frozen evaluation point, not trained
        self.base = base
        self.theta = nn.ParameterDict(
            {_mangle(name): nn.Parameter(p.detach().clone()) for name, p in model.named_parameters() if p.requires_grad}
        )
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.register_buffer("theta0__" + _mangle(name), p.detach().clone())

    def theta0(self) -> dict:
        return {name: getattr(self, "theta0__" + _mangle(name)) for name in self.names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta0 = self.theta0()
        delta = {name: self.theta[_mangle(name)] - theta0[name] for name in self.names}

        def f(params):
            return functional_call(self.base, params, (x,), strict=False)

        out0, tangent = jvp(f, (theta0,), (delta,))
        return out0 + tangent


def ntk_linearize(model: nn.Module) -> LinearizedModel:
    """The first-order Taylor model of ``model`` around its current trainable parameters."""
    return LinearizedModel(model)


class SquaredReLUNTK(nn.Module):
    """Fig. 1a: ``x -> sum_j s_j <v_j, x> relu(<w_j, x>)``; ``w`` frozen unless ``joint``."""

    def __init__(self, weight0: torch.Tensor, signs: torch.Tensor, v0: torch.Tensor | None = None, joint: bool = False):
        super().__init__()
        self.register_buffer("signs", signs.detach().clone())
        self.weight = nn.Parameter(weight0.detach().clone(), requires_grad=joint)
        self.v = nn.Parameter((weight0 if v0 is None else v0).detach().clone())

    @property
    def homogeneity_degree(self) -> int:
        # Linear in v; relu(<w, x>) adds one more degree when w is scaled too.
        return 2 if self.weight.requires_grad else 1

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``phi(x) [n, m*d]`` laid out like ``v.reshape(-1)``: ``f(x) = phi(x) @ v.reshape(-1)``."""
        active = torch.relu(x @ self.weight.T) * self.signs.to(x.dtype)  # [n, m]
        return (active[:, :, None] * x[:, None, :]).reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = torch.relu(x @ self.weight.T)
        return ((x @ self.v.T) * active) @ self.signs.to(x.dtype)


def squared_relu_ntk(net: nn.Module, joint: bool = False) -> SquaredReLUNTK:
    """The NTK predictor of a :class:`~diralign.models.SquaredReLUNet` at its current weights,
    with ``v`` starting at ``w`` (so it starts as the network itself)."""
    return SquaredReLUNTK(net.weight, net.signs, joint=joint)
