"""Loss-based learning rate (Lyu & Li 2020, Appendix L), the baseline of DESIGN section 2.

    diralign run deep-linear --set dynamics=loss-based --set eta=1 --set target_ln_n_over_L=1000

Lyu & Li keep a learning rate proportional to ``1/L`` so that training does not slow down
as the risk vanishes: the update is ``W <- W - alpha * grad L / L = W - alpha * grad log L``
with a scalar ``alpha`` (here ``eta`` sets its start).  After an accepted epoch ``alpha`` grows
by ``2^(1/5)``; an epoch after which the risk did not decrease (or went non-finite) is
undone -- ``W`` rolls back to where the epoch started -- and ``alpha`` shrinks by
``2^(1/10)`` before it is tried again.

Here an epoch is one full-batch step (the bench's problems are small enough for full
batches; ``sgd`` is the minibatch method).  Unlike ``gd`` there is no cap on the update's
length: the scheme trusts the risk test alone, which is what makes it aggressive at large
``ln(n/L)``.  Deterministic; ``alpha`` is the whole controller state (``state_dict``).
``target`` is ignored: a discrete method steps over it (the bench measures a matched point
on the step that crosses it).
"""

from __future__ import annotations

from typing import Optional

from .base import Dynamics, StepResult, finite
from .gd import StepOptions

GROWTH = 2.0 ** (1 / 5)  # after an accepted epoch
SHRINK = 2.0 ** (1 / 10)  # after a failed one (with rollback)


class LossBasedGD(Dynamics):
    name = "loss-based"

    def __init__(self, problem, config):
        super().__init__(problem, config)
        self.alpha = StepOptions.from_config(config).eta

    def state_dict(self) -> dict:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])

    @property
    def step_size(self) -> float:
        return self.alpha / GROWTH  # alpha grew by GROWTH after the accepted epoch

    def step(self, w, ev, target: Optional[float] = None) -> StepResult:
        grad_evals = rejected = 0
        while True:
            w_new = w - self.alpha * ev.grad  # lr alpha/L on L is alpha on log L
            new = self.evaluate(w_new)
            grad_evals += 1
            if finite(new) and new.log_risk < ev.log_risk:
                self.alpha *= GROWTH
                return StepResult(w_new, new, grad_evals, rejected)
            # Failed epoch: roll back (w is untouched) and retry with a smaller rate.
            rejected += 1
            self.alpha /= SHRINK
            if self.alpha * float(ev.grad.norm()) < 1e-300:
                raise FloatingPointError(
                    "loss-based: the learning rate underflowed; the gradient is not a descent direction"
                )
