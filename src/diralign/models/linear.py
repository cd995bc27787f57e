"""Linear and deep linear predictors (bias-free, so exactly homogeneous)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class LinearModel(nn.Module):
    """``x -> <u, x>``: 1-homogeneous; gradient descent on it tends to the SVM direction."""

    homogeneity_degree = 1
    linear_in_input = True  # x -> M x: separability is a linear program (diralign.separability)

    def __init__(self, in_features: int, init_scale: float = 0.1, generator: torch.Generator | None = None):
        super().__init__()
        w = torch.randn(in_features, generator=generator) * init_scale / math.sqrt(in_features)
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class DeepLinear(nn.Module):
    """``x -> A_k ... A_1 x`` with scalar output: k-homogeneous (Prop. 4.4).

    Layers are initialised with a common Frobenius norm ``init_scale`` so that they
    start (approximately) balanced, as Prop. 4.4's margin ratio ``gamma_svm / k^{k/2}``
    assumes: gradient flow preserves ``||A_j||^2 - ||A_{j+1}||^2``.
    """

    linear_in_input = True  # x -> (A_k ... A_1) x: separability is a linear program

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int] = (8, 8),
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        dims = [in_features, *widths, 1]
        self.layers = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            a = torch.randn(fan_out, fan_in, generator=generator)
            self.layers.append(nn.Parameter(a * (init_scale / a.norm())))
        self.homogeneity_degree = len(self.layers)

    def end_to_end(self) -> torch.Tensor:
        """The product ``A_k ... A_1`` as a vector in input space."""
        product = self.layers[0]
        for a in self.layers[1:]:
            product = a @ product
        return product.reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for a in self.layers:
            h = h @ a.T
        return h[:, 0]
