"""The gradient flow of a ReLU / max-pool network, with its sliding modes: ``dynamics=flow``
for kinked models.

    diralign run srelu --set activation=relu --set dynamics=flow --set target_ln_n_over_L=30

Between pattern changes the flow's right-hand side is smooth (:mod:`diralign.kinks`); on
the switching surfaces where both sides push toward the surface it slides
(:mod:`diralign.sliding`).  This integrator keeps a *sliding set* ``S`` of kinks held on
their surfaces and integrates the smooth sliding field ``dW/ds = -v/||v||^2`` of that set
with an embedded Runge-Kutta pair and error control; after each accepted step it handles
the *events*:

* a kink outside ``S`` that changed side (a ReLU input changed sign, a pool window's
  argmax moved): when the flow on its new side pushes it back (``dh/ds`` against ``h``),
  both sides point at the surface, so it slides: it joins ``S`` and the point is projected
  onto the surfaces (Newton on ``h = 0``).  Otherwise the crossing is transversal and the
  error control of the step that crossed it has already accounted for the jump in the field.
* a kink in ``S`` whose Filippov weight ``theta`` left ``[0, 1]`` stops sliding: it leaves
  ``S`` to the side it points to.  The field is continuous there (``theta = 0`` or ``1`` is
  the one-sided field), so no step needs to be cut.

The returned evaluation's ``grad`` is the Filippov gradient ``v``: the alignment the
probes report is ``cos(W, dW/dt)``, the flow's own direction of motion, which is what
Theorem 4.1 speaks of; the one-sided autodiff gradient on a sliding surface is not (it
differs from ``v`` by the normal components, measured ~0.15 in cosine on the ReLU twin).
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Optional

import torch

from ..errors import UserError
from ..kinks import KinkSet, pool_crossings, relu_crossings, unsupported_kinks
from ..problem import Evaluation
from ..runtime import RuntimeOptions
from ..sliding import FieldPoint, SlidingField, live_normals, project
from .base import Dynamics, StepAborted, StepResult, one_thread
from .flow import _A, _C, _E, FlowOptions

DEBUG = False
RELEASE_MARGIN = 1e-9  # theta this far outside [0, 1] releases a kink
SIGNIFICANT = 0.1  # a crossing whose jump could move W by this x rtol ||W|| in a step is an event
PROBE_EVERY = 25  # steps between refreshes of the normals' scale estimates
MAX_SHORT_CUTS = 3  # then the crossing is left to the error control
NUDGE = 1e-12  # a released kink is moved this far (x ||W||) off its surface, to its side
NEAR_DISTANCE = 1e-2  # a crossing this close (x rtol ||W||) ahead: hold the kink on its surface now
# Tries of one step before giving up on it.  Without a bound, the retry loop ran without end
# where cuts toward a crossing and captures near it alternate (ReLU MLP seed 2 near s = 17.9,
# H-AlexNet on 16 digits near s = 27.8); budgets still stopped such runs, but only they did.
MAX_TRIES = 200


class StepStuck(StepAborted):
    """No step accepted after ``MAX_TRIES`` tries: the run stops as stalled, its last accepted
    point checkpointed, with this reason in the summary."""

    def __init__(self, message: str):
        super().__init__("stalled")
        self.message = message


class SlidingFlow(Dynamics):
    """Dormand-Prince 5(4) on the sliding field, with capture / release events."""

    name = "flow"
    faithful_to_flow = True
    release_margin = RELEASE_MARGIN

    def __init__(self, problem, config):
        super().__init__(problem, config)
        options = FlowOptions.from_config(config)
        self.rtol, self.atol = options.rtol, options.atol
        unsupported = unsupported_kinks(problem.model)
        if unsupported:
            raise UserError(
                f"integrator=sliding handles ReLU and 2-D max-pool kinks only; this model also has {', '.join(unsupported)} "
                "(use integrator=cvode or dopri5, or dynamics=gd)"
            )
        # One intra-op thread unless ``threads`` is set (as for CVODE): the evaluations are many
        # and small, and on a shared 2-core machine two OpenMP threads spin at every barrier
        # (measured on the ReLU twin under load: 37 s with two, 17 s with one).
        self.single_thread = RuntimeOptions.from_config(config).threads == 0 and problem.device.type == "cpu"
        self.field = SlidingField(problem)
        self.field.tolerance = 0.1 * self.rtol
        self.field.before_forward = self.check_abort  # budgets and signals act between passes
        self.h: Optional[float] = None
        self.point: Optional[FieldPoint] = None
        self._spent = 0.0  # fractional gradient-equivalents not yet reported
        self.events = {"captured": 0, "released": 0, "crossed": 0}
        self._short_cuts = 0  # consecutive steps cut at a predicted crossing that did not come
        self._cutting = False
        self.stats = {k: 0.0 for k in ("accepted", "rejected", "events", "accepted_with_cross", "rejected_with_cross")}
        self._cut_from: Optional[float] = None  # the step size before an event cut
        self._probes = None  # directional derivatives of the kink sites along random directions
        self._probe_w: Optional[torch.Tensor] = None
        self._probe_age = 0

    # -- checkpoint -------------------------------------------------------------------
    # Everything the next step reads, so that a resumed run takes the same steps: the point's
    # own evaluation is redone from the same inputs (multipliers it started from, normals
    # recomputed where they were last computed, probes where they were last drawn).
    def state_dict(self) -> dict:
        field = self.field
        return {
            "h": self.h,
            "sliding": field.sliding.state(),
            # also where the normals went stale during the last evaluation: that evaluation,
            # redone on resume, must start from the normals it had (H-AlexNet: 1.7e-11 apart)
            "normals_w": field.normals_w if field.normals is not None else None,
            "normals_context": None if field.normals is None or field.normals_context is None else field.normals_context.state(),
            "lam": field.lam_state(),
            "point_lam_in": None if self.point is None else self.point.lam_in,
            "probe_w": self._probe_w,
            "probe_age": self._probe_age,
            "cut": (self._cut_from, self._short_cuts),
            "spent": self._spent,
            "events": dict(self.events),
            "dropped": self.field.dropped,
        }

    def load_state_dict(self, state: dict) -> None:
        field = self.field
        self.h = state["h"]
        field.sliding = KinkSet.from_state(state["sliding"])
        field.gram_chol = field.normals = None
        self._normals_w = state.get("normals_w")
        context = state.get("normals_context")
        self._normals_context = None if context is None else KinkSet.from_state(context)
        field.load_lam_state(state.get("lam"))
        self._resume_lam_in = state.get("point_lam_in")
        self._probe_w, self._probe_age = state.get("probe_w"), int(state.get("probe_age", 0))
        self._probes = None
        self._cut_from, self._short_cuts = state.get("cut", (None, 0))
        self._spent = float(state.get("spent", 0.0))
        self.events = dict(state.get("events", self.events))
        field.dropped = int(state.get("dropped", 0))
        self.point = None

    def report(self) -> dict:
        return {
            "kink_events": dict(self.events, dropped=self.field.dropped),
            "sliding_kinks": len(self.field.sliding),
        }

    # -- helpers ------------------------------------------------------------------------
    def _point_at(self, w: torch.Tensor, ev: Evaluation) -> FieldPoint:
        """The FSAL point at ``w``: kept from the last step, or evaluated afresh (after a resume
        or an aborted step, from the inputs the original evaluation had)."""
        if self.point is not None and torch.equal(self.point.w, w):
            return self.point
        field = self.field
        normals_w = getattr(self, "_normals_w", None)
        if normals_w is not None and len(field.sliding):
            field.restore_normals(normals_w, getattr(self, "_normals_context", None))
        self._normals_w = self._normals_context = None
        if self._probe_w is not None and self._probes is None:
            self._probes, _ = field.probe_normals(self._probe_w, seed=0)
        lam_in = getattr(self, "_resume_lam_in", None)
        self._resume_lam_in = None
        after = field.lam_state()
        if lam_in is not None:
            field.load_lam_state(lam_in)
        point = self._eval(w)
        if lam_in is not None:
            field.load_lam_state(after)
        return point

    def _eval(self, w: torch.Tensor) -> FieldPoint:
        point = self.field.evaluate(w)
        if self.observe is not None:  # the trainer's stall goal counts progress inside steps
            self.observe(point.log_risk)
        return point

    def _error_norm(self, err: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
        # Relative to each weight, floored at rtol * RMS weight: errors far below the typical
        # weight move neither the direction nor the margins (as in the CVODE flow).
        floor = max(self.atol, self.rtol * float(w.norm()) / math.sqrt(max(w.numel(), 1)))
        scale = floor + self.rtol * torch.maximum(w.abs(), w_new.abs())
        return float(torch.sqrt(torch.mean((err / scale) ** 2)))

    def _initial_step(self, w: torch.Tensor, f0: torch.Tensor) -> float:
        return 1e-3 * float(w.norm()) / max(float(f0.norm()), 1e-300)

    def _evaluation(self, p: FieldPoint) -> Evaluation:
        return Evaluation(log_risk=p.log_risk, grad=p.v, margins=p.margins, correct=p.correct)

    def _take(self, cost: float) -> int:
        self._spent += cost
        whole = int(self._spent)
        self._spent -= whole
        return whole

    # -- one step -----------------------------------------------------------------------
    def step(self, w, ev, target: Optional[float] = None) -> StepResult:
        with one_thread(self.single_thread):
            return self._step(w, ev, target)

    def _step(self, w, ev, target: Optional[float]) -> StepResult:
        problem = self.problem
        p0 = self._point_at(w, ev)
        cost = p0.grad_evals if p0 is not self.point else 0.0
        if self.h is None:
            self.h = self._initial_step(w, p0.s_velocity())
        rejected = 0
        near_captures = 0
        if self._probes is None or self._probe_age >= PROBE_EVERY:
            self._probe_age = 0
            self._probes, spent = self.field.probe_normals(p0.w, seed=0)
            self._probe_w = p0.w.detach().clone()
            cost += spent
        self._probe_age += 1
        tries = 0
        while True:
            tries += 1
            if tries > MAX_TRIES:
                raise StepStuck(
                    f"sliding flow (explicit): no step accepted in {MAX_TRIES} tries at ln(n/L) = "
                    f"{math.log(problem.n) - p0.log_risk:.6g} (step {self.h:.3g}); integrator=sliding uses CVODE there"
                )
            s_now = math.log(problem.n) - p0.log_risk
            h = self.h
            if target is not None and target > s_now:
                h = min(h, (target - s_now) * (1 + 1e-9))
            w0 = p0.w
            ks = [p0.s_velocity()]
            ok = True
            p_new = None
            cross = None  # (kinks, fractions of the step) of the first stage where some crossed
            over = None  # the same for held pool ties that a third entry of their window overtook
            attempt_cost = cost
            for i in range(1, 7):
                w_stage = w0 + h * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
                stage = self._eval(w_stage)
                cost += stage.grad_evals
                if (
                    not (math.isfinite(stage.log_risk) and bool(torch.isfinite(stage.v).all()))
                    or float(stage.v.norm()) == 0
                ):
                    ok = False
                    break
                ks.append(stage.s_velocity())
                if cross is None:
                    found = crossings(
                        p0.sites, stage.sites, self.field.sliding, _C[i], significant=self._significance(p0, h)
                    )
                    cross = found if len(found[0]) else None
                if over is None and len(self.field.sliding):
                    found = overtaken(p0.sites, stage.sites, self.field.sliding, _C[i])
                    over = found if len(found[0]) else None
                if i == 6:
                    p_new = stage
            if ok:
                err = h * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
                err_norm = self._error_norm(err, w0, p_new.w)
            if not ok or not math.isfinite(err_norm):
                rejected += 1
                self.h = 0.25 * h
                continue
            factor = 0.9 * err_norm ** (-1 / 5) if err_norm > 0 else 5.0
            if err_norm <= 1.0:
                self.stats["accepted"] += cost - attempt_cost
                self.stats["accepted_with_cross"] += cross is not None
                self.h = h * min(5.0, max(0.2, factor)) if h == self.h else max(self.h, h)
                if self._cut_from is not None:
                    self.h = max(self.h, self._cut_from)  # the cut was for the event, not for accuracy
                    self._cut_from = None
                break
            rejected += 1
            self.stats["rejected"] += cost - attempt_cost
            self.stats["rejected_with_cross"] += cross is not None
            if DEBUG:
                print(
                    f"    reject h={h:.3g} err={err_norm:.3g} cross={None if cross is None else float(cross[1].min())}",
                    flush=True,
                )
            if over is not None:
                # A held tie lost its window to a third entry: the held value is no longer the max.
                # Step to just before that, where the tie is released (the window's plain max
                # then takes over, and the third entry's crossing is an ordinary one).
                first = float(over[1].min())
                if first * h * float(ks[0].norm()) <= NEAR_DISTANCE * self.rtol * float(w0.norm()) or first < 1e-3:
                    p0, spent = self._release(p0, over[0])
                    cost += spent
                    self.stats["events"] += spent
                    continue
                self.h = max(first * (1 - 1e-3), 1e-12) * h
                continue
            if cross is None:
                continue_with = h * min(1.0, max(0.2, factor))
                self.h = continue_with
                continue
            kinks, frac = cross
            # Was it the crossing?  Its jump, held over the rest of the step, against the error
            # measured: if the smooth part of the error dominates, shrink the step as usual.
            vv = float(torch.dot(p0.v, p0.v))
            share = float(jumps(kinks, p0.sites, self._probes).max()) * h / vv / (self.rtol * float(w0.norm()))
            if share < 0.3 * err_norm:
                self.h = h * min(1.0, max(0.2, factor))
                continue
            first = float(frac.min())
            reach = first * h * float(ks[0].norm())  # distance in W to the first crossing
            if reach <= NEAR_DISTANCE * self.rtol * float(w0.norm()) and near_captures < 8:
                # A kink a hair from its surface and heading for it: hold it there now (the move
                # is far inside the tolerance) and let its Filippov weight decide whether it
                # slides or passes through; stepping ever closer would not end.
                near = kinks.subset((frac <= 2 * first).nonzero().flatten())
                p0, spent = self._capture(p0, near)
                cost += spent
                self.stats["events"] += spent
                near_captures += 1
                continue
            if first < min(1.0, max(0.2, factor)) and self._short_cuts < MAX_SHORT_CUTS:
                # A kink crosses inside the step: the field jumps there, and no smooth error
                # model predicts the step that would pass.  Land just short of the crossing
                # (a step through it carries the jump into the error estimate), then hold it.
                suggested = h * min(1.0, max(0.2, factor))
                self._cut_from = suggested if self._cut_from is None else min(self._cut_from, suggested)
                self.h = max(first * (1 - 1e-3), 1e-12) * h
                self._cutting = True
                continue
            self.h = h * min(1.0, max(0.2, factor))
        p_new, event_cost, happened = self._events(p0, p_new)
        cost += event_cost
        self.stats["events"] += event_cost
        # Count cuts that fell short of their crossing in a row; anything else starts afresh.
        self._short_cuts = self._short_cuts + 1 if self._cutting and not happened else 0
        self._cutting = False
        self.point = p_new
        return StepResult(p_new.w, self._evaluation(p_new), self._take(cost), rejected)

    def _significance(self, p0: FieldPoint, h: float):
        """A filter keeping the crossings that matter: a kink whose jump in the field, held for
        a whole step of ``h``, moves ``W`` by more than a tenth of the tolerance.  The early
        phase crosses thousands of conv units whose jumps are far below that; the error control
        of the step absorbs them, as for any smooth right-hand side."""
        vv = float(torch.dot(p0.v, p0.v))
        limit = SIGNIFICANT * self.rtol * float(p0.w.norm()) * vv / max(h, 1e-300)

        def keep(kinks: KinkSet) -> torch.Tensor:
            return jumps(kinks, p0.sites, self._probes) > limit

        return keep

    # -- events -------------------------------------------------------------------------
    def _events(self, p0: FieldPoint, p1: FieldPoint) -> tuple[FieldPoint, float, bool]:
        """Captures among the kinks that crossed in the step, then releases."""
        field = self.field
        cost = 0.0
        # Every crossed kink is tested, whatever its jump: a sliding kink left out makes the
        # integrator zigzag across its surface, and the mix of sides it then follows is the
        # discretisation's, not the Filippov one (measured on H-AlexNet, 16 digits: with only
        # the crossings of large jumps captured, 1 - cos to the chattering average was 6e-3).
        rising = overtakers(p0.sites, p1.sites, field.sliding)
        if len(rising):
            # A third entry reached a held tie: which entries stay tied is decided by trial
            # holds (``_resolve_window``), before any ordinary crossing.
            self.events["crossed"] += len(rising)
            for k in range(len(rising)):
                kink = rising.subset(torch.tensor([k]))
                if not len(window_entries(field.sliding, kink)):
                    # resolving an earlier window settled, and that released this one's tie
                    # (or its normal vanished): its plain max has it, as for any window
                    continue
                p1, spent = self._resolve_window(p1, kink)
                cost += spent
            p, spent, _ = self._settle(p1)
            return p, cost + spent, True
        crossed, _ = crossings(p0.sites, p1.sites, field.sliding, 1.0, side="new")
        capture = KinkSet()
        if len(crossed):
            self.events["crossed"] += len(crossed)
            # dh/ds on the new side, by a forward difference along the new point's velocity:
            # pointing back at the surface means both sides push toward it, i.e. sliding.
            h1, dh = self._kink_motion(p1, crossed)
            cost += 2 * SlidingField.FORWARD
            back = dh * torch.sign(h1) < 0
            capture = crossed.subset(back.nonzero().flatten())
        if len(capture):
            p, spent = self._capture(p1, capture)
            return p, cost + spent, True
        p, spent, released = self._settle(p1)
        return p, cost + spent, released or len(crossed) > 0

    def _resolve_window(self, p: FieldPoint, rising: KinkSet) -> tuple[FieldPoint, float]:
        """A third entry ``c`` reached the held tie of a pool window: choose which of the tied
        entries the flow keeps tied.  Candidates, largest first: all of them, then each pair,
        then the window's plain max alone; a candidate holds if its Filippov weights lie in
        the simplex and every entry it leaves out stays below the tie and moves away from it
        (forward difference along the velocity).  The first that holds is kept.  (Keeping the
        old tie and releasing ``c``, or holding the new pair, made a three-way tie on H-AlexNet
        cycle through its pairs, capture after release, 250 times in 1e-6 of s.)"""
        field = self.field
        site, o = int(rising.site[0]), int(rising.o[0])
        mine = window_entries(field.sliding, rising)
        held = field.sliding.subset(mine)
        entries = [int(held.a[0])] + [int(b) for b in held.b.tolist()] + [int(rising.b[0])]
        entries = list(dict.fromkeys(entries))
        others = torch.ones(len(field.sliding), dtype=torch.bool)
        others[mine] = False
        base = field.sliding.subset(others.nonzero().flatten())
        saved = (field.sliding, field.gram_chol, field.normals, field.normals_w, field.normals_context, field.normals_keys)
        saved_lam = field.lam_state()
        cost = 0.0
        z = {s.index: s for s in p.sites}[site].z.reshape(-1)
        candidates = [tuple(c) for r in range(len(entries), 1, -1) for c in combinations(entries, r)]
        for chosen in candidates:
            winner = max(chosen, key=lambda e: float(z[e]))
            rest = [e for e in chosen if e != winner]
            kinks = pool_kinks(site, winner, rest, o)
            field.sliding, field.gram_chol = base.union(kinks), None
            w, spent = project(field, p.w, p.sites)
            q = self._eval(w)
            cost += spent + q.grad_evals
            window = window_entries(field.sliding, kinks)
            if bool((leave_measure(q.theta[window], q.delta[window]) > self.release_margin).any()):
                continue
            left_out = [e for e in entries if e not in chosen]
            if left_out:
                # each left-out entry below the tie, and moving away: x_winner - x_e > 0, rising
                _, dh = self._kink_motion(q, pool_kinks(site, winner, left_out, o))
                cost += 2 * SlidingField.FORWARD
                if not bool((dh > 0).all()):
                    continue
            self.events["captured"] += len(rest)
            return q, cost
        # none holds: the window's plain max takes over
        field.sliding, field.gram_chol, field.normals, field.normals_w, field.normals_context, field.normals_keys = saved
        field.load_lam_state(saved_lam)
        q, spent = self._release(p, rising)
        return q, cost + spent

    def _kink_motion(self, p: FieldPoint, kinks: KinkSet) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` of ``kinks`` at ``p`` and its change along ``p``'s velocity, by a forward
        difference moving ``W`` by 1e-7 relative (two forward passes)."""
        u = p.s_velocity()
        h1 = self.field.kink_values(p.w, kinks)
        eps = 1e-7 * float(p.w.norm()) / max(float(u.norm()), 1e-300)
        return h1, self.field.kink_values(p.w + eps * u, kinks) - h1

    def _capture(self, p: FieldPoint, kinks: KinkSet) -> tuple[FieldPoint, float]:
        """Hold ``kinks`` on their surfaces: project ``p`` onto them, re-evaluate, settle."""
        field = self.field
        rows, cost0 = field.normals_at(p.w, p.sites, kinks=kinks)
        # A kink whose h does not depend on W here (both pool entries dead upstream) constrains
        # nothing and cannot be held.
        live = live_normals(rows)
        if not bool(live.any()):
            return p, cost0
        kinks = kinks.subset(live.nonzero().flatten())
        self.events["captured"] += len(kinks)
        field.sliding = field.sliding.union(kinks)
        field.gram_chol = None
        w, cost = project(field, p.w, p.sites)
        p = self._eval(w)
        p, spent, _ = self._settle(p, cost0 + cost + p.grad_evals)
        return p, spent

    def _release(self, p: FieldPoint, kinks: KinkSet) -> tuple[FieldPoint, float]:
        """Drop held pool ties whose window a third entry has taken (no nudge: the window's
        plain max is no longer either of them), re-evaluate and settle."""
        field = self.field
        gone = set(zip(kinks.site.tolist(), kinks.o.tolist()))
        keep = [
            i
            for i, (st, b, o) in enumerate(
                zip(field.sliding.site.tolist(), field.sliding.b.tolist(), field.sliding.o.tolist())
            )
            if not (b >= 0 and (st, o) in gone)
        ]
        field.release(torch.tensor(keep, dtype=torch.long))
        self.events["released"] += len(gone)
        q = self._eval(p.w)
        q, spent, _ = self._settle(q, q.grad_evals)
        return q, spent

    def _settle(self, p: FieldPoint, cost: float = 0.0) -> tuple[FieldPoint, float, bool]:
        """Release kinks whose Filippov weight left ``[0, 1]``: one at a time, the worst first,
        re-evaluating between (an active-set pivot: releasing every kink that looks out of
        range at once made pairs on nearly parallel surfaces flap in and out together)."""
        field = self.field
        released = False
        # theta is decided from the point's multipliers as they came: the corrections carry
        # delta along, so it is consistent with them.  (Evaluating a point again wherever its
        # multipliers had not met the tolerance cost H-AlexNet seed 1 60% more gradients, s 25
        # to 30: 16,034 against 10,114, the same direction.)
        for _ in range(len(field.sliding)):
            if not len(field.sliding):
                break
            excess = leave_measure(p.theta, p.delta)
            if not bool((excess > self.release_margin).any()):
                break
            worst = int(torch.argmax(excess))
            side = leave_side(float(p.theta[worst]), float(p.delta[worst]), float(p.h[worst]))
            kink = field.sliding.subset(torch.tensor([worst]))
            if side < 0 and bool(kink.is_pool[0]) and len(window_entries(field.sliding, kink)) > 1:
                # the winner leaves a tie of three or more: the window's plain max takes over
                p, spent = self._release(p, kink)
                cost += spent
                released = True
                continue
            keep = torch.ones(len(field.sliding), dtype=torch.bool)
            keep[worst] = False
            field.release(keep.nonzero().flatten())
            self.events["released"] += 1
            released = True
            w, spent = self._nudge(p, kink, side, float(p.h[worst]))
            p = self._eval(w)
            cost += spent + p.grad_evals
        return p, cost, released

    def _nudge(self, p: FieldPoint, kink: KinkSet, side: float, h: float) -> tuple[torch.Tensor, float]:
        """Put a released kink a hair on the side it leaves to, along its normal.  On its surface
        ``h`` is at rounding level, so the autodiff side of a ReLU there (and with it the normals
        of the units downstream of it, held ones included) would be decided by summation order:
        one example alone and the whole batch disagreed, by up to 0.3 in those normals."""
        field = self.field
        row, spent = field.normals_at(p.w, p.sites, kinks=kink)
        norm = float(row.norm())
        if norm == 0:
            return p.w, spent
        target = side * NUDGE * float(p.w.norm()) * norm  # h after the move
        return p.w + (target - h) / norm**2 * row[0], spent


