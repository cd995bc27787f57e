"""Follow one dynamics through a list of ``ln(n/L)`` targets, timing only the dynamics.

    python -c "from diralign.bench.follow import follow; help(follow)"

This is the trainer run without a run directory or instruments: the dynamics steps until
every target is passed or a cap is hit, and at each target a callback measures

* the gradient evaluations and wall seconds spent when the target was first reached
  (the iterate that crossed it);
* the direction ``W/||W||`` and the alignment cosine *at the matched clock* ``ln(n/L) = T``.
  Flows land on ``T`` themselves (``step(..., target=T)``).  A discrete method steps over
  it; its point at ``T`` is the one on the step that crossed it (``W_prev + t (W - W_prev)``
  with ``t`` solved for by the Illinois method on forward-only evaluations) -- again a step
  of that method from ``W_prev``, just shorter.  That measurement is not counted as the
  method's work and does not change its trajectory: the method goes on from ``W``.

Wall seconds exclude measurement (matching, traces) so that a method pays only for itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..dynamics.base import Dynamics
from ..probes import cosine
from ..problem import Evaluation, Problem
from ..trainer import Callback, GoalOptions, LoggingOptions, Trainer, initial_state

LANDED_RELATIVE = 1e-6  # |s - T| <= this * max(T, 1): the iterate itself is the matched point
FLOW_LANDED_RELATIVE = 1e-3  # flows land on T up to their clock's drift; keep their own point
MATCH_RELATIVE = 1e-10  # tolerance of the matched clock found on a crossing step
TRACE_GROWTH = 1.02  # trace points every 2% of ln(n/L)
STALL_STEPS = 2000  # this many steps without any rise of ln(n/L): stop ("stalled")


@dataclass
class Matched:
    """What a dynamics looked like at ``ln(n/L) = target``."""

    target: float
    steps: int
    grad_evals: int  # spent up to the iterate that first reached the target
    wall_seconds: float
    iterate_ln_n_over_L: float  # that iterate's ln(n/L)
    ln_n_over_L: float  # the matched point's (= target up to MATCH_RELATIVE or a flow's drift)
    how: str  # "landed" or "interpolated"
    alignment_cos: float
    direction: torch.Tensor  # W/||W|| at the matched point (kept in memory only)
    direction_velocity: torch.Tensor  # d(W/||W||)/ds there along the flow (first-order clock matching)
    matching_evals: int = 0  # forward/gradient evaluations spent measuring (not counted above)


@dataclass
class Followed:
    label: str
    matched: dict = field(default_factory=dict)  # target -> Matched
    stop_reason: str = ""
    steps: int = 0
    grad_evals: int = 0
    rejected_steps: int = 0
    wall_seconds: float = 0.0
    ln_n_over_L: float = float("nan")  # how far it got
    trace: dict = field(
        default_factory=lambda: {"ln_n_over_L": [], "alignment_cos": [], "grad_evals": [], "wall_seconds": []}
    )
    final_w: Optional[torch.Tensor] = None
    final_ev: Optional[Evaluation] = None


def clock(problem: Problem, ev: Evaluation) -> float:
    return math.log(problem.n) - ev.log_risk


def match_on_step(problem: Problem, w0: torch.Tensor, s0: float, w1: torch.Tensor, s1: float, target: float):
    """The point ``w0 + t (w1 - w0)`` with ``ln(n/L) = target``, ``s0 < target < s1``.

    Illinois (modified regula falsi) on ``t``: always bracketed, so it converges even where
    ``ln(n/L)`` is far from linear along the step.  Returns ``(w, forward_evals)``.
    """
    delta = w1 - w0
    lo, hi, f_lo, f_hi = 0.0, 1.0, s0 - target, s1 - target
    tol = MATCH_RELATIVE * max(abs(target), 1.0)
    evals, side, w = 0, 0, w1
    for _ in range(200):
        t = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        if not (lo < t < hi):
            t = 0.5 * (lo + hi)
        w = w0 + t * delta
        f = clock(problem, problem.evaluate(w, need_grad=False)) - target
        evals += 1
        if abs(f) <= tol or hi - lo <= 1e-15:
            break
        if f > 0:
            hi, f_hi = t, f
            if side == 1:
                f_lo *= 0.5
            side = 1
        else:
            lo, f_lo = t, f
            if side == -1:
                f_hi *= 0.5
            side = -1
    return w, evals


def direction_velocity(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d(W/||W||)/ds`` along the flow ``dW/ds = -g/||g||^2``: ``(v - u <u, v>) / ||W||``."""
    norm = w.norm()
    u = w / norm
    v = -grad / torch.dot(grad, grad)
    return ((v - u * torch.dot(u, v)) / norm).detach().clone()


def direction_error(m: Matched, ref: Matched) -> float:
    """``||W~ - W~_ref||`` at the same ``ln(n/L)``.

    The two points sit at ``ln(n/L)`` equal to the target up to landing tolerances (a flow's
    clock drift, ~1e-7 relative for CVODE); the reference direction is moved to ``m``'s exact
    clock along its tangent, so the error measures the path, not where on it each stopped.
    """
    shifted = ref.direction + (m.ln_n_over_L - ref.ln_n_over_L) * ref.direction_velocity
    return float((m.direction - shifted).norm())


