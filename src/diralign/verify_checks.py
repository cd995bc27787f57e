"""Row builders for ``diralign verify``: one claim of the paper, measured on a run directory.

    python -c "from diralign.verify_checks import RunData; print(RunData.__doc__)"

Every function here reads a finished run directory (log.csv, margins.bin, directions.bin,
summary.json) and returns a :class:`Row`.  Tolerances follow three rules, each stated in
the row:

* **Exact inequalities** (Lemma C.5, the Lyu & Li monotonicity and alignment budget,
  the deep-linear conservation laws) get the integrator's or the floating-point
  tolerance only.
* **Limits without a rate in the paper** ("X converges", "e -> 0") use the *decade test*:
  the change over the last decade of ``ln(n/L)`` must be smaller than the change over the
  first decade after Assumption 2.3 holds (``ratio < 1``; reported with the per-decade
  factor ``r = ratio^(1/Delta)``, ``Delta`` the decades between the windows, and the
  exponent ``p = -log10 r`` of the equivalent power law ``s^-p``).  Finite path length
  (Theorem 3.1) needs the decade increments to be summable; the theorem gives no rate, so
  only shrinking is required.  Why not more: a part of ``W`` that stops growing (an
  unbalanced layer, a neuron that stops growing) shrinks relative to ``||W|| ~ s^(1/k)``,
  so ``W/||W||`` can converge as slowly as ``s^(-1/k)`` (``p = 1/k``: 0.2 for H-AlexNet), and
  the counterexample's winding, read on the ``ln(n/L)`` axis, shrinks like ``1/ln s`` --
  an apparent ``p`` of about 0.25 at ``s <= 1e4``.  No finite-horizon rate threshold on
  this axis separates the two; the counterexample's rows therefore use its own clock
  ``sigma`` (``~ ln||W||``), where its increments do not shrink at all.
* **Alignment** (Theorem 4.1) uses Lyu & Li's exact budget: along the flow
  ``d ln(alpha~) >= k tan^2(theta) d ln ||W||`` (from ``beta >= alpha``, Lemma C.5), so over
  the last decade the ``ln||W||``-average of ``tan^2 theta`` is at most
  ``B = ln(alpha~(S)/alpha~(S/10)) / (k ln(||W(S)||/||W(S/10)||))``.  Pointwise alignment
  means the final ``tan^2 theta`` sits inside that average budget; ``B -> 0`` as ``S`` grows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np

from .rundir import Run, schema

PASS, FAIL, INFO, MISSING = "PASS", "FAIL", "INFO", "N/A"
DECADE_LIMIT = 1.0  # the last decade's change must be below the first's (see the module docstring)
LEMMA_C5_ROUNDING = 1e-9  # relative: beta = <grad alpha, W>/k sums P float64 products


@dataclass
class Row:
    claim: str  # what the paper says
    source: str  # where it says it
    case: str  # which seeded experiment measured it
    quantity: str
    predicted: str
    measured: Optional[float]
    tolerance: str
    status: str  # PASS / FAIL / INFO (theorem does not apply: reported) / N/A (not measurable here)
    note: str = ""
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["measured"] = None if self.measured is None or not math.isfinite(self.measured) else float(self.measured)
        out["details"] = {k: _json_safe(v) for k, v in self.details.items()}
        return out


def _json_safe(value):
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def verdict(ok: bool) -> str:
    return PASS if ok else FAIL


def missing_row(claim: str, source: str, case: str, why: str) -> Row:
    return Row(claim, source, case, "-", "-", None, "-", MISSING, why)


class RunData(Run):
    """A finished run directory, read once through the one reader (:class:`diralign.rundir.Run`),
    with the arrays as float64 and the helpers the checks need."""

    def __init__(self, path):
        super().__init__(path)
        self.s = self.ln_n_over_L
        if np.any(np.diff(self.s) < 0):
            raise ValueError(f"{self.path}: ln(n/L) is not monotone in the log (not a gradient flow run?)")
        self.n = len(self.margins[0]) if self.margins is not None else None

    @cached_property
    def margins(self) -> Optional[np.ndarray]:
        margins = self.array(schema.MARGINS)
        return None if margins is None or len(margins) == 0 else np.asarray(margins, dtype=np.float64)

    @cached_property
    def directions(self) -> Optional[np.ndarray]:
        directions = self.array(schema.DIRECTIONS)
        return (
            None if directions is None or len(directions) < len(self.log) else np.asarray(directions, dtype=np.float64)
        )

    @property
    def target(self) -> float:
        return float(self.s[-1])

    @property
    def rtol(self) -> float:
        return float(self.config.get("rtol", 1e-7))

    def at(self, column: str, s: float) -> float:
        return float(np.interp(s, self.s, self.log[column].to_numpy(dtype=np.float64)))

    def row_index(self, s: float) -> int:
        return int(np.argmin(np.abs(self.s - s)))

    def margins_at(self, s: float) -> np.ndarray:
        """Per-example normalised margins at ``s`` (linear interpolation between log points)."""
        i = int(np.clip(np.searchsorted(self.s, s), 1, len(self.s) - 1))
        s0, s1 = self.s[i - 1], self.s[i]
        t = 0.0 if s1 == s0 else float(np.clip((s - s0) / (s1 - s0), 0.0, 1.0))
        return (1 - t) * self.margins[i - 1] + t * self.margins[i]

    def weights_at(self, s: float) -> np.ndarray:
        """``W`` at the log point nearest ``s`` (stored direction times logged norm)."""
        i = self.row_index(s)
        return self.directions[i] * float(self.log["param_norm"].iloc[i])

    @property
    def faithful(self) -> bool:
        """Whether the numbers are the gradient flow's (error-controlled), not a discrete method's."""
        return bool(self.summary.get("faithful_to_flow"))

    def path_lengths(self) -> np.ndarray:
        """Directional path length at each log point.  Flow runs: the trainer's per-step sum
        (the instrument).  Discrete runs: chords between *logged* directions, which filter
        the step-scale zigzag of GD iterates (on the flow both agree; measured on deep
        linear to 2e-4 relative)."""
        if self.faithful or self.directions is None:
            return self.log["path_length"].to_numpy(dtype=np.float64)
        chords = np.linalg.norm(np.diff(self.directions, axis=0), axis=1)
        return np.concatenate([[0.0], np.cumsum(chords)])

    def theory_start(self) -> float:
        """``s_a``: the first logged ``ln(n/L)`` with ``L < l(0)`` (Assumption 2.3), at least 1."""
        below = self.log["below_loss_at_zero"].to_numpy() > 0
        if not below.any():
            return math.inf
        # A flow started late (flow_from_ln): the decades count from where it took over.
        start = self.summary.get("faithful_from_ln_n_over_L") or 0.0
        return max(float(self.s[np.argmax(below)]), 1.0, float(start))


@dataclass
class Decades:
    """The first decade ``[s_a, 10 s_a]`` after Assumption 2.3 and the last ``[S/10, S]``."""

    s_a: float
    S: float

    @property
    def apart(self) -> float:
        """Decades between the two windows' starts (``Delta``)."""
        return math.log10(self.S / 10.0 / self.s_a) if self.valid else 0.0

    @property
    def valid(self) -> bool:
        return math.isfinite(self.s_a) and self.S / 10.0 > self.s_a

    @property
    def tolerance(self) -> float:
        return DECADE_LIMIT

    def describe(self) -> str:
        return f"< 1 (shrinking; windows {self.apart:.2f} decades apart)"

    def rate(self, ratio: float) -> str:
        """Per-decade factor and power-law exponent equivalent to ``ratio``."""
        if not (ratio > 0 and math.isfinite(ratio) and self.apart > 0):
            return ""
        r = ratio ** (1.0 / self.apart)
        return f"per decade x{r:.3g} (like s^({math.log10(r):+.2f}))"


