"""Plain constant-step gradient descent on the risk itself: the loop most users run.

    diralign run deep-linear --set dynamics=constant-gd --set constant_gd_eta=0.05 --set max_wall_seconds=30

``W <- W - eta * grad L`` with a fixed ``eta = constant_gd_eta`` on the unnormalised risk ``L = sum_i l(p_i)``
(a learning rate ``lr`` on the *mean* loss is ``eta = lr / n``).  Every step is taken: no
line search, no rejection, no growth -- that is the baseline.

It is computed honestly in the working precision: ``grad L = exp(log L) * grad log L``, the
same numbers a float64 loop on ``L`` produces.  Two things stop it:

* time: near separability ``L`` falls like ``1/t``, so reaching ``ln(n/L) = s`` takes about
  ``e^s`` steps;
* precision: once ``eta * L * |grad log L|`` is below half an ulp of ``W`` the update is
  rounded away (``stalled_steps`` counts such steps), and below ``log L ~ -745`` (float64)
  ``exp(log L)`` underflows to 0 and ``grad L`` vanishes altogether.

A non-finite risk (the step was too large for the curvature) raises ``FloatingPointError``;
steps that raise the risk are taken anyway and counted (``risk_increases``).  Deterministic;
the counters are the whole state (``state_dict``).  ``target`` is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from ..options import Options, option
from .base import Dynamics, StepResult, finite


@dataclass
class ConstantGDOptions(Options):
    SECTION = "dynamics: constant-gd"
    constant_gd_eta: float = option(1.0, "constant-gd: the fixed step on L itself (plain W -= eta grad L)")

    def validate(self) -> None:
        if not (self.constant_gd_eta > 0 and math.isfinite(self.constant_gd_eta)):
            raise UserError(f"constant_gd_eta must be a finite step > 0 (on L), got {self.constant_gd_eta}")


def risk_gradient(log_risk: float, grad_log_risk: torch.Tensor) -> torch.Tensor:
    """``grad L = L * grad log L`` in ``grad``'s dtype: underflows exactly where a loop on ``L`` would."""
    risk = torch.exp(torch.tensor(log_risk, dtype=grad_log_risk.dtype))
    return risk.to(grad_log_risk.device) * grad_log_risk


class ConstantStepGD(Dynamics):
    name = "constant-gd"

    def __init__(self, problem, config):
        super().__init__(problem, config)
        self.eta = ConstantGDOptions.from_config(config).constant_gd_eta
        self.stalled_steps = 0  # steps whose update was rounded away entirely
        self.risk_increases = 0  # steps after which the risk was higher (taken anyway)

    def state_dict(self) -> dict:
        return {"stalled_steps": self.stalled_steps, "risk_increases": self.risk_increases}

    def load_state_dict(self, state: dict) -> None:
        self.stalled_steps = int(state.get("stalled_steps", 0))
        self.risk_increases = int(state.get("risk_increases", 0))

    def step(self, w, ev, target: Optional[float] = None) -> StepResult:
        w_new = w - self.eta * risk_gradient(ev.log_risk, ev.grad)
        if torch.equal(w_new, w):
            # Nothing moved: reuse the evaluation (a real loop would recompute the same numbers).
            self.stalled_steps += 1
            return StepResult(w_new, ev, 1, 0)
        new = self.evaluate(w_new)
        if not finite(new):
            raise FloatingPointError(
                f"constant-gd diverged (non-finite risk) with eta={self.eta}; lower constant_gd_eta"
            )
        if new.log_risk > ev.log_risk:
            self.risk_increases += 1
        return StepResult(w_new, new, 1, 0)
