"""The training loop, the only one: goals, log schedule, milestones, checkpoints, signals.

    python -c "from diralign.trainer import Trainer; help(Trainer)"

No experiment logic: experiments plug in through :class:`Callback` objects, data
parallelism through a :class:`Coordinator` (``diralign.distributed`` provides the
multi-process one), and storage through an optional run-directory writer.  The same loop
trains the NTK model of Fig. 1 and follows dynamics in the benchmarks (``store=None``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import probes
from .dynamics import Dynamics, StepAborted
from .errors import UserError
from .losses import log_loss_at_zero
from .options import Options, option
from .problem import Evaluation, Problem
from .rundir import schema
from .runtime import ProblemOptions
from .stall import StallWatch
from .stall import fresh_state as stall_state


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint has been written."""


# -- options ------------------------------------------------------------------------------
@dataclass
class GoalOptions(Options):
    SECTION = "goals"
    target_ln_n_over_L: float = option(1000.0, "train until ln(n/L) reaches this (the paper's axis)")  # noqa: N815
    max_steps: int = option(10_000_000, "stop after this many accepted steps")
    max_wall_seconds: Optional[float] = option(
        None, "wall-clock budget per invocation, honoured inside long steps (diralign resume gets as long again)"
    )
    stall_seconds: float = option(
        60.0,
        "stop (stop_reason stalled) when ln(n/L) stops rising over doubling windows of training time at least "
        "this long (diralign.stall); 0: never",
    )
    stall_tolerance: float = option(
        1e-3, "a window's rise of ln(n/L) at most this times max(1, ln(n/L)) is no progress"
    )

    def validate(self) -> None:
        target = self.target_ln_n_over_L
        if target is not None and not math.isfinite(target):
            raise UserError(f"target_ln_n_over_L must be a finite number, got {target}")
        if self.max_steps < 0:
            raise UserError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.max_wall_seconds is not None and not (
            self.max_wall_seconds > 0 and math.isfinite(self.max_wall_seconds)
        ):
            raise UserError(
                f"max_wall_seconds must be a positive number of seconds (or none), got {self.max_wall_seconds}"
            )
        if not (self.stall_seconds >= 0 and math.isfinite(self.stall_seconds)):
            raise UserError(f"stall_seconds must be >= 0 seconds (0: never stop on a stall), got {self.stall_seconds}")
        if not (self.stall_tolerance >= 0 and math.isfinite(self.stall_tolerance)):
            raise UserError(f"stall_tolerance must be a finite number >= 0, got {self.stall_tolerance}")


@dataclass
class LoggingOptions(Options):
    SECTION = "logging"
    log_every_ln: float = option(0.0, "spacing of log points in ln(n/L); 0: target / 200")
    log_step_growth: float = option(1.25, "also log at geometrically growing step counts (this factor)")
    store_directions_max_params: int = option(2_000_000, "keep W/||W|| at log points (angle to final) if P <= this")
    checkpoint_every_seconds: float = option(30.0, "checkpoint at least this often (seconds of training)")
    checkpoint_every_steps: int = option(0, "also checkpoint every this many steps (0: time-based only)")
    tensorboard: bool = option(False, "also write TensorBoard events into DIR/tensorboard/ as the run goes")
    sharpness: bool = option(
        False,
        "log the top Hessian eigenvalue of log L at log points (warm-started Lanczos; its "
        "Hessian-vector products, 2 gradient evaluations each, count in grad_evals)",
    )

    def validate(self) -> None:
        if not (self.log_every_ln >= 0 and math.isfinite(self.log_every_ln)):
            raise UserError(f"log_every_ln must be >= 0 (0: target / 200), got {self.log_every_ln}")
        if not self.log_step_growth >= 1:
            raise UserError(f"log_step_growth must be >= 1 (1: a log point every step), got {self.log_step_growth}")
        if not self.checkpoint_every_seconds > 0 or self.checkpoint_every_steps < 0:
            raise UserError("checkpoint_every_seconds must be positive and checkpoint_every_steps >= 0")


