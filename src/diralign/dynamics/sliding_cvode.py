"""The sliding (Filippov) flow of a ReLU / max-pool network, integrated by CVODE (BDF) between
pattern events: ``integrator=sliding``, what ``dynamics=flow`` picks for kinked models.

    diralign run srelu --set activation=relu --set dynamics=flow --set target_ln_n_over_L=30

While the sliding set ``S`` (the kinks held on their switching surfaces) stays the same and no
other kink changes side, the sliding field ``dW/ds = -v/||v||^2`` (:mod:`diralign.sliding`)
is smooth, and in the late phase it is stiff, like the flow of a smooth network
(:mod:`~diralign.dynamics.cvode`).  An explicit pair is then held to steps set by
stability: measured on the ReLU twin (seed 2, ``s`` = 15 to 30, no event left), Dormand-
Prince spent 4,686 gradient-equivalents where CVODE's BDF on the same field spent 124, the
two ending 1e-6 apart in direction.  So this integrator runs CVODE on the field of the
current ``S`` and checks, after every internal step, what the explicit sliding flow checks
after each of its steps (:class:`~diralign.dynamics.kinked.SlidingFlow`, whose event
handling it shares):

* a kink outside ``S`` changed side (a ReLU input's sign, a pool window's argmax);
* a held pool tie lost its window to a third entry;
* a held kink's Filippov weight ``theta`` left ``[0, 1]``.

The first of them is located inside the internal step by linear interpolation (of ``h`` or
``theta``) on CVODE's own interpolant, the point there is handed to the shared capture /
release logic, and the segment ends: the field has changed (a jump where a kink crossed,
another projection where one was captured or released), and BDF's history, a polynomial
through points of the old field, would carry the old field across.  A fresh CVODE solve
starts from the event point.

**Cost accounting** as for the explicit sliding flow: each field evaluation's own
gradient-equivalents (one forward + backward of ``log L - lam . h``, plus the multipliers'
forward differences and normals when needed), the point checked after each internal step
included.  CVODE's difference-quotient ``J v`` is one field evaluation each.

**Exact resume.**  As in the smooth CVODE flow, a checkpoint records the segment's start (its
point, its sliding set, the multipliers its field started from) and the outputs returned so
far; a resumed run replays the segment from there (not counted in ``grad_evals``) and goes
on, so it does the same work as an uninterrupted run.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from ..kinks import KinkSet, pattern_of
from ..sliding import FieldPoint
from .base import StepResult
from .cvode import RTOL_FLOOR, S_TIGHTEN, CvodeOptions, output_spacing, segment_end
from .kinked import SlidingFlow, StepStuck, crossings, leave_measure, overtaken

PAST = 1e-3  # an event is located this fraction (of the step to it) beyond the interpolated crossing
# theta this far outside [0, 1] releases a held kink.  A kink whose one-sided field grazes its
# surface (measured on the ReLU twin, seed 2: theta = -1.3e-4 for 0.5 of s) leaves it so slowly
# that the integrator's own error (rtol in W) carries it back across; released at 1e-9 it was
# captured and released again 515 times.  Held a little longer, the velocity misses only the
# normal speed |theta| delta |grad h|, second order in the margin over the time it takes theta
# to pass it.
RELEASE = 1e-3
# Where events come faster than CVODE can restart (a pool window tied among three entries on
# H-AlexNet: 250 events in 1e-6 of s), the explicit pair steps through them instead, its error
# control absorbing the chattering: after STUCK_SEGMENTS segments in a row that ended on an
# event within STUCK_ADVANCE (x max(s, 1)) of their start, EXPLICIT_STEPS explicit steps.
STUCK_SEGMENTS = 6
STUCK_ADVANCE = 1e-4
EXPLICIT_STEPS = 25
COUNTS = {"segments": "cvode_segments", "internal_steps": "cvode_internal_steps", "explicit_steps": "explicit_steps"}


class SlidingCvode(SlidingFlow):
    """CVODE (BDF, GMRES with difference-quotient ``J v``) on the sliding field, segment by
    segment between kink events."""

    release_margin = RELEASE

    def __init__(self, problem, config):
        super().__init__(problem, config)
        options = CvodeOptions.from_config(config)
        self.fraction = options.cvode_segment
        self.krylov_dim = options.cvode_krylov_dim
        self.segment: Optional[dict] = None  # start, end, outputs so far (checkpointed)
        self.solver = None
        self.checked: Optional[FieldPoint] = None  # the last internal step's end, events checked
        self.t_checked = 0.0
        self.replayed_grad_evals = 0.0
        self._cost = 0.0  # gradient-equivalents of the step under way
        self.stats = dict(self.stats, segments=0, internal_steps=0, explicit_steps=0, cvode_failures=0)
        self._stuck = 0  # segments in a row that ended on an event almost where they started
        self._explicit_left = 0
        self._loaded: Optional[dict] = None  # the checkpointed state, should its replay fail
        self._stuck_at: Optional[torch.Tensor] = None  # where the explicit pair last gave up

    # -- checkpoint ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        seg = self.segment
        state["segment"] = None if seg is None else {k: seg[k] for k in ("w0", "s0", "s1", "field", "outputs", "done")}
        state["explicit"] = (self._stuck, self._explicit_left)
        state["counts"] = {k: self.stats[k] for k in COUNTS}
        return state

    def report(self) -> dict:
        # How much of the run CVODE took and how much the explicit pair: where the explicit
        # steps dominate, the run's cost is theirs (H-AlexNet, see the README).
        return dict(super().report(), sliding_steps={COUNTS[k]: int(self.stats[k]) for k in COUNTS})

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        seg = state.get("segment")
        # A finished segment needs no replay: the next starts from the checkpointed point.
        self.segment = None if seg is None or seg["done"] else dict(seg, replay=True)
        self._loaded = state
        self.solver = self.checked = None
        self._stuck, self._explicit_left = state.get("explicit", (0, 0))
        self.stats.update(state.get("counts", {}))

    # -- CVODE on the field ---------------------------------------------------------------
    def _rhs(self, t, y, yp) -> None:
        point = self._eval(torch.from_numpy(np.array(y)).to(device=self.problem.device, dtype=self.problem.dtype))
        self._cost += point.grad_evals
        velocity = point.s_velocity()
        if not (math.isfinite(point.log_risk) and bool(torch.isfinite(velocity).all())):
            yp[:] = np.nan  # CVODE retries with a smaller step
            return
        yp[:] = velocity.detach().to(device="cpu", dtype=torch.float64).numpy()

    def _segment_rtol(self, s1: float) -> float:
        # As in the smooth CVODE flow: the margins' absolute error stays bounded far out.
        return max(self.rtol * min(1.0, S_TIGHTEN / max(s1, 1.0)), RTOL_FLOOR)

    def _open(self, seg: dict) -> None:
        """A fresh CVODE solve from the segment's start, with the field as it was there."""
        from sksundae.cvode import CVODE

        field = self.field
        state = seg["field"]
        field.sliding = KinkSet.from_state(state["sliding"])
        field.load_lam_state(state["lam"])
        field.gram_chol = field.normals = None
        field.pattern = None
        w0 = seg["w0"].to(device=self.problem.device, dtype=self.problem.dtype)
        if len(field.sliding):
            _, _, sites = field.watch(w0)
            self._cost += field.refresh_normals(w0, sites) + field.FORWARD
        rtol = self._segment_rtol(seg["s1"])
        atol = max(self.atol, rtol * float(w0.norm()) / math.sqrt(max(w0.numel(), 1)))
        self.solver = CVODE(
            self._rhs,
            method="BDF",
            linsolver="gmres",
            krylov_dim=self.krylov_dim,
            rtol=rtol,
            atol=atol,
            max_num_steps=1_000_000,
        )
        y0 = seg["w0"].to(device="cpu", dtype=torch.float64).numpy().copy()
        self.solver.init_step(seg["s0"], y0)
        self.checked, self.t_checked = self._eval(w0), seg["s0"]
        self._cost += self.checked.grad_evals
        # CVODE integrates this piece, continued past its surfaces; the checks after each
        # internal step find where the true pattern leaves it.
        field.pattern = pattern_of(self.checked.sites)
        self.stats["segments"] += 1

    def _start(self, w: torch.Tensor, ev, target: Optional[float]) -> None:
        self.field.pattern = None
        p0 = self._point_at(w, ev)
        if p0 is not self.point:
            self._cost += p0.grad_evals
        p0, spent, _ = self._settle(p0)
        self._cost += spent
        s0 = math.log(self.problem.n) - p0.log_risk
        field = self.field
        self.segment = {
            "w0": p0.w.detach().clone(),
            "s0": s0,
            "s1": segment_end(s0, target, self.fraction),
            "field": {"sliding": field.sliding.state(), "lam": field.lam_state()},
            "outputs": [],
            "done": False,
        }
        self._open(self.segment)

    def _replay(self, w: torch.Tensor) -> bool:
        """Redo the checkpointed segment up to its last output; True where it lands on ``w``."""
        seg = self.segment
        seg.pop("replay", None)
        before = self._cost
        self.replaying = True
        try:
            self._open(seg)
            point = self.checked
            for t_out in seg["outputs"]:
                point, event = self._advance(t_out, seg)
                if event:
                    return False
        finally:
            self.replaying = False
            self.replayed_grad_evals += self._cost - before
            self._cost = before
        if point is not None and torch.equal(point.w, w):
            self.point = point
            return True
        return False

    def _interpolate(self, t: float) -> torch.Tensor:
        result = self.solver.step(t)  # inside the last internal step: CVODE's interpolant, no new step
        if not result.success:
            raise FloatingPointError(f"sliding flow: {result.message} at s = {result.t:.6g}")
        return torch.from_numpy(np.array(result.y)).to(device=self.problem.device, dtype=self.problem.dtype)

    def _event_fraction(self, p0: FieldPoint, p1: FieldPoint) -> Optional[float]:
        """Where in ``[p0, p1]`` (a fraction) the first kink event happened, if one did."""
        field = self.field
        fractions = []
        crossed, frac = crossings(p0.sites, p1.sites, field.sliding, 1.0)
        if len(crossed):
            fractions.append(float(frac.min()))
        if len(field.sliding):
            lost, frac = overtaken(p0.sites, p1.sites, field.sliding, 1.0)
            if len(lost):
                fractions.append(float(frac.min()))
        if fractions:
            # A crossing changes the field, and with it the held kinks' weights: theta jumps
            # there (measured on the ReLU twin: 0.93 to 4.09 at one crossing), so interpolating
            # theta across it would place a release where nothing happens.
            return min(fractions)
        if len(field.sliding):
            excess1 = leave_measure(p1.theta, p1.delta)
            leaving = excess1 > self.release_margin
            if bool(leaving.any()) and len(p0.theta) != len(p1.theta):
                # the held set changed inside the step (a kink dropped): no theta to interpolate
                fractions.append(1.0)
            elif bool(leaving.any()):
                excess0 = leave_measure(p0.theta, p0.delta)[leaving]
                e1 = excess1[leaving]
                # theta's excess rises through the margin inside the step (linearly, to first order)
                margin = self.release_margin
                frac = torch.where(excess0 < margin, (margin - excess0) / (e1 - excess0), 0.0)
                fractions.append(float(frac.clamp(0.0, 1.0).min()))
        return min(fractions) if fractions else None

    def _advance(self, t_out: float, seg: dict) -> tuple[FieldPoint, bool]:
        """Step CVODE until it passes ``t_out`` (returning the point there) or until an event
        (returning the point after it, the segment then done)."""
        while self.t_checked < t_out:
            result = self.solver.step(t_out, method="onestep", tstop=seg["s1"])
            if not result.success:
                raise FloatingPointError(f"sliding flow: {result.message} at s = {result.t:.6g}")
            t_new = float(result.t)
            y = torch.from_numpy(np.array(result.y)).to(device=self.problem.device, dtype=self.problem.dtype)
            p_new = self._eval(y)
            self._cost += p_new.grad_evals
            self.stats["internal_steps"] += 1
            fraction = self._event_fraction(self.checked, p_new)
            if fraction is not None:
                self.field.pattern = None  # the event point and its captures see the true pattern
                t_event = self.t_checked + min(1.0, fraction * (1 + PAST) + 1e-9) * (t_new - self.t_checked)
                p_event = p_new if t_event >= t_new else self._eval(self._interpolate(t_event))
                if p_event is not p_new:
                    self._cost += p_event.grad_evals
                p_after, spent, _ = self._events(self.checked, p_event)
                self._cost += spent
                self.stats["events"] += spent
                seg["done"] = True
                self.solver = self.checked = None
                return p_after, True
            self.checked, self.t_checked = p_new, t_new
        if self.t_checked == t_out:
            return self.checked, False
        p_out = self._eval(self._interpolate(t_out))
        self._cost += p_out.grad_evals
        return p_out, False

    def _next_time(self, seg: dict, t_now: float, target: Optional[float]) -> tuple[float, bool]:
        """The next output: on the trainer's log grid (at most ``s/16`` apart) in the *true*
        clock, shifted by the drift (true ``ln(n/L)`` minus CVODE's ``s``) seen at the last
        checked point; the segment's end (the target, aimed past by the drift) last."""
        drift = (math.log(self.problem.n) - self.checked.log_risk) - self.t_checked
        spacing = output_spacing(t_now + drift, self.log_spacing)
        true_next = (math.floor((t_now + drift) / spacing + 0.25) + 1) * spacing
        t_out = true_next - drift + 1e-7 * max(abs(true_next), 1.0)
        s1 = seg["s1"]
        if t_out < s1 - 0.25 * spacing:
            return t_out, False
        if target != s1:
            return s1, True
        # Where the true clock runs ahead, stop that much early (CVODE interpolates); where it
        # lags, at s1, and the next segment, from the true ln(n/L), covers the rest.
        return max(min(s1, s1 - drift), t_now + 1e-9 * max(abs(t_now), 1.0)), True

    def _step(self, w, ev, target: Optional[float]) -> StepResult:
        if self._explicit_left > 0:
            self._explicit_left -= 1
            self.stats["explicit_steps"] += 1
            self.segment, self.solver, self.checked = None, None, None
            self.field.pattern = None
            try:
                result = super()._step(w, ev, target)
                self._stuck_at = None
                return result
            except StepStuck:
                self._explicit_left = 0  # the explicit pair is stuck here too: back to CVODE
                self._stuck_at = w
        self._cost = 0.0
        seg = self.segment
        if seg is not None and seg.get("replay"):
            if not self._replay(w):
                # another machine or thread count: start afresh from the checkpointed point,
                # with the field as the checkpoint left it (the replay changed it)
                SlidingFlow.load_state_dict(self, self._loaded)
                seg = None
        elif seg is not None and (seg["done"] or self.solver is None or self.point is None
                                  or not torch.equal(self.point.w, w)):
            seg = None  # finished, or called from another point than the one returned last
        if seg is None:
            self._start(w, ev, target)
            seg = self.segment
        t_now = seg["outputs"][-1] if seg["outputs"] else seg["s0"]
        t_out, last = self._next_time(seg, t_now, target)
        try:
            point, event = self._advance(t_out, seg)
        except FloatingPointError:
            # CVODE's corrector failed at its minimum step.  Measured on H-AlexNet near s = 26.4
            # with ~70 kinks held, most likely from a held kink whose normal had vanished (its
            # multiplier was noise over the Gram's ridge).  Such kinks are now dropped, and the
            # run to s = 30 had no failure left.  Should another cause come, the explicit pair
            # takes over for a while.
            if self.replaying:
                raise
            if self._stuck_at is not None and torch.equal(self._stuck_at, w):
                raise StepStuck(
                    f"sliding flow: neither CVODE nor the explicit pair can step at ln(n/L) = "
                    f"{math.log(self.problem.n) - ev.log_risk:.6g} ({len(self.field.sliding)} kinks held)"
                ) from None
            self.stats["cvode_failures"] += 1
            self.segment, self.solver, self.checked = None, None, None
            self.field.pattern = None
            self._explicit_left = EXPLICIT_STEPS
            self._spent += self._cost  # the failed attempt's evaluations are counted with the next step
            return self._step(w, ev, target)
        if not event:
            seg["outputs"].append(t_out)
            seg["done"] = last
        else:
            s_now = math.log(self.problem.n) - point.log_risk
            short = s_now - seg["s0"] < STUCK_ADVANCE * max(abs(s_now), 1.0)
            self._stuck = self._stuck + 1 if short else 0
            if self._stuck >= STUCK_SEGMENTS:
                self._stuck, self._explicit_left = 0, EXPLICIT_STEPS
        self.point = point
        return StepResult(point.w, self._evaluation(point), self._take(self._cost), 0)