def decades_of(run: RunData) -> Decades:
    return Decades(run.theory_start(), run.target)


def too_short(claim, source, case, run: RunData) -> Row:
    d = decades_of(run)
    return missing_row(
        claim, source, case, f"run too short for the decade test: s_a = {d.s_a:.3g}, S = {d.S:.3g} (need S > 10 s_a)"
    )


def path_length_plateau(run: RunData, case: str) -> Row:
    """Theorem 3.1: the directional path length plateaus (decade test on its increments)."""
    claim, source = "directional path length is finite (W/||W|| converges)", "Thm 3.1"
    d = decades_of(run)
    if not d.valid:
        return too_short(claim, source, case, run)
    path = run.path_lengths()

    def zeta(s):
        return float(np.interp(s, run.s, path))

    first = zeta(10 * d.s_a) - zeta(d.s_a)
    last = zeta(d.S) - zeta(d.S / 10)
    ratio = last / first if first > 0 else math.inf
    note = f"zeta grew {first:.3g} on [{d.s_a:.3g}, {10 * d.s_a:.3g}] and {last:.3g} on [{d.S / 10:.3g}, {d.S:.3g}]; total {path[-1]:.4g}"
    status = verdict(ratio < d.tolerance)
    note += f"; {d.rate(ratio)}; a bounded part of W would give s^({-1 / run.degree:+.2f}) (-1/k)" if run.degree else ""
    if not run.faithful:
        status = INFO
        note += (
            f"; dynamics {run.summary.get('dynamics')}: Thm 3.1 is about the flow, and the paper leaves discrete methods open "
            "(Sec. 5); zeta here sums chords between logged directions"
        )
    return Row(
        claim,
        source,
        case,
        "path-length growth: last decade / first decade of ln(n/L)",
        "-> 0 (plateau)",
        ratio,
        d.describe(),
        status,
        note,
        {"first_decade": first, "last_decade": last, "s_a": d.s_a, "S": d.S, "path_length": float(path[-1])},
    )


