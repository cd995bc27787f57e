"""One interface for every way of moving W: ``step`` takes ``(w, ev)`` to the next
accepted point and reports what it cost.  Dynamics hold only their own controller state
(step sizes), exposed through ``state_dict`` so a checkpoint restores them exactly."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from ..problem import Evaluation, Problem


@dataclass
class StepResult:
    w: torch.Tensor
    ev: Evaluation
    grad_evals: int  # gradient-equivalent evaluations spent, rejected tries included
    rejected: int  # rejected tries before this accepted step


class StepAborted(Exception):
    """A budget ran out or a signal arrived inside a step: the step is abandoned and the last
    accepted point stands (the trainer restores the controller state from before the step)."""


class Dynamics:
    name = "base"
    # Whether the reported alignment/margins are the flow's (error-controlled) or
    # those of a discrete method's iterates; the summary says which.
    faithful_to_flow = False
    # Set by the trainer before a step that a log point follows: a dynamics that normally
    # skips the full-data gradient (minibatch sgd) then computes it with its end-of-step
    # forward pass, so the instruments reuse it instead of paying a second pass.
    gradient_wanted = False
    # Set by the trainer: the spacing of its log points in ln(n/L) (integrators that return
    # at outputs place them on that grid), and a callable that says whether to abandon the
    # step now (a signal or the wall-clock budget), so that a long step, an integrator
    # crawling through thousands of evaluations, stops within one evaluation.
    log_spacing = math.inf
    abort_requested: Optional[Callable[[], bool]] = None

    def __init__(self, problem: Problem, config):
        self.problem = problem
        self.config = config

    def check_abort(self) -> None:
        """Call between evaluations inside a step; raises :class:`StepAborted` when asked to stop."""
        if self.abort_requested is not None and self.abort_requested():
            raise StepAborted()

    def evaluate(self, w: torch.Tensor, need_grad: bool = True) -> Evaluation:
        """``problem.evaluate`` behind an abort check: what every dynamics calls inside a step."""
        self.check_abort()
        return self.problem.evaluate(w, need_grad=need_grad)

    def step(self, w: torch.Tensor, ev: Evaluation, target: Optional[float] = None) -> StepResult:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def finite(ev: Evaluation) -> bool:
    return math.isfinite(ev.log_risk) and (ev.grad is None or bool(torch.isfinite(ev.grad).all()))