def leave_side(theta: float, delta: float, h: float) -> float:
    """The side (+1: ``h > 0``, ReLU on / the held pool winner stays) a released kink leaves to:
    where both one-sided normal speeds point.  ``b(theta)`` rises with slope ``delta``: with
    ``delta > 0``, ``theta > 1`` means ``b(1) < 0`` (both sides push to ``h > 0``) and
    ``theta < 0`` the opposite; with ``delta < 0`` the reverse; a repelling surface (``delta < 0``,
    ``theta`` inside) keeps the side rounding gave it."""
    if delta > 0:
        return 1.0 if theta > 1 else -1.0
    if delta < 0 and not 0 <= theta <= 1:
        return -1.0 if theta > 1 else 1.0
    return 1.0 if h >= 0 else -1.0


def leave_measure(theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """How far each held kink is from sliding (> 0: it leaves).  It slides when the surface
    attracts from both sides: the normal speed ``b(theta) = b_0 + theta delta |grad h|^2`` of
    the combination rises through 0 (``delta > 0``) at a ``theta`` in ``[0, 1]``.  With
    ``delta < 0`` the surface repels (or is crossed): the kink leaves whatever ``theta`` is.
    Which side it leaves to needs no decision: both one-sided fields then agree on the sign
    of ``dh/ds`` (or, repelling, the rounding of ``h`` picks one), and the next steps follow."""
    outside = torch.maximum(-theta, theta - 1.0)
    return torch.where(delta > 0, outside, torch.ones_like(theta))


def overtaken(sites0, sites1, sliding: KinkSet, c: float = 1.0) -> tuple[KinkSet, torch.Tensor]:
    """Held pool ties ``(a, b)`` whose window's plain argmax at ``sites1`` is a third entry,
    with the fraction of the step (from ``sites0``) at which it overtook, by interpolation of
    ``max(x_a, x_b) - x_c``."""
    by_site = {s.index: (s0, s) for s0, s in zip(sites0, sites1)}
    pos, fr = [], []
    for k in torch.unique(sliding.site[sliding.b >= 0]).tolist():
        s0, s1 = by_site[k]
        mine = ((sliding.site == k) & (sliding.b >= 0)).nonzero().flatten()
        a, b, o = sliding.a[mine], sliding.b[mine], sliding.o[mine]
        winner = s1.argmax.reshape(-1)[o]
        held = {}
        for oi, ai, bi in zip(o.tolist(), a.tolist(), b.tolist()):
            held.setdefault(oi, {ai}).add(bi)
        lost = torch.tensor([wi not in held[oi] for wi, oi in zip(winner.tolist(), o.tolist())], dtype=torch.bool)
        if not bool(lost.any()):
            continue
        z0, z1 = s0.z.reshape(-1), s1.z.reshape(-1)
        a, b, cc = a[lost], b[lost], winner[lost]
        h0 = torch.maximum(z0[a], z0[b]) - z0[cc]
        h1 = torch.maximum(z1[a], z1[b]) - z1[cc]
        frac = torch.where(h0 > 0, h0 / (h0 - h1), torch.zeros_like(h0)).clamp(0.0, 1.0)
        pos.append(mine[lost])
        fr.append(c * frac)
    if not pos:
        return KinkSet(), torch.zeros(0)
    return sliding.subset(torch.cat(pos)), torch.cat(fr)


def pool_kinks(site: int, winner: int, others: list[int], o: int) -> KinkSet:
    """The pool kinks ``x_winner - x_e`` of window ``o`` at ``site``, one per entry ``e`` of ``others``."""
    m = len(others)
    return KinkSet(
        torch.full((m,), site, dtype=torch.long),
        torch.full((m,), winner, dtype=torch.long),
        torch.tensor(others, dtype=torch.long),
        torch.full((m,), o, dtype=torch.long),
    )


def window_entries(sliding: KinkSet, kink: KinkSet) -> torch.Tensor:
    """Positions in ``sliding`` of the entries held on ``kink``'s pool window."""
    return ((sliding.site == kink.site[0]) & (sliding.o == kink.o[0]) & (sliding.b >= 0)).nonzero().flatten()


def overtakers(sites0, sites1, sliding: KinkSet) -> KinkSet:
    """For each held pool tie whose window's plain argmax at ``sites1`` is a third entry ``c``,
    the kink ``(a, c)`` that would hold ``c`` on the tie too (``a``: the window's held winner)."""
    lost, _ = overtaken(sites0, sites1, sliding, 1.0)
    if not len(lost):
        return KinkSet()
    by_site = {s.index: s for s in sites1}
    seen, rows = set(), []
    for st, a, o in zip(lost.site.tolist(), lost.a.tolist(), lost.o.tolist()):
        if (st, o) in seen:
            continue
        seen.add((st, o))
        c = int(by_site[st].argmax.reshape(-1)[o])
        rows.append((st, a, c, o))
    site, a, b, o = (torch.tensor(col, dtype=torch.long) for col in zip(*rows))
    return KinkSet(site, a, b, o)


def crossings(
    sites0, sites1, sliding: KinkSet, c: float = 1.0, side: str = "old", significant=None
) -> tuple[KinkSet, torch.Tensor]:
    """Kinks outside ``sliding`` that changed side between two forwards (a step's start and a
    stage at fraction ``c`` of it), with the fraction of the step at which each crossed by
    linear interpolation of its ``h``.  Pool kinks are held with the window's ``side``
    winner as ``a``.  A kink that starts on its surface (just released, ``|h|`` at rounding
    level) is leaving it, not crossing, and is left out."""
    site, a, b, o, fr = [], [], [], [], []
    for s0, s1 in zip(sites0, sites1):
        z0, z1 = s0.z.reshape(-1), s1.z.reshape(-1)
        if s0.kind == "relu":
            idx = relu_crossings(s0.z, s1.z)
            if len(sliding):
                idx = idx[~torch.isin(idx, sliding.a[sliding.site == s0.index])]
            h0, h1 = z0[idx], z1[idx]
            ka, kb, ko = idx, torch.full_like(idx, -1), torch.full_like(idx, -1)
        else:
            win, old, new = pool_crossings(s0, s1)
            if len(sliding):
                keep = ~torch.isin(win, sliding.o[sliding.site == s0.index])
                win, old, new = win[keep], old[keep], new[keep]
            h0, h1 = z0[old] - z0[new], z1[old] - z1[new]
            ka, kb, ko = (new, old, win) if side == "new" else (old, new, win)
        frac = h0 / (h0 - h1)
        keep = torch.isfinite(frac) & (frac > 1e-9)
        site.append(torch.full_like(ka[keep], s0.index))
        a.append(ka[keep])
        b.append(kb[keep])
        o.append(ko[keep])
        fr.append(c * frac[keep].clamp(0.0, 1.0))
    if not site:
        return KinkSet(), torch.zeros(0)
    found, frac = KinkSet(torch.cat(site), torch.cat(a), torch.cat(b), torch.cat(o)), torch.cat(fr)
    if significant is not None and len(found):
        mask = significant(found)
        found, frac = found.subset(mask.nonzero().flatten()), frac[mask]
    return found, frac


def jumps(kinks: KinkSet, sites, probes) -> torch.Tensor:
    """Estimated size ``|delta| ||grad h||`` of the jump each kink makes in the gradient when it
    changes side: its backward signal times its normal's norm (from random probes)."""
    out = torch.zeros(len(kinks), dtype=sites[0].z.dtype)
    by_site = {s.index: (s, pr) for s, pr in zip(sites, probes)}
    for k in torch.unique(kinks.site).tolist():
        pos = (kinks.site == k).nonzero().flatten()
        site, pr = by_site[k]
        a, b, o = kinks.a[pos], kinks.b[pos], kinks.o[pos]
        if site.kind == "relu":
            signal = site.signal.reshape(-1)[a]
            norm = pr[:, a].pow(2).mean(0).sqrt()
        else:
            signal = site.signal.reshape(-1)[o]
            norm = (pr[:, a] - pr[:, b]).pow(2).mean(0).sqrt()
        out[pos] = (signal.abs() * norm).to(out.dtype)
    return out
