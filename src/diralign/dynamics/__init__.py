"""Dynamics registry: ``make_dynamics(problem, config)`` picks by ``config.dynamics``."""

from __future__ import annotations

from ..errors import UserError
from .base import Dynamics, StepResult
from .constant_gd import ConstantStepGD
from .cvode import CvodeFlow
from .flow import Dopri5Flow
from .gd import NormalizedGD
from .loss_based import LossBasedGD
from .sgd import MinibatchSGD

DYNAMICS = {
    "flow": Dopri5Flow,
    "gd": NormalizedGD,
    "sgd": MinibatchSGD,
    "loss-based": LossBasedGD,
    "constant-gd": ConstantStepGD,
}
FLOW_INTEGRATORS = {"dopri5": Dopri5Flow, "cvode": CvodeFlow}


def make_dynamics(problem, config) -> Dynamics:
    name = config.dynamics
    if name == "flow":
        integrator = getattr(config, "integrator", "dopri5")
        if integrator not in FLOW_INTEGRATORS:
            raise UserError(f"unknown integrator {integrator!r}; choose one of {', '.join(FLOW_INTEGRATORS)}")
        return FLOW_INTEGRATORS[integrator](problem, config)
    if name not in DYNAMICS:
        raise UserError(f"unknown dynamics {name!r}; choose one of {', '.join(DYNAMICS)}")
    return DYNAMICS[name](problem, config)


__all__ = ["DYNAMICS", "FLOW_INTEGRATORS", "Dynamics", "StepResult", "make_dynamics"]
