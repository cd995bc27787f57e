"""The gradient flow in the clock ``s = ln(n/L)``, integrated by SUNDIALS CVODE (BDF).

    diralign run fig1 --out /tmp/f1 --set width=1000 --set target_ln_n_over_L=1000   # the default flow

The late-phase flow ``dW/ds = -g/||g||^2`` (``g = grad log L``, see ``flow.py``) is stiff:
individual margin gradients are ~``1/(k gamma)`` times larger than their softmin average,
so an explicit Runge-Kutta step is set by stability, not accuracy.  CVODE's BDF methods
(through scikit-sundae) with matrix-free GMRES take steps set by accuracy instead.

**Jacobian-vector products.**  With ``H = grad^2 log L`` and ``gg = ||g||^2``,
``J v = -(H v - 2 g <g, H v>/gg) / gg``: one Hessian-vector product per Krylov iteration,
by double backward through the graph that the right-hand side keeps at the Newton iterate
(``create_graph=True``), so the Jacobian setup costs nothing extra.  CVODE's own difference
quotient ``(f(y + sigma v) - f(y))/sigma`` perturbs ``W`` by ~``rtol`` relative and so the
margins by ~``k s rtol``; the Newton matrix amplifies that error by ``gamma lambda``, which
grows with the step: this is what stalled a prototype past ``s ~ 1000`` (measured on Fig. 1,
width 1000, rtol 1e-6: from ``s`` = 300 to 1000 difference quotients took 134,761
evaluations and ended 1e-3 off in alignment; Hessian-vector products 765).  Early on
difference quotients are cheaper (one gradient, not a Hessian-vector product costing 2-3),
so ``cvode_jacobian=auto`` uses them while ``k s rtol <= DQ_LIMIT``.  Chunked and distributed
problems get the same exact products (:meth:`~diralign.problem.Problem.curvature` combines the
pieces' ``H_c v`` in log space like their gradients), so a run on ``W`` processes follows the
same Newton iterations as one process with ``chunk_size = n/W``, bit for bit.

**Tolerances.**  ``rtol`` is relative to each weight and, as a floor, to the RMS weight
(``atol`` is raised to ``rtol * ||W||/sqrt(P)``): errors that small in weights far below the
typical size move neither direction nor margins, and not chasing them halves the cost.
Beyond ``s = S_TIGHTEN`` the relative tolerance shrinks like ``S_TIGHTEN/s``, which keeps the
margins' *absolute* error bounded (see ``_rtol``).

**Cost accounting.**  ``grad_evals`` counts gradient-equivalent evaluations: each
right-hand side (a gradient, with or without its graph kept) 1, each Hessian-vector
product 2, each rebuilt Jacobian graph 1, and the evaluation at each returned point 1.

**Segments, exact resume.**  CVODE's history (Nordsieck array, step size, order) cannot
be checkpointed, so the flow is cut into *segments* on a fixed power-of-two grid in ``s``
(spacing ``cvode_segment`` times the current ``s``: ``[4, 16]``, ``[16, 64]``, ...).  Each
segment is a fresh CVODE solve from the true ``ln(n/L)`` of its start, which re-anchors
the integrator's clock (it drifts from the true ``ln(n/L)`` by ~``rtol`` per unit of
``s``).  Inside a segment ``step()`` returns at outputs on the trainer's log grid (at most
``s/16`` apart), placed on the *true* clock by correcting the drift seen at the previous
output; CVODE interpolates there, and the segment's last output is a step endpoint.  A
checkpoint records the segment's start and its outputs so far; a resumed run replays the
segment from its start (not counted in ``grad_evals``), checks that the replay reproduces
the checkpointed point bit for bit, and goes on, so resumed and uninterrupted runs do
identical work.  (If it does not -- another thread count, another machine -- the segment
restarts from the checkpointed point.)

CVODE's rejected steps are not exposed by scikit-sundae; ``rejected`` stays 0 and their
cost is inside ``grad_evals``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from ..options import Options, option
from ..runtime import RuntimeOptions
from .base import Dynamics, StepResult, finite, one_thread
from .flow import FlowOptions

JACOBIANS = ("auto", "hvp", "dq")
S_TIGHTEN = 1000.0  # beyond this s the relative tolerance shrinks like S_TIGHTEN / s ...
RTOL_FLOOR = 1e-12  # ... down to this (float64 leaves little below it)
DQ_LIMIT = 6.4e-5  # auto: difference quotients while k s rtol <= this (measured crossover, Fig. 1)
OUTPUTS_PER_OCTAVE = 16  # output spacing <= s/16 (directional path length, curves)


def power_of_two_below(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x))


def segment_end(s0: float, target: Optional[float], fraction: float) -> float:
    """End of the segment that starts at ``s0``: the next point of the grid of spacing
    ``2^floor(log2(fraction max(|s0|, 1)))`` at least a quarter spacing ahead, or the target."""
    delta = power_of_two_below(fraction * max(abs(s0), 1.0))
    end = (math.floor((s0 + 0.25 * delta) / delta) + 1) * delta
    if target is not None and s0 < target and end > target - 0.25 * delta:
        end = target
    return max(end, s0 + 1e-9 * max(abs(s0), 1.0))


def output_spacing(s: float, log_spacing: float) -> float:
    return min(log_spacing, power_of_two_below(max(abs(s), 1.0) / OUTPUTS_PER_OCTAVE))


@dataclass
class CvodeOptions(Options):
    SECTION = "dynamics: flow/cvode"
    cvode_segment: float = option(4.0, "segment length as a multiple of s (restart cost against replay on resume)")
    cvode_jacobian: str = option(
        "auto", "J*v by Hessian-vector products (hvp), difference quotients (dq), or dq early then hvp"
    )
    cvode_krylov_dim: int = option(20, "GMRES Krylov dimension")

    def validate(self) -> None:
        if not self.cvode_segment > 0:
            raise UserError(f"cvode_segment must be positive (a fraction of s), got {self.cvode_segment}")
        if self.cvode_krylov_dim < 1:
            raise UserError(f"cvode_krylov_dim must be a positive integer, got {self.cvode_krylov_dim}")
        if self.cvode_jacobian not in JACOBIANS:
            raise UserError(f"cvode_jacobian must be one of {', '.join(JACOBIANS)}, got {self.cvode_jacobian!r}")


class SClockSystem:
    """``dW/ds = -g/||g||^2`` and its exact Jacobian-vector product, on CVODE's arrays.

    CVODE hands numpy views of its own vectors; they become torch tensors without a copy
    (``torch.from_numpy``), and results are written straight into CVODE's output arrays.
    The one copy left is the point whose graph is kept for Hessian-vector products
    (:meth:`~diralign.problem.Problem.curvature` makes it): CVODE reuses its work vectors, and
    a graph must not see its inputs change underneath it.
    """

    def __init__(self, problem):
        self.problem = problem
        self.exact = True  # J*v by Hessian-vector products (else CVODE's difference quotients)
        self.cpu64 = problem.dtype == torch.float64 and problem.device.type == "cpu"
        self.graph = None  # (w, g, g_detached, gg) at the last right-hand side (hvp mode)
        self.rhs_evals = self.graph_evals = self.hvp_evals = 0
        # Called before every evaluation; raising StepAborted inside a CVODE callback
        # propagates out of the solve (scikit-sundae re-raises it), abandoning the segment.
        self.check_abort = lambda: None
        self.observe = lambda log_risk: None  # each right-hand side's log L (the stall goal)

    @property
    def grad_evals(self) -> int:
        return self.rhs_evals + self.graph_evals + 2 * self.hvp_evals

    def _torch(self, array: np.ndarray) -> torch.Tensor:
        with warnings.catch_warnings():
            # CVODE marks its input vectors read-only; nothing here writes to them.
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(array)
        return t if self.cpu64 else t.to(device=self.problem.device, dtype=self.problem.dtype)

    def _write(self, out: np.ndarray, value: torch.Tensor, scale: float) -> None:
        target = torch.from_numpy(out)
        if self.cpu64:
            torch.mul(value, scale, out=target)
        else:
            target.copy_((value * scale).to(device="cpu", dtype=torch.float64))

    def _curvature(self, y: np.ndarray):
        # (curvature() copies the point: CVODE reuses its work vectors under the graph)
        return self.problem.curvature(self._torch(y))

    def rhs(self, t, y, yp) -> None:
        self.check_abort()
        self.rhs_evals += 1
        if self.exact:
            self.graph = self._curvature(y)
            gd, log_risk = self.graph.grad, self.graph.log_risk
        else:
            self.graph = None
            ev = self.problem.evaluate(self._torch(y))
            gd, log_risk = ev.grad, ev.log_risk
        self.observe(log_risk)
        gg = float(torch.dot(gd, gd))
        if not (gg > 0 and math.isfinite(gg)):
            # CVODE treats a non-finite derivative as a failed step and retries smaller.
            yp[:] = np.nan
            return
        self._write(yp, gd, -1.0 / gg)

    def jac_setup(self, t, y, fy) -> None:
        # CVODE calls rhs(ynow) right before it: reuse that graph when it is the same point.
        if self.graph is None or not torch.equal(self.graph.w, self._torch(y)):
            self.check_abort()
            self.graph_evals += 1
            self.graph = self._curvature(y)

    def hvp_works(self, w: torch.Tensor) -> bool:
        """Can this model be differentiated twice (custom autograd functions may not)?"""
        try:
            graph = self._curvature(w.detach().to(device="cpu", dtype=torch.float64).numpy())
            hv = graph.hvp(torch.ones_like(graph.grad))
            return bool(torch.isfinite(hv).all())
        except RuntimeError:
            return False
        finally:
            self.graph = None

    def jac_times(self, t, y, fy, v, Jv) -> None:
        self.check_abort()
        self.hvp_evals += 1
        graph = self.graph
        gd = graph.grad
        gg = float(torch.dot(gd, gd))
        hv = graph.hvp(self._torch(v))
        jv = hv.add_(gd, alpha=-2.0 * float(torch.dot(gd, hv)) / gg)
        self._write(Jv, jv, -1.0 / gg)


class CvodeFlow(Dynamics):
    """``integrator=cvode``: BDF + GMRES with exact J*v, segmented for exact resume."""

    name = "flow"
    faithful_to_flow = True

    def __init__(self, problem, config):
        super().__init__(problem, config)
        flow, options = FlowOptions.from_config(config), CvodeOptions.from_config(config)
        self.rtol, self.atol = flow.rtol, flow.atol
        self.fraction = options.cvode_segment
        self.krylov_dim = options.cvode_krylov_dim
        self.jacobian = options.cvode_jacobian
        self.system = SClockSystem(problem)
        self.system.check_abort = self.check_abort
        self.system.observe = lambda log_risk: self.observe is not None and self.observe(log_risk)
        self.hvp_ok: Optional[bool] = None
        self.segment: Optional[dict] = None  # start, end, outputs returned (checkpointed)
        self.solver = None
        self.last_w: Optional[torch.Tensor] = None
        self.replayed_grad_evals = 0  # work redone after a resume (not in grad_evals)
        self.solver_options: dict = {}  # extra CVODE options (experiments, benchmarks)
        # One intra-op thread unless ``threads`` is set: CVODE's evaluations are sequential and
        # small, and on a shared 2-core machine two OpenMP threads spin at every barrier
        # (measured, Fig. 1 width 10,000 under load: 137 ms per evaluation, against 3 ms).
        self.single_thread = RuntimeOptions.from_config(config).threads == 0 and problem.device.type == "cpu"

    # -- checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict:
        seg = self.segment
        if seg is None:
            return {"segment": None}
        return {"segment": {k: seg[k] for k in ("w0", "s0", "s1", "times", "drift", "done")}}

    def load_state_dict(self, state: dict) -> None:
        seg = state.get("segment")
        self.segment = None if seg is None else dict(seg, replay=True)
        self.solver = None

    # -- CVODE ------------------------------------------------------------------------
    def _new_solver(self):
        from sksundae.cvode import CVODE, CVODEJacTimes

        options = dict(
            method="BDF",
            linsolver="gmres",
            krylov_dim=self.krylov_dim,
            rtol=self._rtol(),
            atol=self._atol(),
            max_num_steps=1_000_000,
        )
        options.update(self.solver_options)
        if self.system.exact:
            options["jactimes"] = CVODEJacTimes(self.system.jac_setup, self.system.jac_times)
        return CVODE(self.system.rhs, **options)

    def _rtol(self) -> float:
        """``rtol``, shrinking like ``S_TIGHTEN / s`` beyond ``S_TIGHTEN``.  The margins enter
        the loss as ``e^{-p_i}`` and grow like ``s``: a relative error ``rtol`` in ``W`` moves
        them by ``~k s rtol`` in absolute terms, and the softmin weights, the gradient and above
        all the alignment ``cos(W, -g)`` (whose ``1 - cos`` is ~1e-4 there) follow
        exponentially.  Measured on Fig. 1 (width 1000, rtol 1e-6): without this, 9 of 307
        outputs beyond ``s = 3000`` reported ``1 - cos`` off by 1-6%; with it none by more than
        1e-3 of ``1 - cos``, for 11% more evaluations up to ``s = 1e5``.  Float64 bounds this:
        one ulp in ``W`` already moves the gradient by ~``lambda k s 1e-16`` relative (``lambda``
        the stiffness in units of ``s``), so past ``s ~ 1e8`` the tolerance sits at
        ``RTOL_FLOOR`` and CVODE works hard for it (measured: ``s`` = 1e8 -> 1e9 cost 275k
        evaluations at width 1000, ``s`` = 4.6 -> 1e8 cost 21k)."""
        return max(self.rtol * min(1.0, S_TIGHTEN / max(self.segment["s1"], 1.0)), RTOL_FLOOR)

    def _atol(self) -> float:
        """``atol`` floor raised to ``rtol`` times the RMS weight of the segment's start: an
        error that small in a weight far below the typical size moves neither the direction
        nor the margins beyond the tolerance, and not spending steps on it halves the cost."""
        w0 = self.segment["w0"]
        return max(self.atol, self._rtol() * float(w0.norm()) / math.sqrt(max(w0.numel(), 1)))

    def _exact_jacobian(self, s1: float) -> bool:
        """Difference quotients perturb the margins by ~``k s rtol`` relative, an error that the
        Newton matrix amplifies by ``gamma lambda``: cheap and good early (one gradient instead of
        a Hessian-vector product), useless late.  ``auto`` switches at ``k s rtol = DQ_LIMIT``."""
        if self.jacobian == "dq":
            return False
        degree = self.problem.degree or 1
        if self.jacobian == "auto" and degree * max(s1, 1.0) * self.rtol <= DQ_LIMIT:
            return False
        if self.hvp_ok is None:  # a one-off probe, not counted in grad_evals
            self.hvp_ok = self.system.hvp_works(self.segment["w0"])
            if not self.hvp_ok:
                warnings.warn(
                    "cvode flow: the model cannot be differentiated twice; using difference quotients for J*v",
                    stacklevel=2,
                )
        return self.hvp_ok

    def _log_spacing(self, target: Optional[float]) -> float:
        # The trainer's log spacing (Dynamics.log_spacing), not one derived from the target
        # of this step: a step may be asked to land on a milestone far below the run's goal.
        return self.log_spacing

    def _start(self, w: torch.Tensor, ev, target: Optional[float], end: Optional[float] = None) -> None:
        s0 = math.log(self.problem.n) - ev.log_risk
        s1 = segment_end(s0, target, self.fraction) if end is None or end <= s0 else end
        w0 = w.detach().to(device="cpu", dtype=torch.float64).clone()
        self.segment = {"w0": w0, "s0": s0, "s1": s1, "times": [], "done": False, "drift": 0.0}
        self.system.exact = self._exact_jacobian(s1)
        self.solver = self._new_solver()
        self.solver.init_step(s0, w0.numpy())

    def _advance(self, t_out: float, tstop: float) -> np.ndarray:
        result = self.solver.step(t_out, tstop=tstop)
        if not result.success:
            raise FloatingPointError(f"cvode flow: {result.message} at s = {result.t:.6g}")
        return result.y

    def _replay(self, w: torch.Tensor) -> bool:
        """Redo the checkpointed segment up to its last returned output.  True if it lands on
        the checkpointed point: bit for bit where nothing changed, or within ``1e-3 rtol``
        where only rounding did (another number of processes sums the gradient in another
        order); the replayed solver then goes on, as the uninterrupted run did."""
        seg = self.segment
        before = self.system.grad_evals
        self.system.exact = self._exact_jacobian(seg["s1"])
        self.solver = self._new_solver()
        self.solver.init_step(seg["s0"], seg["w0"].numpy())
        y = seg["w0"].numpy()
        self.replaying = True
        try:
            for t_out, tstop in seg["times"]:
                y = self._advance(t_out, tstop)
        finally:
            self.replaying = False
        self.replayed_grad_evals += self.system.grad_evals - before
        seg.pop("replay", None)
        replayed = torch.from_numpy(np.array(y)).to(w.dtype)
        target = w.detach().cpu()
        if torch.equal(replayed, target):
            return True
        gap = float((replayed.double() - target.double()).norm() / target.double().norm())
        return gap <= 1e-3 * self._rtol()

    def _next_time(self, t_now: float, seg: dict, target: Optional[float]) -> tuple[float, float, bool]:
        """``(t_out, tstop, last)`` of the next output.  Outputs sit on the *true* clock: the
        next multiple of the output spacing, shifted by the drift (true ln(n/L) minus CVODE's
        s) seen at the last output, and CVODE interpolates there.  The segment's last output is
        a step of its own onto ``tstop`` (interpolants inside long BDF steps carry errors in
        the stiff directions that the alignment, late in training, amplifies), at the grid end
        or, where the true clock lags, just beyond it, so that a target is met, never missed."""
        drift, s1 = seg["drift"], seg["s1"]
        spacing = output_spacing(t_now + drift, self._log_spacing(target))
        # Aim a hair past the grid point, so that the trainer's log grid is met, never missed.
        true_next = (math.floor((t_now + drift) / spacing + 0.25) + 1) * spacing
        t_out = true_next - drift + 1e-7 * max(abs(true_next), 1.0)
        if t_out < s1 - drift - 0.25 * spacing and t_out < s1:
            return t_out, s1, False
        end = max(s1, s1 - drift + 1e-7 * max(abs(s1), 1.0), t_now + 1e-9 * max(abs(t_now), 1.0))
        return end, end, True

    def step(self, w, ev, target: Optional[float] = None) -> StepResult:
        with one_thread(self.single_thread):
            return self._step(w, ev, target)

    def _step(self, w, ev, target: Optional[float]) -> StepResult:
        seg = self.segment
        if seg is not None and seg["done"]:
            seg = None  # finished: the next segment starts from the true ln(n/L) of w
        elif seg is not None and seg.get("replay"):
            if not self._replay(w):
                self._start(w, ev, target, end=seg["s1"])  # same grid end: the segmentation stays
                seg = self.segment
        elif seg is not None and not (
            self.solver is not None and self.last_w is not None and torch.equal(self.last_w, w)
        ):
            seg = None  # called from another point than the one returned last
        if seg is None:
            self._start(w, ev, target)
            seg = self.segment
        before = self.system.grad_evals
        t_now = seg["times"][-1][0] if seg["times"] else seg["s0"]
        t_out, tstop, seg["done"] = self._next_time(t_now, seg, target)
        y = self._advance(t_out, tstop)
        # ``y`` is the solver's fresh copy: adopt it without another one.
        w_new = torch.from_numpy(y).to(device=self.problem.device, dtype=self.problem.dtype)
        new = self.problem.evaluate(w_new)
        if not finite(new):
            raise FloatingPointError(f"cvode flow: non-finite risk or gradient at s = {t_out:.6g}")
        seg["times"].append((t_out, tstop))
        seg["drift"] = (math.log(self.problem.n) - new.log_risk) - t_out
        self.last_w = w_new
        return StepResult(w_new, new, self.system.grad_evals - before + 1, 0)
