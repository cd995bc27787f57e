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
from typing import Optional

import torch

from ..errors import UserError
from ..kinks import KinkSet, pool_crossings, relu_crossings
from ..problem import Evaluation
from ..sliding import FieldPoint, SlidingField, project
from .base import Dynamics, StepResult
from .flow import _A, _E

RELEASE_MARGIN = 1e-9  # theta this far outside [0, 1] releases a kink


class SlidingFlow(Dynamics):
    """Dormand-Prince 5(4) on the sliding field, with capture / release events."""

    name = "flow"
    faithful_to_flow = True

    def __init__(self, problem, config):
        super().__init__(problem, config)
        self.rtol = float(config.rtol)
        self.atol = float(config.atol)
        if not (0 < self.rtol < 1) or self.atol < 0:
            raise UserError(f"rtol must be in (0, 1) and atol >= 0 (got rtol={config.rtol}, atol={config.atol})")
        self.field = SlidingField(problem)
        self.h: Optional[float] = None
        self.point: Optional[FieldPoint] = None
        self._spent = 0.0  # fractional gradient-equivalents not yet reported
        self.events = {"captured": 0, "released": 0, "crossed": 0}

    # -- checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict:
        p = self.point
        return {
            "h": self.h,
            "sliding": self.field.sliding.state(),
            "gram_chol": self.field.gram_chol,
            "point": None if p is None else {"h": p.h, "lam": p.lam, "theta": p.theta},
            "spent": self._spent,
            "events": dict(self.events),
        }

    def load_state_dict(self, state: dict) -> None:
        self.h = state["h"]
        self.field.sliding = KinkSet.from_state(state["sliding"])
        self.field.gram_chol = state["gram_chol"]
        self._resume_point = state.get("point")
        self._spent = float(state.get("spent", 0.0))
        self.events = dict(state.get("events", self.events))
        self.point = None

    # -- helpers ------------------------------------------------------------------------
    def _point_at(self, w: torch.Tensor, ev: Evaluation) -> FieldPoint:
        """The FSAL point at ``w``: kept from the last step, rebuilt from a checkpoint, or new."""
        if self.point is not None and torch.equal(self.point.w, w):
            return self.point
        saved = getattr(self, "_resume_point", None)
        self._resume_point = None
        if saved is not None and ev.grad is not None:
            _, _, sites = self.field.watch(w)
            return FieldPoint(w, ev.log_risk, ev.margins, ev.grad, saved["h"], saved["lam"], saved["theta"], sites, 1.0 / 3.0)
        return self.field.evaluate(w)

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
        problem = self.problem
        p0 = self._point_at(w, ev)
        cost = p0.grad_evals if p0 is not self.point else 0.0
        k1 = p0.s_velocity()
        if self.h is None:
            self.h = self._initial_step(w, k1)
        s_now = math.log(problem.n) - p0.log_risk
        rejected = 0
        while True:
            h = self.h
            if target is not None and target > s_now:
                h = min(h, (target - s_now) * (1 + 1e-9))
            ks = [k1]
            ok = True
            p_new = None
            for i in range(1, 7):
                w_stage = w + h * sum(a * k for a, k in zip(_A[i], ks) if a != 0.0)
                stage = self.field.evaluate(w_stage)
                cost += stage.grad_evals
                if not (math.isfinite(stage.log_risk) and bool(torch.isfinite(stage.v).all())) or float(stage.v.norm()) == 0:
                    ok = False
                    break
                ks.append(stage.s_velocity())
                if i == 6:
                    p_new = stage
            if ok:
                err = h * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
                err_norm = self._error_norm(err, w, p_new.w)
            if not ok or not math.isfinite(err_norm):
                rejected += 1
                self.h = 0.25 * h
                continue
            factor = 0.9 * err_norm ** (-1 / 5) if err_norm > 0 else 5.0
            if err_norm <= 1.0:
                self.h = h * min(5.0, max(0.2, factor)) if h == self.h else max(self.h, h)
                break
            rejected += 1
            self.h = h * min(1.0, max(0.2, factor))
        p_new, event_cost = self._events(p0, p_new)
        cost += event_cost
        self.point = p_new
        return StepResult(p_new.w, self._evaluation(p_new), self._take(cost), rejected)

    # -- events -------------------------------------------------------------------------
    def _crossed(self, p0: FieldPoint, p1: FieldPoint) -> KinkSet:
        """Kinks outside the sliding set that changed side between ``p0`` and ``p1``, held
        with their new side: ReLU ``a`` = the unit, pool ``a`` = the new winner."""
        S = self.field.sliding
        site, a, b, o = [], [], [], []
        for s0, s1 in zip(p0.sites, p1.sites):
            if s0.kind == "relu":
                idx = relu_crossings(s0.z, s1.z)
                if len(S):
                    held = S.a[S.site == s0.index]
                    idx = idx[~torch.isin(idx, held)]
                site.append(torch.full_like(idx, s0.index))
                a.append(idx)
                b.append(torch.full_like(idx, -1))
                o.append(torch.full_like(idx, -1))
            else:
                win, old, new = pool_crossings(s0, s1)
                if len(S):
                    held = S.o[S.site == s0.index]
                    keep = ~torch.isin(win, held)
                    win, old, new = win[keep], old[keep], new[keep]
                site.append(torch.full_like(win, s0.index))
                a.append(new)
                b.append(old)
                o.append(win)
        if not site:
            return KinkSet()
        return KinkSet(torch.cat(site), torch.cat(a), torch.cat(b), torch.cat(o))

    def _events(self, p0: FieldPoint, p1: FieldPoint) -> tuple[FieldPoint, float]:
        field = self.field
        cost = 0.0
        crossed = self._crossed(p0, p1)
        capture = KinkSet()
        if len(crossed):
            self.events["crossed"] += len(crossed)
            # dh/ds on the new side, by a forward difference along the new point's velocity.
            u = p1.s_velocity()
            h1 = field.kink_values(p1.w, crossed)
            eps = 1e-7 * float(p1.w.norm()) / max(float(u.norm()), 1e-300)
            h2 = field.kink_values(p1.w + eps * u, crossed)
            cost += 2 * SlidingField.FORWARD
            back = (h2 - h1) / eps * torch.sign(h1) < 0
            capture = crossed.subset(back.nonzero().flatten())
        release = torch.zeros(0, dtype=torch.bool)
        if len(field.sliding):
            theta = p1.theta
            release = (theta < -RELEASE_MARGIN) | (theta > 1 + RELEASE_MARGIN)
        if not len(capture) and not bool(release.any()):
            return p1, cost
        w = p1.w
        if bool(release.any()):
            self.events["released"] += int(release.sum())
            field.sliding = field.sliding.subset((~release).nonzero().flatten())
            field.gram_chol = None
        if len(capture):
            self.events["captured"] += len(capture)
            field.sliding = field.sliding.union(capture)
            field.gram_chol = None
            w, spent = project(field, w, p1.sites)
            cost += spent
        p = field.evaluate(w)
        return p, cost + p.grad_evals

