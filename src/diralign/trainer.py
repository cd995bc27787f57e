"""The training loop: goals, log schedule, checkpoints, signals.  No experiment logic:
experiments plug in through :class:`Callback` objects."""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import probes
from .dynamics import Dynamics
from .problem import Evaluation, Problem
from .store import RunDir


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint has been written."""


@dataclass
class TrainState:
    w: torch.Tensor
    ev: Evaluation
    steps: int = 0
    grad_evals: int = 0
    rejected_steps: int = 0
    wall_seconds: float = 0.0
    path_length: float = 0.0
    next_log_ln: float = -math.inf
    next_log_step: int = 0
    last_logged_step: int = -1
    first_separable_step: Optional[int] = None
    first_separable_ln: Optional[float] = None
    below_loss_at_zero_step: Optional[int] = None  # Assumption 2.3 first holds here
    stop_reason: Optional[str] = None
    callbacks: dict = field(default_factory=dict)

    def to_payload(self) -> dict:
        ev = self.ev
        return {
            "w": self.w,
            "ev": {"log_risk": ev.log_risk, "grad": ev.grad, "margins": ev.margins, "correct": ev.correct},
            **{k: getattr(self, k) for k in _SCALAR_FIELDS},
            "callbacks": self.callbacks,
        }

    @classmethod
    def from_payload(cls, payload: dict, device, dtype) -> "TrainState":
        ev = payload["ev"]
        evaluation = Evaluation(
            log_risk=ev["log_risk"],
            grad=None if ev["grad"] is None else ev["grad"].to(device=device, dtype=dtype),
            margins=ev["margins"].to(device=device),
            correct=ev["correct"],
        )
        state = cls(w=payload["w"].to(device=device, dtype=dtype), ev=evaluation)
        for key in _SCALAR_FIELDS:
            setattr(state, key, payload[key])
        state.callbacks = payload.get("callbacks", {})
        return state


_SCALAR_FIELDS = (
    "steps",
    "grad_evals",
    "rejected_steps",
    "wall_seconds",
    "path_length",
    "next_log_ln",
    "next_log_step",
    "last_logged_step",
    "first_separable_step",
    "first_separable_ln",
    "below_loss_at_zero_step",
    "stop_reason",
)


class Callback:
    """Experiment hooks.  State they keep goes in ``state.callbacks[self.key]`` so that it
    is checkpointed with the run."""

    key = "callback"

    def on_step(self, ctx: "TrainContext", state: TrainState) -> None:
        pass

    def on_log(self, ctx: "TrainContext", state: TrainState, row: dict) -> None:
        pass


@dataclass
class TrainContext:
    problem: Problem
    dynamics: Dynamics
    config: object
    store: Optional[RunDir]
    callbacks: list
    quiet: bool = False
    is_writer: bool = True  # rank 0 in distributed runs
    distributed: Optional[object] = None  # diralign.distributed.DataParallel under torchrun
    groups: dict = field(default_factory=dict)
    columns: list = field(default_factory=list)
    store_directions: bool = False
    session_wall_start: float = 0.0  # state.wall_seconds when this train_loop call began

    @property
    def target(self) -> float:
        return float(self.config.target_ln_n_over_L)

    @property
    def log_spacing(self) -> float:
        spacing = float(self.config.log_every_ln)
        return spacing if spacing > 0 else max(self.target / 200.0, 1e-3)


BASE_COLUMNS = [
    "step",
    "grad_evals",
    "rejected_steps",
    "wall_seconds",
    "ln_n_over_L",
    "log_risk",
    "smoothed_margin",
    "normalized_smoothed_margin",
    "beta",
    "min_margin",
    "min_normalized_margin",
    "param_norm",
    "grad_norm",
    "alignment_cos",
    "path_length",
    "train_accuracy",
    "below_loss_at_zero",
]


def prepare_context(ctx: TrainContext) -> None:
    ctx.groups = probes.block_groups(ctx.problem.names)
    block_columns = []
    for key in ctx.groups:
        block_columns += [f"share:{key}", f"alignment_cos:{key}"]
    ctx.columns = BASE_COLUMNS + block_columns
    ctx.store_directions = ctx.problem.dim <= int(ctx.config.store_directions_max_params)


def initial_state(problem: Problem, w0: torch.Tensor) -> TrainState:
    ev = problem.evaluate(w0)
    return TrainState(w=w0, ev=ev, grad_evals=1)


def make_row(ctx: TrainContext, state: TrainState) -> dict:
    row = probes.panel(ctx.problem, state.w, state.ev, ctx.problem.degree)
    row.update(
        step=state.steps,
        grad_evals=state.grad_evals,
        rejected_steps=state.rejected_steps,
        wall_seconds=state.wall_seconds,
        path_length=state.path_length,
    )
    if state.ev.grad is not None:
        row.update(probes.block_panel(ctx.problem, state.w, state.ev.grad, ctx.groups, row.get("alignment_cos")))
    return row


def log_point(ctx: TrainContext, state: TrainState) -> dict:
    if state.ev.grad is None:
        # Dynamics that skip the full-data gradient between log points (minibatch sgd)
        # get it here, so alignment is measured at every log point.
        state.ev = ctx.problem.evaluate(state.w)
        state.grad_evals += 1
    if ctx.distributed is not None:  # each rank holds its shard's margins; log all n
        state.ev = ctx.distributed.gather_margins(state.ev)
    row = make_row(ctx, state)
    s = row["ln_n_over_L"]
    spacing = ctx.log_spacing
    state.next_log_ln = (math.floor(s / spacing) + 1) * spacing
    state.next_log_step = max(state.steps + 1, int(math.ceil(state.steps * float(ctx.config.log_step_growth))))
    state.last_logged_step = state.steps
    if ctx.store is not None and ctx.is_writer:
        norm = row["param_norm"]
        margins = probes.normalized_margins(state.ev.margins, norm, ctx.problem.degree)
        direction = None
        if ctx.store_directions:
            direction = (state.w / norm).detach().cpu().numpy()
        ctx.store.append_row(row, margins.detach().cpu().numpy().astype(np.float32), direction)
    for cb in ctx.callbacks:
        cb.on_log(ctx, state, row)
    return row


def checkpoint(ctx: TrainContext, state: TrainState) -> None:
    if ctx.distributed is not None:  # all ranks: gather margins, compare parameter hashes
        ctx.distributed.check_in_sync(state)
    if ctx.store is None or not ctx.is_writer:
        return
    payload = {
        "state": state.to_payload(),
        "dynamics": ctx.dynamics.state_dict(),
        "positions": ctx.store.positions(),
    }
    ctx.store.save_checkpoint(payload)


def goal_reached(ctx: TrainContext, state: TrainState, s: float) -> Optional[str]:
    if s >= ctx.target:
        return "target_ln_n_over_L"
    if state.steps >= int(ctx.config.max_steps):
        return "max_steps"
    # A budget per invocation (a cluster job's time limit), so `diralign resume` continues.
    session = state.wall_seconds - ctx.session_wall_start
    if ctx.config.max_wall_seconds is not None and session >= float(ctx.config.max_wall_seconds):
        return "max_wall_seconds"
    return None


class _SignalFlag:
    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. notebooks with threads)
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train_loop(ctx: TrainContext, state: TrainState, progress=None) -> TrainState:
    """Advance ``state`` until a goal is met, logging and checkpointing on the way."""
    if not ctx.columns:
        prepare_context(ctx)
    config = ctx.config
    n = ctx.problem.n
    every_seconds = float(config.checkpoint_every_seconds)
    every_steps = int(config.checkpoint_every_steps)
    start = time.perf_counter()
    wall_at_start = state.wall_seconds
    ctx.session_wall_start = wall_at_start
    last_checkpoint = start
    direction = direction_of = None  # W/||W|| and the W it belongs to (path length)
    with _SignalFlag() as flag:
        while True:
            if ctx.distributed is None:  # distributed: rank 0's clock, shared by agree() below
                state.wall_seconds = wall_at_start + (time.perf_counter() - start)
            s = math.log(n) - state.ev.log_risk
            _note_milestones(ctx, state, s)
            if state.steps >= state.next_log_step or s >= state.next_log_ln:
                row = log_point(ctx, state)
                if progress is not None:
                    progress(state, row)
            reason = goal_reached(ctx, state, s)
            if reason is not None:
                state.stop_reason = reason
                break
            if direction_of is not state.w:  # W/||W|| of the last step is reused (one pass less)
                direction, direction_of = state.w / state.w.norm(), state.w
            old_direction = direction
            ctx.dynamics.gradient_wanted = state.steps + 1 >= state.next_log_step  # see Dynamics.gradient_wanted
            result = ctx.dynamics.step(state.w, state.ev, target=ctx.target)
            state.w, state.ev = result.w, result.ev
            state.steps += 1
            state.grad_evals += result.grad_evals
            state.rejected_steps += result.rejected
            direction, direction_of = state.w / state.w.norm(), state.w
            state.path_length += float((direction - old_direction).norm())
            for cb in ctx.callbacks:
                cb.on_step(ctx, state)
            now = time.perf_counter()
            due = (every_steps > 0 and state.steps % every_steps == 0) or (now - last_checkpoint >= every_seconds)
            stop = flag.signum is not None
            if ctx.distributed is not None:
                # Every rank must branch alike: rank 0's clock and checkpoint decision,
                # and stop if any rank was signalled.
                state.wall_seconds, due, stop = ctx.distributed.agree(wall_at_start + (now - start), due, stop)
            if due:
                if ctx.distributed is None:
                    state.wall_seconds = wall_at_start + (now - start)
                checkpoint(ctx, state)
                last_checkpoint = time.perf_counter()
            if stop:
                if ctx.distributed is None:
                    state.wall_seconds = wall_at_start + (time.perf_counter() - start)
                checkpoint(ctx, state)
                raise Interrupted(signal.Signals(flag.signum).name if flag.signum else "a signal to another rank")
    if state.last_logged_step != state.steps:
        row = log_point(ctx, state)
        if progress is not None:
            progress(state, row)
    checkpoint(ctx, state)
    return state


def _note_milestones(ctx: TrainContext, state: TrainState, s: float) -> None:
    from .losses import log_loss_at_zero

    if state.first_separable_step is None and state.ev.correct == ctx.problem.n:
        state.first_separable_step = state.steps
        state.first_separable_ln = s
    if state.below_loss_at_zero_step is None and state.ev.log_risk < log_loss_at_zero(ctx.problem.loss):
        state.below_loss_at_zero_step = state.steps