def margins_converge(run: RunData, case: str) -> Row:
    """Corollary 3.2: every normalised margin converges (decade test on max_i |dq_i|)."""
    claim, source = "per-example normalised margins p_i/||W||^k converge", "Cor 3.2"
    d = decades_of(run)
    if run.margins is None:
        return missing_row(claim, source, case, "the run stored no margins")
    if not d.valid:
        return too_short(claim, source, case, run)
    first = float(np.abs(run.margins_at(10 * d.s_a) - run.margins_at(d.s_a)).max())
    last = float(np.abs(run.margins_at(d.S) - run.margins_at(d.S / 10)).max())
    ratio = last / first if first > 0 else math.inf
    scale = float(np.abs(run.margins[-1]).max())
    note = f"max change {first:.3g} then {last:.3g} ({last / scale:.2g} of max|q_i|) over n = {run.n} examples (margins stored as float32); {d.rate(ratio)}"
    status = verdict(ratio < d.tolerance)
    if not run.faithful:
        status = INFO
        note += f"; dynamics {run.summary.get('dynamics')} (Cor 3.2 is about the flow)"
    return Row(
        claim,
        source,
        case,
        "max_i |change of q_i|: last decade / first decade",
        "-> 0",
        ratio,
        d.describe(),
        status,
        note,
        {"first_decade": first, "last_decade": last},
    )


def lyu_li_budget(run: RunData, s_from: float, s_to: float) -> float:
    """``B = ln(alpha~(s_to)/alpha~(s_from)) / (k ln(||W(s_to)||/||W(s_from)||))``."""
    a0, a1 = run.at("normalized_smoothed_margin", s_from), run.at("normalized_smoothed_margin", s_to)
    r0, r1 = run.at("param_norm", s_from), run.at("param_norm", s_to)
    if not (a0 > 0 and a1 > 0 and r1 > r0):
        return math.nan
    return math.log(a1 / a0) / (run.degree * math.log(r1 / r0))


def alignment(run: RunData, case: str, applies: bool = True, why_not: str = "") -> Row:
    """Theorem 4.1: cos(W, -grad L) -> 1; the final tan^2 must sit in Lyu & Li's budget."""
    claim, source = "alignment: cos(W, -grad L) -> 1", "Thm 4.1"
    d = decades_of(run)
    if not run.degree:
        return missing_row(claim, source, case, "the model is not homogeneous (no Lyu-Li budget)")
    if not d.valid:
        return too_short(claim, source, case, run)
    cos = float(run.log["alignment_cos"].iloc[-1])
    tan2 = 1.0 / cos**2 - 1.0 if cos > 0 else math.inf
    budget = lyu_li_budget(run, d.S / 10, d.S)
    note = f"cos = {cos:.6f} (1 - cos = {1 - cos:.2e}) at ln(n/L) = {d.S:.4g}; dynamics {run.summary.get('dynamics')}"
    status = verdict(tan2 <= budget)
    if not applies:
        status = INFO
        note = f"{why_not}; {note}; the budget bounds only the average, not the end value"
    if not run.faithful:
        status = INFO
        note += "; measured at discrete iterates, whose alignment carries step-size noise (README)"
    return Row(
        claim,
        source,
        case,
        "tan^2(angle) at the end",
        "-> 0",
        tan2,
        f"<= Lyu-Li budget B = {budget:.3g} (last decade)",
        status,
        note,
        {"cos": cos, "budget": budget},
    )


def lyu_li_average(run: RunData, case: str) -> Row:
    """Lyu & Li's inequality itself: ln||W||-average of tan^2 over the last decade <= B."""
    claim, source = "d ln alpha~ >= k tan^2(theta) d ln||W|| along the flow", "Lyu & Li 2020 (via Lemma C.5)"
    d = decades_of(run)
    if not run.degree:
        return missing_row(claim, source, case, "the model is not homogeneous")
    if not d.valid:
        return too_short(claim, source, case, run)
    mask = (run.s >= d.S / 10) & (run.s <= d.S)
    log_norm = np.log(run.log["param_norm"].to_numpy()[mask])
    cos = run.log["alignment_cos"].to_numpy()[mask]
    tan2 = 1.0 / cos**2 - 1.0
    average = float(np.trapezoid(tan2, log_norm) / (log_norm[-1] - log_norm[0]))
    budget = lyu_li_budget(run, run.s[mask][0], run.s[mask][-1])
    status, note = _on_the_flow(
        run,
        verdict(average <= budget),
        f"{int(mask.sum())} log points; B is the budget ln(alpha~ ratio)/(k ln(norm ratio))",
    )
    return Row(
        claim,
        source,
        case,
        "ln||W||-average of tan^2 over the last decade",
        f"<= B = {budget:.3g}",
        average,
        "<= B (trapezoid over log points; exact otherwise)",
        status,
        note,
        {"budget": budget},
    )