# -- state --------------------------------------------------------------------------------
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
    stop_message: Optional[str] = None  # why, in words, where the reason needs them (stalled)
    stall: dict = field(default_factory=stall_state)  # the stall goal's windows (diralign.stall)
    milestones: dict = field(default_factory=dict)  # f"{m:g}" -> alignment cos measured at ln(n/L) = m
    callbacks: dict = field(default_factory=dict)

    def to_payload(self) -> dict:
        ev = self.ev
        return {
            "w": self.w,
            "ev": {"log_risk": ev.log_risk, "grad": ev.grad, "margins": ev.margins, "correct": ev.correct},
            **{k: getattr(self, k) for k in _SCALAR_FIELDS},
            "stop_message": self.stop_message,
            "stall": dict(self.stall),
            "milestones": dict(self.milestones),
            "callbacks": self.callbacks,
        }

    @classmethod
    def from_payload(cls, payload: dict, device, dtype) -> TrainState:
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
        state.stop_message = payload.get("stop_message")
        state.stall = dict(payload.get("stall") or stall_state())
        state.milestones = dict(payload.get("milestones", {}))
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


def initial_state(problem: Problem, w0: torch.Tensor) -> TrainState:
    return TrainState(w=w0, ev=problem.evaluate(w0), grad_evals=1)


