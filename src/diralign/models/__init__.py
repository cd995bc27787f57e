"""Model zoo and registry.  ``build_model(name, **kwargs)`` builds any registered model;
``name`` may also be ``package.module:factory`` for a user's own network."""

from __future__ import annotations

from .homogeneity import HomogeneityReport, declared_degree, homogeneity_degree
from .linear import DeepLinear, LinearModel

__all__ = [
    "DeepLinear",
    "HomogeneityReport",
    "LinearModel",
    "declared_degree",
    "homogeneity_degree",
]
