"""Two-layer squared-ReLU networks with fixed output signs (paper Fig. 1 and eq. 4.5).

    python -c "import torch; from diralign.models import SquaredReLUNet; print(SquaredReLUNet(3, 8)(torch.ones(2, 3, dtype=torch.float32)))"

``x -> sum_j s_j max(0, <w_j, x>)^2``: only the rows ``w_j`` are trained; the signs
``s_j`` are a buffer (part of the architecture, never scaled by the homogeneity check).
Scaling every ``w_j`` by ``c`` scales the output by ``c^2``: 2-homogeneous, and the
margins have locally Lipschitz gradients, so Theorems 3.1 and 4.1 both apply.

Registered as ``squared-relu`` (random signs, Fig. 1) and ``srelu`` (signs ``(-1)^j``
for ``j = 1..m``, eq. 4.5 / Prop. 4.6).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import register

SIGNS = ("random", "alternating")


def make_signs(width: int, signs: str = "random", generator: torch.Generator | None = None) -> torch.Tensor:
    """``s_j in {-1, +1}``: seeded random (Fig. 1) or ``(-1)^j`` with ``j = 1..m`` (eq. 4.5)."""
    if signs == "random":
        return torch.randint(0, 2, (width,), generator=generator).double() * 2.0 - 1.0
    if signs == "alternating":
        return torch.tensor([(-1.0) ** j for j in range(1, width + 1)], dtype=torch.float64)
    raise ValueError(f"signs must be one of {SIGNS}, got {signs!r}")


def init_rows(
    in_features: int, width: int, init_scale: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rows ``N(0, init_scale^2 / (d sqrt(m)))``: the output at init is O(init_scale^2)
    whatever the width (the NTK scaling ``f = m^{-1/2} sum_j s_j relu(<u_j, x>)^2`` with
    ``u_j ~ N(0, I/d)``, absorbed into the rows since the model is 2-homogeneous)."""
    w = torch.randn(width, in_features, generator=generator, dtype=torch.float64)
    return w * (init_scale / (math.sqrt(in_features) * width**0.25))


class _SquaredReLUSum(torch.autograd.Function):
    """``out_i = sum_j s_j relu(<w_j, x_i>)^2`` with a hand-written backward.

    Why: plain autograd makes ~15 passes over the ``[n, m]`` activations (it keeps
    relu(h), its square, an outer product, two products for the square's derivative and a
    mask), and at n = 100, m = 10,000 those passes, not the flops, are the cost.  Here the
    forward squares in place and saves only the inputs; the backward recomputes
    ``relu(x w^T)`` once and contracts it with a ``[d, n]`` matrix.  At n = 100 (CPU time,
    one thread) a gradient costs 0.69 / 3.7 ms at m = 1,000 / 10,000 against 1.7 / 11.3 ms
    for plain autograd, and gradient + Hessian-vector product 2.0 / 9.0 ms against 4.4 /
    35 ms.  The backward and ``jvp`` are written in differentiable torch ops on the saved
    *inputs*, so double backward, ``torch.func.grad``, ``jvp`` and Hessian-vector products
    (``jvp`` of ``grad``) see the exact derivatives (tested against plain ops).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, signs):
        hidden = x @ weight.T
        hidden = hidden.relu_()
        return hidden.mul_(hidden) @ signs  # in place: mul_ has a vmap batching rule, square_ not

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, signs = ctx.saved_tensors
        # Contiguous [3, m] / [3, n] operands: with transposed views, autograd's matmul
        # backward (used by double backward and Hessian-vector products) picks strided
        # [m, n] @ [n, 3] products that were ~6x slower than these at m = 10,000.
        active = (x @ weight.T.contiguous()).relu_()  # relu_ saves its result, so autograd allows it
        twice = 2.0 * grad_out
        grad_x = grad_w = grad_s = None
        if ctx.needs_input_grad[1]:
            coefficients = (x * twice[:, None]).T.contiguous()  # [d, n]
            grad_w = ((coefficients @ active) * signs).T
        if ctx.needs_input_grad[0]:
            grad_x = (active * (twice[:, None] * signs)) @ weight
        if ctx.needs_input_grad[2]:
            grad_s = active.square().T @ grad_out
        return grad_x, grad_w, grad_s

    @staticmethod
    def jvp(ctx, tangent_x, tangent_w, tangent_s):
        x, weight, signs = ctx.saved_tensors
        active = torch.relu(x @ weight.T)
        out = None
        tangent_hidden = None
        if tangent_w is not None:
            tangent_hidden = x @ tangent_w.T
        if tangent_x is not None:
            extra = tangent_x @ weight.T
            tangent_hidden = extra if tangent_hidden is None else tangent_hidden + extra
        if tangent_hidden is not None:
            out = (2.0 * active * tangent_hidden) @ signs
        if tangent_s is not None:
            extra = active.square() @ tangent_s
            out = extra if out is None else out + extra
        return out if out is not None else torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


def squared_relu_sum(x: torch.Tensor, weight: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x -> sum_j s_j max(0, <w_j, x>)^2`` for ``x`` of shape ``[n, d]``."""
    return _SquaredReLUSum.apply(x, weight, signs.to(weight.dtype))


class SquaredReLUNet(nn.Module):
    """``x -> sum_j s_j max(0, <w_j, x>)^2`` with fixed signs ``s`` and trained rows ``w_j``."""

    homogeneity_degree = 2

    def __init__(
        self,
        in_features: int,
        width: int,
        signs: str = "random",
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if in_features < 1 or width < 1:
            raise ValueError(f"need in_features >= 1 and width >= 1 (got {in_features}, {width})")
        # Signs are drawn before the rows so that a given generator seed fixes both.
        self.register_buffer("signs", make_signs(width, signs, generator))
        self.weight = nn.Parameter(init_rows(in_features, width, init_scale, generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squared_relu_sum(x, self.weight, self.signs)


register("squared-relu")(SquaredReLUNet)


@register("srelu")
def srelu(
    in_features: int, width: int, init_scale: float = 1.0, generator: torch.Generator | None = None
) -> SquaredReLUNet:
    """eq. (4.5): ``x -> sum_j (-1)^j max(0, <w_j, x>)^2`` (Chizat & Bach's S-ReLU)."""
    return SquaredReLUNet(in_features, width, signs="alternating", init_scale=init_scale, generator=generator)
