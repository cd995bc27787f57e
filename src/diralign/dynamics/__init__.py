"""Dynamics registry: ``make_dynamics(problem, config)`` picks by ``config.dynamics``.

    python -c "from diralign.dynamics import DYNAMICS, OPTIONS; print(list(DYNAMICS), [o.__name__ for o in OPTIONS])"

Each dynamics owns a small options dataclass (``OPTIONS``), validated in one place
(``Options.validate``); run configs are composed of them (:mod:`diralign.config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..options import Options, option
from .base import Dynamics, StepAborted, StepResult
from .constant_gd import ConstantGDOptions, ConstantStepGD
from .cvode import CvodeFlow, CvodeOptions
from .flow import Dopri5Flow, FlowOptions
from .gd import NormalizedGD, StepOptions
from .kinked import SlidingFlow
from .loss_based import LossBasedGD
from .sgd import MinibatchSGD, SGDOptions
from .sliding_cvode import SlidingCvode
from .warm import WarmStartFlow

DYNAMICS = {
    "flow": Dopri5Flow,
    "gd": NormalizedGD,
    "sgd": MinibatchSGD,
    "loss-based": LossBasedGD,
    "constant-gd": ConstantStepGD,
}
FLOW_INTEGRATORS = {"dopri5": Dopri5Flow, "cvode": CvodeFlow, "sliding": SlidingCvode, "sliding-dopri5": SlidingFlow}


@dataclass
class DynamicsChoice(Options):
    SECTION = "dynamics"
    dynamics: str = option(
        "flow", "flow (error-controlled gradient flow), gd (normalised GD), sgd, loss-based (Lyu & Li), constant-gd"
    )

    def validate(self) -> None:
        if self.dynamics not in DYNAMICS:
            raise UserError(f"unknown dynamics {self.dynamics!r}; choose one of {', '.join(DYNAMICS)}")


OPTIONS = (DynamicsChoice, FlowOptions, CvodeOptions, StepOptions, SGDOptions, ConstantGDOptions)


def make_dynamics(problem, config) -> Dynamics:
    name = DynamicsChoice.from_config(config).dynamics
    if name == "flow":
        flow = FLOW_INTEGRATORS[flow_integrator(problem.model, config)](problem, config)
        start = FlowOptions.from_config(config).flow_from_ln
        return flow if start is None else WarmStartFlow(problem, config, flow, start)
    return DYNAMICS[name](problem, config)


def flow_integrator(model, config) -> str:
    """The flow integrator a run uses: ``integrator``, with ``auto`` resolved by the model.  A
    model with ReLU / max-pool kinks (and no other kind) gets the sliding flow, whose
    right-hand side is exact on switching surfaces; CVODE there chatters across them."""
    integrator = FlowOptions.from_config(config).integrator
    if integrator != "auto":
        return integrator
    from ..kinks import unsupported_kinks
    from ..models.structure import nonsmooth_operations

    operations = nonsmooth_operations(model)
    return "sliding" if operations and not unsupported_kinks(model, operations) else "cvode"


def describe_dynamics(config, model=None) -> str:
    """What the summary's ``dynamics`` says: ``flow/cvode``, ``flow/sliding``, ``gd``, ..."""
    name = DynamicsChoice.from_config(config).dynamics
    if name != "flow":
        return name
    integrator = flow_integrator(model, config) if model is not None else FlowOptions.from_config(config).integrator
    return f"{name}/{integrator}"


__all__ = [
    "DYNAMICS",
    "FLOW_INTEGRATORS",
    "OPTIONS",
    "Dynamics",
    "DynamicsChoice",
    "StepAborted",
    "StepResult",
    "describe_dynamics",
    "flow_integrator",
    "make_dynamics",
]