# -- plug-ins -----------------------------------------------------------------------------
class Callback:
    """Experiment hooks.  State they keep goes in ``state.callbacks[self.key]`` so that it
    is checkpointed with the run."""

    key = "callback"

    def on_step(self, trainer: Trainer, state: TrainState) -> None:
        pass

    def on_log(self, trainer: Trainer, state: TrainState, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Coordinator:
    """A single process: every decision is its own.  ``diralign.distributed.DataParallel``
    implements the same methods with collectives, so the loop never asks which it has."""

    is_writer = True
    world_size = 1

    def prepare(self, setup, config):
        """The experiment's setup as this process will train it: in the run's pieces (a shard
        of them, for data parallelism; ``pieces`` is resolved by the runner)."""
        count = ProblemOptions.from_config(config).pieces or 1
        if count == 1:
            return setup
        problem = setup.problem
        if problem.X.shape[0] < count:
            raise UserError(f"{problem.X.shape[0]} examples cannot be split into pieces={count}; use fewer pieces")
        return dataclasses.replace(setup, problem=problem.split(count))

    def adopt(self, state: TrainState) -> None:
        """A resumed state: check it fits the problem (and is shared by every process)."""

    def complete(self, ev: Evaluation) -> Evaluation:
        """The evaluation with all ``n`` margins (a shard's process gathers the others')."""
        return ev

    def agree(self, wall: float, due: bool, stop: bool, stalled: bool = False) -> tuple[float, bool, bool, bool]:
        """The shared wall clock, checkpoint decision, stop decision (a signal) and stall verdict."""
        return wall, due, stop, stalled

    def begin_step(self, dynamics: Dynamics, wanted) -> None:
        """A step begins: ``wanted()`` says why to abandon it (None: go on).  A single process
        asks at each evaluation (``Dynamics.check_abort``); processes of a distributed run ask
        at each all-gather, so that all abandon the step at the same evaluation."""
        dynamics.abort_requested = wanted

    def end_step(self, dynamics: Dynamics) -> None:
        dynamics.abort_requested = None

    def check_in_sync(self, state: TrainState) -> None:
        """Before a checkpoint: the state is complete and identical on every process."""


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


# -- the loop -------------------------------------------------------------------------------
class Trainer:
    """Advance a :class:`TrainState` to its goals with one dynamics.

    ``store``: a :class:`~diralign.rundir.RunWriter` (logs, checkpoints) or ``None`` (an
    in-memory run: the NTK of Fig. 1, a benchmark's follower).  ``goals`` and ``logging``
    are the parts of the config the loop reads; ``milestones`` are the ``ln(n/L)`` values
    at which alignment is measured exactly (``alignment_cos_at_ln10`` ...): the dynamics is
    asked to land on each, so the value does not depend on the run's target.
    """

    def __init__(
        self,
        problem: Problem,
        dynamics: Dynamics,
        goals: GoalOptions,
        logging: LoggingOptions,
        store=None,
        callbacks=(),
        coordinator: Optional[Coordinator] = None,
        instruments: bool = True,
        milestones=schema.ALIGNMENT_MILESTONES,
        stall_goal: bool = True,
    ):
        self.problem = problem
        self.dynamics = dynamics
        self.goals = goals
        self.logging = logging
        self.store = store
        self.callbacks = list(callbacks)
        self.coordinator = coordinator or Coordinator()
        self.instruments = instruments  # False: no log rows at all (a benchmark's lean follower)
        self.stall_goal = stall_goal  # False: no stall goal (a benchmark measures how far a dynamics gets)
        self.target = float(goals.target_ln_n_over_L)
        self.milestones = tuple(m for m in milestones if m <= self.target)
        spacing = float(logging.log_every_ln)
        self.log_spacing = spacing if spacing > 0 else max(self.target / 200.0, 1e-3)
        self.groups = probes.block_groups(problem.names)
        self.columns = list(schema.LOG_COLUMNS)
        for key in self.groups:
            self.columns += [schema.share_column(key), schema.block_alignment_column(key)]
        self.store_directions = problem.dim <= int(logging.store_directions_max_params)
        self.sharpness = None
        if logging.sharpness:
            from .sharpness import Sharpness

            self.sharpness = Sharpness(problem)
            self.columns.append(schema.SHARPNESS)
        if dynamics.step_size is not None:
            self.columns.append(schema.STEP_SIZE)
        self.session_wall_start = 0.0
        dynamics.log_spacing = self.log_spacing

    # -- rows ----------------------------------------------------------------------------
    def make_row(self, state: TrainState) -> dict:
        row = probes.panel(self.problem, state.w, state.ev, self.problem.degree)
        row.update(
            {
                schema.STEP: state.steps,
                schema.GRAD_EVALS: state.grad_evals,
                schema.REJECTED_STEPS: state.rejected_steps,
                schema.WALL_SECONDS: state.wall_seconds,
                schema.PATH_LENGTH: state.path_length,
            }
        )
        if state.ev.grad is not None:
            row.update(
                probes.block_panel(self.problem, state.w, state.ev.grad, self.groups, row.get(schema.ALIGNMENT_COS))
            )
        if schema.STEP_SIZE in self.columns:
            row[schema.STEP_SIZE] = float(self.dynamics.step_size) if state.steps > 0 else math.nan
        if self.sharpness is not None:
            value, cost = self.sharpness.measure(state.w)
            state.grad_evals += cost
            row[schema.SHARPNESS] = value
            row[schema.GRAD_EVALS] = state.grad_evals
        return row

    def _full_evaluation(self, state: TrainState) -> None:
        if state.ev.grad is None:
            # Dynamics that skip the full-data gradient between log points (minibatch sgd)
            # get it here, so alignment is measured at every log point.
            state.ev = self.problem.evaluate(state.w)
            state.grad_evals += 1
        state.ev = self.coordinator.complete(state.ev)

    def log_point(self, state: TrainState) -> dict:
        self._full_evaluation(state)
        row = self.make_row(state)
        s = row[schema.LN_N_OVER_L]
        state.next_log_ln = (math.floor(s / self.log_spacing) + 1) * self.log_spacing
        state.next_log_step = max(state.steps + 1, int(math.ceil(state.steps * float(self.logging.log_step_growth))))
        state.last_logged_step = state.steps
        if self.store is not None:
            norm = row[schema.PARAM_NORM]
            margins = probes.normalized_margins(state.ev.margins, norm, self.problem.degree)
            direction = (state.w / norm).detach().cpu().numpy() if self.store_directions else None
            self.store.append_row(row, margins.detach().cpu().numpy().astype(np.float32), direction)
        for cb in self.callbacks:
            cb.on_log(self, state, row)
        return row

    def checkpoint(self, state: TrainState, dynamics_state: Optional[dict] = None) -> None:
        self.coordinator.check_in_sync(state)
        if self.store is None:
            return
        self.store.save_checkpoint(
            {
                schema.CKPT_STATE: state.to_payload(),
                schema.CKPT_DYNAMICS: self.dynamics.state_dict() if dynamics_state is None else dynamics_state,
                schema.CKPT_POSITIONS: self.store.positions(),
                schema.CKPT_INSTRUMENTS: self.instrument_state(),
            }
        )

    def instrument_state(self) -> dict:
        # The sharpness instrument's warm start: without it a resumed run's next log point
        # would start Lanczos cold (other products, so other grad_evals than the uninterrupted run).
        return {} if self.sharpness is None else {"sharpness": self.sharpness.state()}

    def load_instrument_state(self, state: Optional[dict]) -> None:
        if self.sharpness is not None and state and "sharpness" in state:
            self.sharpness.load_state(state["sharpness"])

    def goal_reached(self, state: TrainState, s: float) -> Optional[str]:
        if s >= self.target:
            return "target_ln_n_over_L"
        if state.steps >= int(self.goals.max_steps):
            return "max_steps"
        if self._out_of_time(state.wall_seconds):
            return "max_wall_seconds"
        return None

    def _out_of_time(self, wall: float) -> bool:
        # A budget per invocation (a cluster job's time limit), so `diralign resume` continues.
        budget = self.goals.max_wall_seconds
        return budget is not None and wall - self.session_wall_start >= float(budget)

    def _landing(self, s: float) -> float:
        """The next ``ln(n/L)`` a dynamics should land on: a milestone, or the target."""
        for m in self.milestones:
            if s < m:
                return m
        return self.target

    def _milestones(self, state: TrainState, s: float) -> None:
        if self.problem.n == 0:
            return
        if state.first_separable_step is None and state.ev.correct == self.problem.n:
            state.first_separable_step = state.steps
            state.first_separable_ln = s
        if state.below_loss_at_zero_step is None and state.ev.log_risk < log_loss_at_zero(self.problem.loss):
            state.below_loss_at_zero_step = state.steps
        for m in self.milestones:
            key = f"{m:g}"
            # A flow lands on m (to its clock's drift, ~1e-9 relative); a discrete method's
            # first iterate at or past m is the one it has there.
            if key not in state.milestones and s >= m * (1 - 1e-9):
                if state.ev.grad is None:
                    self._full_evaluation(state)
                state.milestones[key] = probes.cosine(state.w, -state.ev.grad)

    # -- run -------------------------------------------------------------------------------
    def train(self, state: TrainState, progress=None) -> TrainState:
        """Advance ``state`` until a goal is met, logging and checkpointing on the way."""
        n = self.problem.n
        every_seconds = float(self.logging.checkpoint_every_seconds)
        every_steps = int(self.logging.checkpoint_every_steps)
        start = time.perf_counter()
        wall_at_start = state.wall_seconds
        self.session_wall_start = wall_at_start
        last_checkpoint = start
        state.stop_reason = state.stop_message = None  # a resumed run's last reason no longer holds
        watch = StallWatch(
            self.goals.stall_seconds if self.stall_goal else 0.0, self.goals.stall_tolerance, state.stall, n
        )
        direction = direction_of = None  # W/||W|| and the W it belongs to (path length)

        def clock() -> float:
            return wall_at_start + (time.perf_counter() - start)

        with _SignalFlag() as flag:

            def wanted() -> Optional[str]:  # why to abandon the current step now, if at all
                if flag.signum is not None:
                    return "signal"
                if self.dynamics.replaying:  # work the checkpoint holds: no progress to judge
                    return None
                wall = clock()
                if self._out_of_time(wall):
                    return "max_wall_seconds"
                return "stalled" if watch.stalled(wall) else None

            self.dynamics.observe = watch.observe_log_risk
            try:
                watch.observe_s(math.log(n) - state.ev.log_risk)
                watch.stalled(state.wall_seconds)  # opens the first window (a fresh run)
                while True:
                    s = math.log(n) - state.ev.log_risk
                    watch.observe_s(s)
                    self._milestones(state, s)
                    if self.instruments and (state.steps >= state.next_log_step or s >= state.next_log_ln):
                        row = self.log_point(state)
                        if progress is not None:
                            progress(state, row)
                    reason = self.goal_reached(state, s)
                    if reason is not None:
                        state.stop_reason = reason
                        break
                    if direction_of is not state.w:  # W/||W|| of the last step is reused (one pass less)
                        direction, direction_of = state.w / state.w.norm(), state.w
                    old_direction = direction
                    self.dynamics.gradient_wanted = self.instruments and state.steps + 1 >= state.next_log_step
                    before = copy.deepcopy(self.dynamics.state_dict())
                    self.coordinator.begin_step(self.dynamics, wanted)
                    try:
                        result = self.dynamics.step(state.w, state.ev, target=self._landing(s))
                    except StepAborted as aborted:
                        # The step never happened: the controller goes back to where it was.
                        # (Every process of a distributed run got the same reason at the same
                        # all-gather.)
                        self.dynamics.load_state_dict(before)
                        state.wall_seconds = clock()
                        if aborted.reason == "signal":
                            self.checkpoint(state)
                            raise Interrupted(
                                signal.Signals(flag.signum).name if flag.signum else "a signal to another rank"
                            ) from None
                        state.stop_reason = aborted.reason
                        state.stop_message = (
                            getattr(aborted, "message", None) or watch.message if aborted.reason == "stalled" else None
                        )
                        break
                    finally:
                        self.coordinator.end_step(self.dynamics)
                    state.w, state.ev = result.w, result.ev
                    state.steps += 1
                    state.grad_evals += result.grad_evals
                    state.rejected_steps += result.rejected
                    direction, direction_of = state.w / state.w.norm(), state.w
                    state.path_length += float((direction - old_direction).norm())
                    watch.observe_s(math.log(n) - state.ev.log_risk)
                    now = time.perf_counter()
                    due = (every_steps > 0 and state.steps % every_steps == 0) or (
                        now - last_checkpoint >= every_seconds
                    )
                    # Every process must branch alike: one clock, one checkpoint decision, and a
                    # stop if any process was signalled or saw the run stall.
                    wall = wall_at_start + (now - start)
                    state.wall_seconds, due, stop, stalled = self.coordinator.agree(
                        wall, due, flag.signum is not None, watch.stalled(wall)
                    )
                    for cb in self.callbacks:
                        cb.on_step(self, state)
                    if state.stop_reason is not None:  # a callback's own goal (a benchmark's caps)
                        break
                    if due:
                        self.checkpoint(state)
                        last_checkpoint = time.perf_counter()
                    if stop:
                        self.checkpoint(state)
                        raise Interrupted(
                            signal.Signals(flag.signum).name if flag.signum else "a signal to another rank"
                        )
                    if stalled:
                        state.stop_reason = "stalled"
                        state.stop_message = watch.message or "the risk has stalled on another process's clock"
                        break
            finally:
                self.dynamics.observe = None
        if self.instruments and state.last_logged_step != state.steps:
            row = self.log_point(state)
            if progress is not None:
                progress(state, row)
        self.checkpoint(state)
        return state