def _on_the_flow(run: RunData, status: str, note: str) -> tuple[str, str]:
    """Lyu & Li's inequalities hold along the gradient flow; measured on a discrete method they
    are reported (INFO), not judged: a step at the edge of stability breaks them by design."""
    if run.faithful:
        return status, note
    return INFO, f"{note}; dynamics {run.summary.get('dynamics')}: the inequality is along the flow, so not judged here"


def smoothed_margin_monotone(run: RunData, case: str) -> Row:
    """Lyu & Li: alpha~ = alpha/||W||^k is nondecreasing once L < l(0)."""
    claim, source = "normalised smoothed margin alpha~ is nondecreasing", "Lyu & Li 2020, Thm 4.1"
    if not run.degree:
        return missing_row(claim, source, case, "the model is not homogeneous")
    rows = run.log[run.log["below_loss_at_zero"] > 0]
    a = rows["normalized_smoothed_margin"].to_numpy(dtype=np.float64)
    if len(a) < 2:
        return missing_row(claim, source, case, "fewer than two log points with L < l(0)")
    relative = np.diff(a) / np.abs(a[1:])
    steps = np.diff(rows["step"].to_numpy())
    # Each accepted step's local error is <= rtol relative (error-controlled integrator);
    # alpha~ scales like ||W||^k/||W||^k, so a step can fake a relative drop of ~k rtol.
    # 10x covers the RMS error norm the controller uses.
    allowance = 10.0 * run.degree * run.rtol * np.maximum(steps, 1)
    worst = int(np.argmin(relative + allowance))
    ok = bool(np.all(relative >= -allowance))
    return Row(
        claim,
        source,
        case,
        "smallest relative step of alpha~ between log points",
        ">= 0",
        float(relative.min()),
        f">= -10 k rtol (steps between) = {-allowance[worst]:.1g}",
        *_on_the_flow(run, verdict(ok), f"{len(a)} log points after Assumption 2.3; alpha~ {a[0]:.4g} -> {a[-1]:.6g}"),
        {},
    )


def lemma_c5(run: RunData, case: str) -> Row:
    """Lemma C.5: alpha <= beta <= alpha + 2 ln n + 1 wherever L < l(0)."""
    claim, source = "alpha <= beta <= alpha + 2 ln n + 1", "Lemma C.5"
    rows = run.log[run.log["below_loss_at_zero"] > 0]
    alpha = rows["smoothed_margin"].to_numpy(dtype=np.float64)
    beta = rows["beta"].to_numpy(dtype=np.float64)
    if len(alpha) == 0:
        return missing_row(claim, source, case, "no log point with L < l(0)")
    upper = 2.0 * math.log(run.n) + 1.0
    scale = np.maximum(1.0, np.abs(beta))
    violation = np.maximum(alpha - beta, beta - alpha - upper) / scale
    worst = float(violation.max())
    return Row(
        claim,
        source,
        case,
        "worst relative violation over log points",
        "<= 0",
        worst,
        f"<= {LEMMA_C5_ROUNDING:g} (float64 rounding of <grad alpha, W>)",
        verdict(worst <= LEMMA_C5_ROUNDING),
        f"{len(alpha)} log points; beta - alpha in [{(beta - alpha).min():.3g}, {(beta - alpha).max():.3g}], 2 ln n + 1 = {upper:.3g}",
        {},
    )


def decaying_error(
    claim, source, case, quantity, run: RunData, error_at, floor: float, floor_why: str, note: str = ""
) -> Row:
    """Decade test for an error that must tend to 0: ``e(S) < e(10 s_a)`` (it shrank over the
    run after the first decade), or ``e(S) <= floor`` (the references' own accuracy)."""
    d = decades_of(run)
    if not d.valid:
        return too_short(claim, source, case, run)
    start = 10 * d.s_a
    e0, e1 = float(error_at(start)), float(error_at(d.S))
    ratio = e1 / e0 if e0 > 0 else math.inf
    window = Decades(start, 10 * d.S)  # e(S) against e(10 s_a): log10(S / (10 s_a)) decades apart
    ok = e1 <= floor or ratio < DECADE_LIMIT
    return Row(
        claim,
        source,
        case,
        quantity,
        "-> 0",
        e1,
        f"< e({start:.3g}) (shrinking) or <= {floor:g} ({floor_why})",
        verdict(ok),
        (note + "; " if note else "") + f"e({start:.3g}) = {e0:.3g}, ratio {ratio:.3g}; {window.rate(ratio)}",
        {"error_start": e0, "ratio": ratio},
    )
