"""Plain constant-step GD as a baseline: its best step, and where it would get to.

    python -c "from diralign.bench.baseline import extrapolate_steps; help(extrapolate_steps)"

Constant-step GD on ``L`` slows down like ``ln(n/L) ~ ln t`` near separability, so no time
cap lets it reach ``ln(n/L) = 30``, let alone 1000.  The benchmark therefore

* gives it its best chance: ``eta`` is the value of a geometric grid that gets furthest in a
  short trial without diverging (tuning not counted as its work);
* reports how far it got, and *estimates* the evaluations it would need for higher targets
  by fitting ``ln(n/L) = a + b ln(evals)`` to the last decade of its own trace (as log10, so
  the number stays finite: e^1000 evaluations is not a float);
* estimates where float64 stops it whatever the time: the updates ``eta L grad log L`` fall
  below half an ulp of ``W`` (rounded away), and ``exp(log L)`` underflows at ``log L ~ -745``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import apply_overrides
from ..dynamics import make_dynamics
from .follow import follow

ETA_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 3))  # 1e-4 ... 10 on L (sum over examples)


def tune_constant_eta(problem, w0, config, trial_steps: int, grid=ETA_GRID) -> dict:
    """The grid's ``eta`` that reaches the highest ``ln(n/L)`` in ``trial_steps`` steps."""
    trials = {}
    for eta in grid:
        cfg = apply_overrides(config, ["dynamics=constant-gd", f"constant_gd_eta={eta!r}"])
        out = follow(
            "tune", problem, w0, make_dynamics(problem, cfg), [math.inf], time_cap=math.inf, eval_cap=trial_steps
        )
        ok = not out.stop_reason.startswith("failed") and math.isfinite(out.ln_n_over_L)
        trials[eta] = out.ln_n_over_L if ok else None
    finite = {eta: s for eta, s in trials.items() if s is not None}
    best = max(finite, key=lambda eta: finite[eta]) if finite else min(grid)
    return {"eta": best, "trial_steps": trial_steps, "trials": {f"{eta:.3g}": s for eta, s in trials.items()}}


def extrapolate_steps(trace: dict, targets) -> dict:
    """log10 of the evaluations to each target from a fit ``s = a + b ln(evals)``.

    Fitted on trace points in the last decade of evaluations; ``None`` when the trace is too
    short or not rising.
    """
    evals = np.asarray(trace["grad_evals"], dtype=float)
    s = np.asarray(trace["ln_n_over_L"], dtype=float)
    keep = (evals >= evals.max() / 10.0) & (evals > 0) & np.isfinite(s)
    if keep.sum() < 4:
        return {"fit": None, "log10_grad_evals": {f"{t:g}": None for t in targets}}
    slope, intercept = np.polyfit(np.log(evals[keep]), s[keep], 1)
    out = {}
    for t in targets:
        out[f"{t:g}"] = float((t - intercept) / slope / math.log(10.0)) if slope > 0 else None
    return {"fit": {"a": float(intercept), "b": float(slope), "points": int(keep.sum())}, "log10_grad_evals": out}


def float64_limit(problem, w: torch.Tensor, grad_log_risk: torch.Tensor, log_risk: float, eta: float) -> dict:
    """Where working precision stops constant-step GD, estimated at its last point.

    The update's largest component relative to half an ulp of that weight shrinks with
    ``L`` (``grad log L`` and ``W`` change slowly): it is rounded away entirely once ``L``
    has fallen by that ratio.  ``exp(log L)`` itself underflows below the smallest subnormal.
    """
    s_now = math.log(problem.n) - log_risk
    update = (eta * math.exp(log_risk)) * grad_log_risk.abs()
    half_ulp = 0.5 * (torch.nextafter(w.abs(), torch.full_like(w, math.inf)) - w.abs())
    ratio = float((update / half_ulp).max())
    smallest = float(torch.finfo(w.dtype).smallest_normal) * float(torch.finfo(w.dtype).eps)  # smallest subnormal
    underflow_s = math.log(problem.n) - math.log(smallest)
    rounding_s = s_now + math.log(ratio) if ratio > 0 else s_now
    return {
        "update_over_half_ulp": ratio,
        "rounded_away_at_ln_n_over_L": min(rounding_s, underflow_s),
        "risk_underflows_at_ln_n_over_L": underflow_s,
    }