def _measure(problem, dynamics, target, prev, cur, counters) -> Matched:
    (w0, ev0), (w1, ev1) = prev, cur
    s1 = clock(problem, ev1)
    tol = (FLOW_LANDED_RELATIVE if dynamics.faithful_to_flow else LANDED_RELATIVE) * max(abs(target), 1.0)
    extra = 0
    if abs(s1 - target) <= tol or w0 is None:
        w, ev, how = w1, ev1, "landed"
    else:
        w, extra = match_on_step(problem, w0, clock(problem, ev0), w1, s1, target)
        ev = problem.evaluate(w)
        extra += 1
        how = "interpolated"
    if ev.grad is None:
        ev = problem.evaluate(w)
        extra += 1
    return Matched(
        target=target,
        steps=counters["steps"],
        grad_evals=counters["grad_evals"],
        wall_seconds=counters["wall"],
        iterate_ln_n_over_L=s1,
        ln_n_over_L=clock(problem, ev),
        how=how,
        alignment_cos=cosine(w, -ev.grad),
        direction=(w / w.norm()).detach().clone(),
        direction_velocity=direction_velocity(w, ev.grad),
        matching_evals=extra,
    )


class _Follower(Callback):
    """Measures at each target as the trainer passes it; enforces the benchmark's caps.

    Its own time is kept apart (``measuring``) so that a method pays only for itself."""

    key = "follow"

    def __init__(self, out: Followed, targets, time_cap: float, eval_cap: Optional[int]):
        self.out = out
        self.pending = sorted(float(t) for t in targets)
        self.time_cap = time_cap
        self.eval_cap = eval_cap
        self.prev = (None, None)
        self.measuring = 0.0
        self.best_s, self.since_best = -math.inf, 0
        self.next_trace = -math.inf

    def counters(self, state) -> dict:
        return {"steps": state.steps, "grad_evals": state.grad_evals, "wall": state.wall_seconds - self.measuring}

    def observe(self, trainer, state) -> None:
        tick = time.perf_counter()
        problem = trainer.problem
        w, ev = state.w, state.ev
        s = clock(problem, ev)
        counters = self.counters(state)
        if s >= self.next_trace and math.isfinite(s):
            cos = cosine(w, -ev.grad) if ev.grad is not None else float("nan")
            for key, value in (
                ("ln_n_over_L", s),
                ("alignment_cos", cos),
                ("grad_evals", counters["grad_evals"]),
                ("wall_seconds", counters["wall"]),
            ):
                self.out.trace[key].append(float(value))
            self.next_trace = s * TRACE_GROWTH if s > 0 else s + 0.05
        while self.pending and s >= self.pending[0] - LANDED_RELATIVE * max(abs(self.pending[0]), 1.0):
            target = self.pending.pop(0)
            self.out.matched[target] = _measure(problem, trainer.dynamics, target, self.prev, (w, ev), counters)
        self.prev = (w, ev)
        if s > self.best_s:
            self.best_s, self.since_best = s, 0
        else:
            self.since_best += 1
        self.measuring += time.perf_counter() - tick
        counters = self.counters(state)
        if not self.pending:
            state.stop_reason = "all targets reached"
        elif counters["wall"] >= self.time_cap:
            state.stop_reason = f"time cap ({self.time_cap:g} s)"
        elif self.eval_cap is not None and counters["grad_evals"] >= self.eval_cap:
            state.stop_reason = f"evaluation cap ({self.eval_cap})"
        elif self.since_best > STALL_STEPS:
            state.stop_reason = f"stalled (ln(n/L) did not rise in {STALL_STEPS} steps)"

    def on_step(self, trainer, state) -> None:
        self.observe(trainer, state)


def follow(
    label: str,
    problem: Problem,
    w0: torch.Tensor,
    dynamics: Dynamics,
    targets,
    time_cap: float,
    eval_cap: Optional[int] = None,
) -> Followed:
    """Run ``dynamics`` from ``w0`` through ``targets`` (ascending) or until a cap.

    A :class:`~diralign.trainer.Trainer` run without instruments or a run directory, whose
    milestones are the targets (flows land on each)."""
    targets = sorted(float(t) for t in targets)
    out = Followed(label=label)
    follower = _Follower(out, targets, time_cap, eval_cap)
    goals = GoalOptions(
        target_ln_n_over_L=targets[-1] if targets else math.inf, max_steps=10**12, max_wall_seconds=None
    )
    trainer = Trainer(
        problem,
        dynamics,
        goals,
        LoggingOptions(),
        callbacks=[follower],
        instruments=False,
        milestones=tuple(targets),
        stall_goal=False,
    )
    start = time.perf_counter()
    state = initial_state(problem, w0)
    state.wall_seconds = time.perf_counter() - start
    follower.observe(trainer, state)
    if state.stop_reason is None:
        try:
            trainer.train(state)
        except (FloatingPointError, RuntimeError, ArithmeticError) as exc:
            state.stop_reason = f"failed: {exc}"
    out.stop_reason = state.stop_reason if state.stop_reason != "target_ln_n_over_L" else "all targets reached"
    counters = follower.counters(state)
    out.steps, out.grad_evals, out.wall_seconds = counters["steps"], counters["grad_evals"], counters["wall"]
    out.rejected_steps = state.rejected_steps
    out.ln_n_over_L = clock(problem, state.ev)
    out.final_w, out.final_ev = state.w, state.ev
    return out
