"""Two-layer ReLU network with fixed alternating output signs: the non-smooth twin of S-ReLU.

    python -c "import torch; from diralign.models.signed_relu import SignedReLUNet; print(SignedReLUNet(3, 4)(torch.ones(2, 3, dtype=torch.float64)))"

``x -> sum_j (-1)^j max(0, <w_j, x>)`` (``j = 1..m``): 1-homogeneous and definable, so
Theorem 3.1 applies, but its margins have kinks (no locally Lipschitz gradient), so
Theorem 4.1's alignment guarantee does not.  ``diralign verify`` reports its alignment
as the case the theorem leaves open.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .registry import register
from .squared_relu import make_signs


class SignedReLUNet(nn.Module):
    homogeneity_degree = 1

    def __init__(self, in_features: int, width: int, init_scale: float = 1.0, generator: torch.Generator | None = None):
        super().__init__()
        if in_features < 1 or width < 1:
            raise ValueError(f"need in_features >= 1 and width >= 1 (got {in_features}, {width})")
        self.register_buffer("signs", make_signs(width, "alternating"))
        w = torch.randn(width, in_features, generator=generator, dtype=torch.float64)
        self.weight = nn.Parameter(w * (init_scale / math.sqrt(in_features * width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight.T) @ self.signs.to(self.weight.dtype)


register("signed-relu")(SignedReLUNet)
