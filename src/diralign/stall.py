"""The stall goal: stop a run whose risk no longer falls (``stop_reason: "stalled"``).

    diralign run custom --set model=... --set data=noisy.npz --set stall_seconds=30

On separable data every dynamics drives ``ln(n/L)`` up without bound; on data the model
cannot separate (contradictory examples, too small a network) ``L`` tends to a positive
limit and ``ln(n/L)`` creeps towards a ceiling: gradient descent takes ever smaller
improvements, and the flow, whose clock *is* ``ln(n/L)``, spins inside one step that never
reaches its next output.  Linear models are refused up front (:mod:`diralign.separability`);
for the others this watch decides from the run itself.

**The rule.**  Training time ``T`` (the run's own clock, summed over resumes) is cut into
windows that double: a window starting at ``T_a`` closes at ``max(2 T_a, T_a +
stall_seconds)``.  ``rise`` is the highest ``ln(n/L)`` seen by then (at accepted points and at
the evaluations inside a step, so that a long step that makes progress counts) minus the
highest at ``T_a``.  The run has stalled when a window's rise is at most
``stall_tolerance * max(1, ln(n/L))`` *and* no larger than the previous window's (the first
window never stalls: escaping a saddle from a tiny initialisation rises by little, but
faster and faster).  Separable runs rise by at least ``~ln 2`` per doubling of time even for
constant-step gradient descent (``L ~ 1/t``), and by much more for the normalised methods
and the flow; a risk converging to a positive limit rises by less and less.

The decision depends on wall time, so where a run stalls its stopping point is not
reproducible to the step; runs that do not stall are unaffected.
"""

from __future__ import annotations

import math
from typing import Optional


def fresh_state() -> dict:
    """The watch's part of a :class:`~diralign.trainer.TrainState` (checkpointed)."""
    return {"anchor_wall": None, "anchor_best": None, "last_rise": None, "best": -math.inf}


class StallWatch:
    """Decides the stall goal from the run's clock and the highest ``ln(n/L)`` seen."""

    def __init__(self, seconds: float, tolerance: float, state: dict, n: int):
        self.seconds = float(seconds)
        self.tolerance = float(tolerance)
        self.state = state  # the TrainState's dict, updated in place (checkpointed with it)
        self.log_n = math.log(n) if n > 0 else 0.0
        self.message: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.seconds > 0

    def observe_s(self, s: float) -> None:
        if s > self.state["best"]:  # NaN never counts as progress
            self.state["best"] = s

    def observe_log_risk(self, log_risk: float) -> None:
        """An evaluation inside a step (``log L`` at some point the dynamics tried)."""
        self.observe_s(self.log_n - float(log_risk))

    def stalled(self, wall: float) -> bool:
        """Close the current window if ``wall`` is past its end; True if the run has stalled."""
        if not self.enabled:
            return False
        st = self.state
        best = st["best"]
        if st["anchor_wall"] is None:
            st["anchor_wall"], st["anchor_best"] = float(wall), best
            return False
        start = st["anchor_wall"]
        if wall < max(2.0 * start, start + self.seconds):
            return False
        rise = best - st["anchor_best"]
        allowed = self.tolerance * max(1.0, abs(st["anchor_best"]))
        previous = st["last_rise"]
        if rise <= allowed and previous is not None and rise <= previous:
            self.message = (
                f"the risk has stalled: ln(n/L) rose by only {rise:.3g} (from {st['anchor_best']:.6g} to {best:.6g}) "
                f"between {start:.3g} s and {wall:.3g} s of training, after {previous:.3g} in the window before; "
                "the data may not be separable by this model (contradictory or duplicate examples, too small a "
                "network), or the dynamics makes no progress (try another); stall_seconds=0 turns this goal off"
            )
            return True
        st["anchor_wall"], st["anchor_best"], st["last_rise"] = float(wall), best, rise
        return False
