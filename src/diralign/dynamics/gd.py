"""The paper's normalised gradient descent (Appendix A).

``W <- W - eta * grad log L``, i.e. a step ``eta / L(W)`` on ``L`` itself.  A try is
rejected, counted and retried smaller when the update is longer than
``max_update_ratio * ||W||``, when the risk rises, or when anything is non-finite;
accepted steps grow ``eta`` by ``eta_growth``.  Rejected tries are never progress.

This is aggressive by design: its iterates' *direction* converges, but quantities
measured at them (alignment above all) carry step-size noise, see README.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import Dynamics, StepResult, finite


class NormalizedGD(Dynamics):
    name = "gd"

    def __init__(self, problem, config):
        super().__init__(problem, config)
        self.eta = float(config.eta)

    def state_dict(self) -> dict:
        return {"eta": self.eta}

    def load_state_dict(self, state: dict) -> None:
        self.eta = float(state["eta"])

    def step(self, w, ev, target: Optional[float] = None) -> StepResult:
        g = ev.grad
        g_norm = float(g.norm())
        w_norm = float(w.norm())
        rejected = grad_evals = 0
        cap = self.config.max_update_ratio * max(w_norm, 1e-300)
        while True:
            if self.eta * g_norm > cap and w_norm > 0:
                # Too long an update: shrink without spending an evaluation.
                self.eta = 0.99 * cap / g_norm
                rejected += 1
                continue
            w_new = w - self.eta * g
            new = self.problem.evaluate(w_new)
            grad_evals += 1
            if finite(new) and new.log_risk <= ev.log_risk:
                self.eta *= self.config.eta_growth
                return StepResult(w_new, new, grad_evals, rejected)
            rejected += 1
            self.eta *= 0.5
            if self.eta * g_norm < 1e-300:
                raise FloatingPointError("gd: step size underflowed; the gradient is not a descent direction")
