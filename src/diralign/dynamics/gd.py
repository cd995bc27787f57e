"""The paper's normalised gradient descent (Appendix A).

``W <- W - eta * grad log L``, i.e. a step ``eta / L(W)`` on ``L`` itself.  A try is
rejected, counted and retried smaller when the update is longer than
``max_update_ratio * ||W||``, when the risk rises, or when anything is non-finite;
accepted steps grow ``eta`` by ``eta_growth``.  Rejected tries are never progress.

This is aggressive by design: its iterates' *direction* converges, but quantities
measured at them (alignment above all) carry step-size noise, see README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..errors import UserError
from ..options import Options, option
from .base import Dynamics, StepResult, finite


@dataclass
class StepOptions(Options):
    """The step on ``log L`` shared by ``gd``, ``sgd`` and ``loss-based`` (one meaning of ``eta``)."""

    SECTION = "dynamics: gd, sgd, loss-based"
    eta: float = option(1.0, "initial step on log L, i.e. eta/L on L (loss-based: the initial alpha of lr = alpha/L)")
    eta_growth: float = option(1.2, "gd, sgd: step growth after an accepted step (1 keeps it fixed)")
    max_update_ratio: float = option(0.1, "gd, sgd: updates longer than this times ||W|| are shrunk or rejected")

    def validate(self) -> None:
        if not (self.eta > 0 and math.isfinite(self.eta)):
            raise UserError(f"eta must be a finite positive step, got {self.eta}")
        if not (self.eta_growth >= 1 and math.isfinite(self.eta_growth)):
            raise UserError(f"eta_growth must be >= 1 (1 keeps the step fixed), got {self.eta_growth}")
        if not self.max_update_ratio > 0:
            raise UserError(f"max_update_ratio must be positive, got {self.max_update_ratio}")


class NormalizedGD(Dynamics):
    name = "gd"

    def __init__(self, problem, config):
        super().__init__(problem, config)
        self.options = StepOptions.from_config(config)
        self.eta = self.options.eta

    def state_dict(self) -> dict:
        return {"eta": self.eta}

    @property
    def step_size(self) -> float:
        # an accepted step leaves eta grown by eta_growth; so the step itself is recovered
        # from the checkpointed eta, and a resumed run logs what the uninterrupted one did
        return self.eta / self.options.eta_growth

    def load_state_dict(self, state: dict) -> None:
        self.eta = float(state["eta"])

    def step(self, w, ev, target: Optional[float] = None) -> StepResult:
        g = ev.grad
        g_norm = float(g.norm())
        w_norm = float(w.norm())
        rejected = grad_evals = 0
        cap = self.options.max_update_ratio * max(w_norm, 1e-300)
        while True:
            if self.eta * g_norm > cap and w_norm > 0:
                # Too long an update: shrink without spending an evaluation.
                self.eta = 0.99 * cap / g_norm
                rejected += 1
                continue
            w_new = w - self.eta * g
            new = self.evaluate(w_new)
            grad_evals += 1
            if finite(new) and new.log_risk <= ev.log_risk:
                self.eta *= self.options.eta_growth
                return StepResult(w_new, new, grad_evals, rejected)
            rejected += 1
            self.eta *= 0.5
            if self.eta * g_norm < 1e-300:
                raise FloatingPointError("gd: step size underflowed; the gradient is not a descent direction")
