"""Follow one dynamics through a list of ``ln(n/L)`` targets, timing only the dynamics.

    python -c "from diralign.bench.follow import follow; help(follow)"

This is the benchmark's lean loop (no run directory, no probes between steps): it calls
``dynamics.step`` until every target is passed or a cap is hit, and at each target measures

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
    trace: dict = field(default_factory=lambda: {"ln_n_over_L": [], "alignment_cos": [], "grad_evals": [], "wall_seconds": []})
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


def follow(
    label: str,
    problem: Problem,
    w0: torch.Tensor,
    dynamics: Dynamics,
    targets,
    time_cap: float,
    eval_cap: Optional[int] = None,
) -> Followed:
    """Run ``dynamics`` from ``w0`` through ``targets`` (ascending) or until a cap."""
    pending = sorted(float(t) for t in targets)
    out = Followed(label=label)
    counters = {"steps": 0, "grad_evals": 0, "wall": 0.0}
    start = time.perf_counter()
    ev = problem.evaluate(w0)
    counters["grad_evals"] = 1
    counters["wall"] = time.perf_counter() - start
    w = w0
    prev = (None, None)
    s = clock(problem, ev)
    best_s, since_best, rejected = s, 0, 0
    next_trace = -math.inf
    while True:
        # -- measurement (not timed) --------------------------------------------------
        if s >= next_trace and math.isfinite(s):
            for key, value in (("ln_n_over_L", s), ("alignment_cos", cosine(w, -ev.grad) if ev.grad is not None else float("nan")),
                               ("grad_evals", counters["grad_evals"]), ("wall_seconds", counters["wall"])):
                out.trace[key].append(float(value))
            next_trace = s * TRACE_GROWTH if s > 0 else s + 0.05
        while pending and s >= pending[0] - LANDED_RELATIVE * max(abs(pending[0]), 1.0):
            target = pending.pop(0)
            out.matched[target] = _measure(problem, dynamics, target, prev, (w, ev), counters)
        # -- goals ----------------------------------------------------------------------
        if not pending:
            out.stop_reason = "all targets reached"
            break
        if counters["wall"] >= time_cap:
            out.stop_reason = f"time cap ({time_cap:g} s)"
            break
        if eval_cap is not None and counters["grad_evals"] >= eval_cap:
            out.stop_reason = f"evaluation cap ({eval_cap})"
            break
        if since_best >= STALL_STEPS:
            out.stop_reason = f"stalled (ln(n/L) did not rise in {STALL_STEPS} steps)"
            break
        # -- one step (timed) ---------------------------------------------------------
        tick = time.perf_counter()
        try:
            result = dynamics.step(w, ev, target=pending[0])
        except (FloatingPointError, RuntimeError, ArithmeticError) as exc:
            counters["wall"] += time.perf_counter() - tick
            out.stop_reason = f"failed: {exc}"
            break
        counters["wall"] += time.perf_counter() - tick
        prev = (w, ev)
        w, ev = result.w, result.ev
        counters["steps"] += 1
        counters["grad_evals"] += result.grad_evals
        rejected += result.rejected
        s = clock(problem, ev)
        if s > best_s:
            best_s, since_best = s, 0
        else:
            since_best += 1
    out.steps, out.grad_evals, out.wall_seconds = counters["steps"], counters["grad_evals"], counters["wall"]
    out.rejected_steps = rejected
    out.ln_n_over_L = s
    out.final_w, out.final_ev = w, ev
    return out
