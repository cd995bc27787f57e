"""The gradient flow, integrated with error control, in the clock ``s = ln(n/L)``.

Along ``dW/dt = -grad L`` the risk falls monotonically, so ``s = ln n - log L`` is a
valid clock; with ``g = grad log L``, ``ds/dt = -<grad log L, dW/dt> = L ||g||^2`` and

    dW/ds = -g / ||g||^2,

which traces the paper's path exactly, never blows up (the flow on ``log L`` reaches
infinity in finite time for degree > 2), and makes "integrate to ln(n/L) = 1000" an end
time.  The integrator's own ``s`` is never trusted for goals: the true ``ln(n/L)`` is
evaluated at every accepted point (free with FSAL), so the clock cannot drift.

``integrator=dopri5`` is an explicit Dormand-Prince 5(4) pair with the classic
controller, written here on flat torch tensors so that its whole state (``w``, the next
step ``h``, the FSAL derivative) is checkpointed and a resumed run is bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from ..options import Options, option
from .base import Dynamics, StepResult, finite

INTEGRATORS = ("auto", "cvode", "dopri5", "sliding", "sliding-dopri5")


@dataclass
class FlowOptions(Options):
    SECTION = "dynamics: flow"
    integrator: str = option(
        "auto",
        "auto (sliding for ReLU/max-pool models, else cvode), cvode (BDF, stiff-aware), dopri5 (explicit reference), "
        "sliding (event-aware Filippov flow for kinks, CVODE between events), sliding-dopri5 (the same, explicit)",
    )
    rtol: float = option(1e-6, "relative tolerance of the flow integrator")
    flow_from_ln: Optional[float] = option(
        None,
        "start the flow at this ln(n/L), normalised gd getting there first (none: from initialisation); "
        "the summary's faithful_from_ln_n_over_L says where it started",
    )
    atol: float = option(1e-10, "absolute tolerance floor of the flow integrator")

    def validate(self) -> None:
        if self.integrator not in INTEGRATORS:
            raise UserError(f"unknown integrator {self.integrator!r}; choose one of {', '.join(INTEGRATORS)}")
        if self.flow_from_ln is not None and not math.isfinite(self.flow_from_ln):
            raise UserError(f"flow_from_ln must be a finite ln(n/L) or none, got {self.flow_from_ln}")
        if not (0 < self.rtol < 1) or not self.atol >= 0:
            raise UserError(f"rtol must be in (0, 1) and atol >= 0 (got rtol={self.rtol}, atol={self.atol})")


# Dormand & Prince (1980) tableau.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = _A[6] + (0.0,)
_B_LOW = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b - bl for b, bl in zip(_B, _B_LOW))


def s_clock_velocity(grad: torch.Tensor) -> torch.Tensor:
    """``dW/ds = -g/||g||^2``."""
    return -grad / torch.dot(grad, grad)


class Dopri5Flow(Dynamics):
    name = "flow"
    faithful_to_flow = True

    def __init__(self, problem, config):
        super().__init__(problem, config)
        self.h: Optional[float] = None
        options = FlowOptions.from_config(config)
        self.rtol, self.atol = options.rtol, options.atol

    def state_dict(self) -> dict:
        return {"h": self.h}

    def load_state_dict(self, state: dict) -> None:
        self.h = state["h"]

    def _error_norm(self, err, w, w_new) -> float:
        scale = self.atol + self.rtol * torch.maximum(w.abs(), w_new.abs())
        return float(torch.sqrt(torch.mean((err / scale) ** 2)))

    def _initial_step(self, w, f0) -> float:
        scale = self.atol + self.rtol * w.abs()
        d0 = float(torch.sqrt(torch.mean((w / scale) ** 2)))
        d1 = float(torch.sqrt(torch.mean((f0 / scale) ** 2)))
        return 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1

    def step(self, w, ev, target: Optional[float] = None) -> StepResult:
        problem = self.problem
        k1 = s_clock_velocity(ev.grad)
        if self.h is None:
            self.h = self._initial_step(w, k1)
        s_now = math.log(problem.n) - ev.log_risk
        grad_evals = rejected = 0
        while True:
            h = self.h
            if target is not None and target > s_now:
                # Land on the target instead of overshooting it (matched-s comparisons).
                h = min(h, (target - s_now) * (1 + 1e-9))
            ks = [k1]
            new = None
            ok = True
            for i in range(1, 7):
                w_stage = w + h * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
                stage = self.evaluate(w_stage)
                grad_evals += 1
                if not finite(stage) or float(stage.grad.norm()) == 0.0:
                    ok = False
                    break
                ks.append(s_clock_velocity(stage.grad))
                if i == 6:
                    new, w_new = stage, w_stage  # FSAL: stage 7 sits at the new point
            if ok:
                err = h * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
                err_norm = self._error_norm(err, w, w_new)
            if not ok or not math.isfinite(err_norm):
                rejected += 1
                self.h = 0.25 * h
                continue
            factor = 0.9 * err_norm ** (-1 / 5) if err_norm > 0 else 5.0
            if err_norm <= 1.0:
                self.h = h * min(5.0, max(0.2, factor)) if h == self.h else max(self.h, h)
                return StepResult(w_new, new, grad_evals, rejected)
            rejected += 1
            self.h = h * min(1.0, max(0.2, factor))
