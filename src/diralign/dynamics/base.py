"""One interface for every way of moving W: ``step`` takes ``(w, ev)`` to the next
accepted point and reports what it cost.  Dynamics hold only their own controller state
(step sizes), exposed through ``state_dict`` so a checkpoint restores them exactly."""

from __future__ import annotations

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


class Dynamics:
    name = "base"
    # Whether the reported alignment/margins are the flow's (error-controlled) or
    # those of a discrete method's iterates; the summary says which.
    faithful_to_flow = False
    # Set by the trainer before a step that a log point follows: a dynamics that normally
    # skips the full-data gradient (minibatch sgd) then computes it with its end-of-step
    # forward pass, so the instruments reuse it instead of paying a second pass.
    gradient_wanted = False

    def __init__(self, problem: Problem, config):
        self.problem = problem
        self.config = config

    def step(self, w: torch.Tensor, ev: Evaluation, target: Optional[float] = None) -> StepResult:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def finite(ev: Evaluation) -> bool:
    import math

    return math.isfinite(ev.log_risk) and (ev.grad is None or bool(torch.isfinite(ev.grad).all()))
