"""Model zoo and registry.  ``build_model(name, **kwargs)`` builds any registered model;
``name`` may also be ``package.module:factory`` for a user's own network."""

from __future__ import annotations

from .homogeneity import HomogeneityReport, declared_degree, homogeneity_degree
from .linear import DeepLinear, LinearModel
from .registry import MODELS, build_model, register, resolve_factory

register("linear")(LinearModel)
register("deep-linear")(DeepLinear)

from . import torchvision_models  # noqa: E402,F401  registers resnet18, densenet121
from .alexnet import HAlexNet  # noqa: E402  registers h-alexnet
from .ntk import LinearizedModel, SquaredReLUNTK, ntk_linearize, squared_relu_ntk  # noqa: E402
from .signed_relu import SignedReLUNet  # noqa: E402  registers signed-relu
from .squared_relu import SquaredReLUNet, squared_relu_sum  # noqa: E402  registers squared-relu, srelu

__all__ = [
    "MODELS",
    "build_model",
    "register",
    "resolve_factory",
    "DeepLinear",
    "HAlexNet",
    "SignedReLUNet",
    "HomogeneityReport",
    "LinearModel",
    "declared_degree",
    "homogeneity_degree",
    "LinearizedModel",
    "SquaredReLUNTK",
    "SquaredReLUNet",
    "ntk_linearize",
    "squared_relu_ntk",
    "squared_relu_sum",
]
