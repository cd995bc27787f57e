"""One interface for every way of moving W: ``step`` takes ``(w, ev)`` to the next
accepted point and reports what it cost.  Dynamics hold only their own controller state
(step sizes), exposed through ``state_dict`` so a checkpoint restores them exactly."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    """A budget ran out, a signal arrived or the run stalled inside a step: the step is
    abandoned and the last accepted point stands (the trainer restores the controller state
    from before the step).  ``reason``: ``"signal"``, ``"max_wall_seconds"`` or ``"stalled"``."""

    def __init__(self, reason: str = "signal"):
        super().__init__(reason)
        self.reason = reason


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
    # at outputs place them on that grid); a callable that says why to abandon the step now
    # (a signal, the wall-clock budget, a stall; None: go on), so that a long step, an
    # integrator crawling through thousands of evaluations, stops within one evaluation; and
    # one that is told the log L of every evaluation inside a step (the stall goal counts
    # progress made inside long steps).  Under torch.distributed the coordinator decides
    # aborts at the evaluations' all-gathers instead, alike on every process.
    log_spacing = math.inf
    # True while a dynamics redoes work a checkpoint already holds (CVODE replaying its
    # segment on resume): budgets and the stall goal wait for it (a budget shorter than the
    # replay would otherwise abort every resume at the same place); signals do not.
    replaying = False
    abort_requested: Optional[Callable[[], Optional[str]]] = None
    observe: Optional[Callable[[float], None]] = None
    # The last accepted step on log L (``W <- W - step grad log L``) of a full-batch discrete
    # method, logged as ``step_size``; None: no such step (flows, minibatch sgd, constant-gd's
    # step on L itself).
    step_size: Optional[float] = None

    def __init__(self, problem: Problem, config):
        self.problem = problem
        self.config = config

    def report(self) -> dict:
        """Summary keys of this dynamics' own (counters, events); none by default."""
        return {}

    def check_abort(self) -> None:
        """Call between evaluations inside a step; raises :class:`StepAborted` when asked to stop."""
        if self.abort_requested is not None:
            reason = self.abort_requested()
            if reason is not None:
                raise StepAborted(reason)

    def observed(self, ev: Evaluation) -> Evaluation:
        """Tell the trainer's stall goal about an evaluation made inside a step."""
        if self.observe is not None:
            self.observe(ev.log_risk)
        return ev

    def evaluate(self, w: torch.Tensor, need_grad: bool = True) -> Evaluation:
        """``problem.evaluate`` behind an abort check: what every dynamics calls inside a step."""
        self.check_abort()
        return self.observed(self.problem.evaluate(w, need_grad=need_grad))

    def step(self, w: torch.Tensor, ev: Evaluation, target: Optional[float] = None) -> StepResult:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def finite(ev: Evaluation) -> bool:
    return math.isfinite(ev.log_risk) and (ev.grad is None or bool(torch.isfinite(ev.grad).all()))


@contextmanager
def one_thread(active: bool) -> Iterator[None]:
    """torch's intra-op threads set to one for the block when ``active``, restored after.  For
    integrators making many small evaluations: on a shared 2-core machine two OpenMP threads
    spin at every barrier (see ``CvodeFlow`` and ``SlidingFlow``)."""
    if not active:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
