"""Model zoo and registry.  ``build_model(name, **kwargs)`` builds any registered model;
``name`` may also be ``package.module:factory`` for a user's own network."""

from __future__ import annotations

from .homogeneity import HomogeneityReport, declared_degree, homogeneity_degree
from .linear import DeepLinear, LinearModel
from .registry import MODELS, build_model, register, resolve_factory

register("linear")(LinearModel)
register("deep-linear")(DeepLinear)

__all__ = [
    "MODELS",
    "build_model",
    "register",
    "resolve_factory",
    "DeepLinear",
    "HomogeneityReport",
    "LinearModel",
    "declared_degree",
    "homogeneity_degree",
]
