"""The seeded experiments behind ``diralign verify``, each turned into verdict rows.

    python -c "from diralign.verify_cases import CASES; print(list(CASES))"

A case runs one experiment through the project's own runner (gradient flow, the
reference dynamics) into a run directory, then measures the paper's claims on that
directory against references computed independently of the training code: SVMs by
cvxpy+Clarabel and sklearn, linear programs by scipy's HiGHS, closed forms from the
deep-linear conservation laws, and the counterexample's planar flow in closed form.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import maxmargin
from .verify_checks import (
    Row,
    RunData,
    alignment,
    decades_of,
    decaying_error,
    lemma_c5,
    lyu_li_average,
    lyu_li_budget,
    margins_converge,
    missing_row,
    path_length_plateau,
    smoothed_margin_monotone,
    too_short,
    verdict,
)

SVM_CROSS_CHECK = 1e-8  # 1 - cos between cvxpy and sklearn: ||du||^2/2 with ||du||^2 <= 2 x duality gap (1e-12 / 1e-10 solver tolerances), x100
REFERENCE_FLOOR = 1e-8  # errors below this are at the references' own accuracy


def run_experiment(name: str, overrides: list[str], out: Path) -> RunData:
    from .runner import start_run

    start_run(name, overrides, out, force=True, quiet=True)
    return RunData(out)


def rebuild(run: RunData):
    """The run's experiment set-up (data, model, ``w0``), rebuilt from its config (seeded)."""
    from .config import config_from_dict
    from .experiments import get_experiment

    experiment = get_experiment(run.meta["experiment"])
    config = config_from_dict(experiment.Config, run.config)
    return experiment.setup(config, torch.float64, torch.device("cpu"))


def common_rows(run: RunData, case: str) -> list[Row]:
    return [
        path_length_plateau(run, case),
        margins_converge(run, case),
        alignment(run, case),
        lyu_li_average(run, case),
        smoothed_margin_monotone(run, case),
        lemma_c5(run, case),
    ]


# -- deep linear: Prop. 4.4 and Lemma E.1 ------------------------------------------------------


def _layers(problem, w) -> list[np.ndarray]:
    return [t.detach().double().numpy() for t in problem.unflatten(torch.as_tensor(w, dtype=torch.float64)).values()]


def _invariants(layers: list[np.ndarray]) -> list[np.ndarray]:
    """``D_j = A_{j+1}^T A_{j+1} - A_j A_j^T``: constant along the gradient flow of a deep linear net."""
    return [b.T @ b - a @ a.T for a, b in zip(layers[:-1], layers[1:])]


def _product(layers: list[np.ndarray]) -> np.ndarray:
    out = layers[0]
    for a in layers[1:]:
        out = a @ out
    return out.reshape(-1)


def deep_linear_case(overrides: list[str], workdir: Path) -> list[Row]:
    case = "deep linear (k=3)"
    run = run_experiment("deep-linear", overrides, workdir / "deep-linear")
    rows = common_rows(run, case)
    setup = rebuild(run)
    problem = setup.problem
    k = run.degree
    start = _layers(problem, setup.w0)
    final = _layers(problem, run.weights_at(run.target))
    norm2 = float(sum((a * a).sum() for a in final))
    D0, DS = _invariants(start), _invariants(final)
    drift = [float(np.linalg.norm(a - b, "nuc")) for a, b in zip(D0, DS)]
    steps = int(run.summary["steps"])

    # Lemma E.1, per layer: sum_j w_j (1 - cos_j) <= 1 - cos (Cauchy-Schwarz, w_j = ||A_j|| ||grad_j|| / (||W|| ||grad||)),
    # and w_j -> 1/k for deep linear nets; so each layer gets k times the model's allowance B/2.
    d = decades_of(run)
    budget = lyu_li_budget(run, d.S / 10, d.S) if d.valid else math.nan
    layer_cols = [c for c in run.log.columns if c.startswith("alignment_cos:")]
    layer_cos = [float(run.log[c].iloc[-1]) for c in layer_cols]
    worst = 1.0 - min(layer_cos)
    rows.append(
        Row(
            "per-layer alignment cos(A_j, -grad_j L) -> 1",
            "Lemma E.1",
            case,
            "max_j (1 - cos_j) at the end",
            "-> 0",
            worst,
            f"<= k B/2 = {k * budget / 2:.3g}",
            verdict(worst <= k * budget / 2),
            "cos_j = " + ", ".join(f"{c:.6f}" for c in layer_cos),
            {},
        )
    )

    # Lemma E.1, shares: the flow conserves ||A_j||^2 - ||A_{j+1}||^2, so s_j = 1/k + c_j/||W||^2 exactly,
    # c_j = ||A_j(0)||^2 - mean_l ||A_l(0)||^2.  Each accepted step moves ||A_j||^2 off that law by at most
    # ~2 rtol ||W||^2 (local error <= rtol ||W||), so the drift in s_j is at most 2 N rtol.
    sq0 = np.array([(a * a).sum() for a in start])
    c = sq0 - sq0.mean()
    predicted = 1.0 / k + c / norm2
    shares = np.array([float(run.log[f"share:{col.split(':', 1)[1]}"].iloc[-1]) for col in layer_cols])
    off = float(np.abs(shares - predicted).max())
    drift_tol = 2.0 * steps * run.rtol
    rows.append(
        Row(
            "layer norm shares s_j = ||A_j||^2/||W||^2 -> 1/k",
            "Lemma E.1",
            case,
            "max_j |s_j - 1/k| at the end",
            f"max_j |c_j|/||W||^2 = {float(np.abs(c).max() / norm2):.4g} (conservation law; -> 0)",
            float(np.abs(shares - 1.0 / k).max()),
            f"|s_j - closed form| <= 2 N rtol = {drift_tol:.2g}",
            verdict(off <= drift_tol),
            f"shares {', '.join(f'{s:.5f}' for s in shares)}; off the closed form by {off:.2g}; init norms {', '.join(f'{v:.3g}' for v in np.sqrt(sq0))}",
            {"shares": shares.tolist(), "predicted": predicted.tolist()},
        )
    )

    # Prop. 4.4, rank one: ||A_j||_F^2 - sigma_1^2 <= sum_{l >= j} ||D_l||_* (Weyl, down from the rank-one top
    # layer), with D_l the conserved invariants (their measured drift added).
    residual = [1.0 - np.linalg.svd(a, compute_uv=False)[0] ** 2 / (a * a).sum() for a in final]
    bound = []
    for j, a in enumerate(final):
        mass = sum(float(np.linalg.norm(D0[i], "nuc")) + drift[i] for i in range(j, len(D0)))
        bound.append(mass / float((a * a).sum()))
    ok = all(r <= b * (1 + 1e-9) + 1e-12 for r, b in zip(residual, bound))
    rows.append(
        Row(
            "each layer becomes rank one: A_j/||A_j|| -> v_j v_{j-1}^T",
            "Prop 4.4",
            case,
            "max_j (1 - sigma_1^2/||A_j||_F^2)",
            "-> 0",
            float(max(residual)),
            "<= sum_{l>=j} ||D_l||_* / ||A_j||_F^2 (invariants)",
            verdict(ok),
            "per layer: "
            + ", ".join(f"{r:.2g} <= {b:.2g}" for r, b in zip(residual, bound))
            + f"; invariant drift {max(drift):.1g}",
            {},
        )
    )

    # Prop. 4.4, adjacent layers: A_{j+1}^T A_{j+1} = A_j A_j^T + D_j, so by Davis-Kahan the top left singular vector
    # of A_j and the top right one of A_{j+1} make sin(angle) <= ||D_j|| / (sigma_1^2 - sigma_2^2 - ||D_j||).
    gaps, bounds = [], []
    for j, (a, b) in enumerate(zip(final[:-1], final[1:])):
        u = np.linalg.svd(a)[0][:, 0]
        v = np.linalg.svd(b)[2][0, :]
        gaps.append(1.0 - abs(float(u @ v)))
        sv = np.linalg.svd(a, compute_uv=False)
        spec = float(np.linalg.norm(D0[j], 2)) + drift[j]
        delta = sv[0] ** 2 - (sv[1] ** 2 if len(sv) > 1 else 0.0) - spec
        bounds.append((spec / delta) ** 2 if delta > 0 else 1.0)
    ok = all(g <= b * (1 + 1e-6) + 1e-12 for g, b in zip(gaps, bounds))
    rows.append(
        Row(
            "adjacent layers align: |u_j^T v_{j+1}| -> 1",
            "Prop 4.4",
            case,
            "max_j (1 - |u_j^T v_{j+1}|)",
            "-> 0",
            float(max(gaps)),
            "<= (||D_j|| / spectral gap)^2 (Davis-Kahan)",
            verdict(ok),
            ", ".join(f"{g:.2g} <= {b:.2g}" for g, b in zip(gaps, bounds)),
            {},
        )
    )

    # Prop. 4.4, SVM direction: references by cvxpy+Clarabel and sklearn, then the flow's product direction.
    X, y = setup.extras["X"].numpy(), setup.extras["y"].numpy()
    svm = maxmargin.hard_margin_svm(X, y)
    check = maxmargin.svm_sklearn(X, y)
    cross = 1.0 - float(svm.direction @ check.direction)
    rows.append(
        Row(
            "hard-margin SVM: cvxpy+Clarabel agrees with sklearn SVC(C=1e10)",
            "Prop 4.4 (reference)",
            case,
            "1 - cos(u_cvxpy, u_sklearn)",
            "0",
            cross,
            f"<= {SVM_CROSS_CHECK:g} (solver tolerances)",
            verdict(cross <= SVM_CROSS_CHECK),
            f"gamma_svm = {svm.margin:.8f} (cvxpy), {check.margin:.8f} (sklearn); support {len(svm.support)} points",
            {},
        )
    )

    def svm_error(s):
        p = _product(_layers(problem, run.weights_at(s)))
        return 1.0 - float(p @ svm.direction) / float(np.linalg.norm(p))

    rows.append(
        decaying_error(
            "end-to-end direction -> hard-margin SVM direction",
            "Prop 4.4",
            case,
            "1 - cos(A_k...A_1, u_svm)",
            run,
            svm_error,
            REFERENCE_FLOOR,
            "SVM reference accuracy",
            f"strong convexity of the SVM gives 1 - cos <= 1 - gamma(u)/gamma_svm = {1 - _direction_margin(final, X, y) / svm.margin:.3g}",
        )
    )

    def ratio_error(s):
        return 1.0 - run.at("min_normalized_margin", s) * k ** (k / 2) / svm.margin

    rows.append(
        decaying_error(
            "margin ratio min_i p_i/||W||^k / (gamma_svm / k^{k/2}) -> 1",
            "Prop 4.4",
            case,
            "1 - ratio",
            run,
            ratio_error,
            REFERENCE_FLOOR,
            "SVM reference accuracy",
            "AM-GM: ratio <= 1 always, = 1 only balanced, rank one and at the SVM",
        )
    )
    return rows


def _direction_margin(layers, X, y) -> float:
    p = _product(layers)
    return float((y * (X @ p)).min() / np.linalg.norm(p))


# -- S-ReLU: Prop. 4.6, saliency ---------------------------------------------------------------


def _srelu_state(w: np.ndarray, width: int):
    rows = w.reshape(width, -1)
    norms = np.linalg.norm(rows, axis=1)
    shares = norms**2 / (norms**2).sum()
    theta = rows / np.where(norms > 0, norms, 1.0)[:, None]
    return theta, shares


def saliency_row(run: RunData, case: str, count: int = 4) -> Row:
    """Input-gradient directions of a few fixed examples converge (decade test on their change)."""
    from .probes import saliency_directions

    claim, source = "saliency directions grad_x f / ||grad_x f|| converge", "Thm 4.1 (consequence)"
    d = decades_of(run)
    if run.directions is None:
        return missing_row(claim, source, case, "the run stored no directions")
    if not d.valid:
        return too_short(claim, source, case, run)
    setup = rebuild(run)
    problem = setup.problem
    x = problem.X[:count]

    def saliency(s):
        problem.load_into_model(torch.as_tensor(run.weights_at(s), dtype=problem.dtype))
        return saliency_directions(problem.model, x).detach().double().numpy()

    first = float(np.linalg.norm(saliency(10 * d.s_a) - saliency(d.s_a), axis=1).max())
    last = float(np.linalg.norm(saliency(d.S) - saliency(d.S / 10), axis=1).max())
    ratio = last / first if first > 0 else math.inf
    return Row(
        claim,
        source,
        case,
        f"max change of {count} saliency directions: last / first decade",
        "-> 0",
        ratio,
        d.describe(),
        verdict(ratio < d.tolerance),
        f"chord change {first:.3g} then {last:.3g} for examples 0-{count - 1} (grad_x f is continuous in W/||W||); {d.rate(ratio)}",
        {},
    )


def srelu_case(overrides: list[str], workdir: Path) -> list[Row]:
    run = run_experiment("srelu", overrides, workdir / "srelu")
    width = int(run.config["width"])
    case = f"S-ReLU (m={width}, n={run.n})"
    rows = common_rows(run, case)
    setup = rebuild(run)
    X, y, signs = setup.extras["X"].numpy(), setup.extras["y"].numpy(), setup.extras["signs"].numpy()

    def local_gap(s):
        theta, shares = _srelu_state(run.weights_at(s), width)
        lp = maxmargin.srelu_local_lp(X, y, theta, signs)
        trained = float((maxmargin.srelu_features(X, y, theta, signs) @ shares).min())
        return 1.0 - trained / lp.value

    summary = run.summary
    rows.append(
        decaying_error(
            "local guarantee: margin -> max_{s in simplex} min_i sum_j s_j phi_ij(theta_j)",
            "Prop 4.6.1",
            case,
            "1 - margin / LP value over the current directions",
            run,
            local_gap,
            REFERENCE_FLOOR,
            "HiGHS LP accuracy",
            f"LP (HiGHS) {summary['local_lp_margin']:.6g} vs trained {summary['min_normalized_margin']:.6g} at the end (trained <= LP always)",
        )
    )
    lower, upper = summary["infinite_width_margin_lower"], summary["infinite_width_margin_upper"]
    eps = summary["covering_epsilon"]
    margin = summary["min_normalized_margin"]
    floor = upper - 4.0 * eps
    vacuous = floor <= 0
    rows.append(
        Row(
            "global guarantee: margin >= infinite-width max margin - 4 eps",
            "Prop 4.6.2",
            case,
            "trained min normalised margin",
            f">= {upper:.4g} - 4 x {eps:.3g} = {floor:.3g}",
            margin,
            "exact (V from its certified upper bound)",
            verdict(margin >= floor and margin <= upper),
            f"infinite-width V in [{lower:.6g}, {upper:.6g}] (HiGHS grid LP, dual certificate); trained/V = {margin / lower:.4f}; "
            f"covering eps = {eps:.3g} at ln(n/L) = {summary['covering_ln_n_over_L']:.3g}"
            + ("; the bound is vacuous at this width (4 eps > V)" if vacuous else ""),
            {"lower": lower, "upper": upper, "eps": eps},
        )
    )
    rows.append(saliency_row(run, case))
    return rows


def relu_case(overrides: list[str], workdir: Path) -> list[Row]:
    """The non-smooth twin of S-ReLU, by normalised GD: an error-controlled flow crawls at the
    kinks (measured: dopri5 348k gradients to reach ln(n/L) = 1.2, CVODE 92k to reach 0.5)."""
    run = run_experiment("srelu", overrides + ["activation=relu"], workdir / "relu")
    case = f"ReLU twin (m={run.config['width']}, n={run.n})"
    why = "Thm 4.1 needs locally Lipschitz margin gradients; ReLU has kinks"
    return [alignment(run, case, applies=False, why_not=why)]


# -- Figure 1 network, H-AlexNet ---------------------------------------------------------------


def fig1_case(overrides: list[str], workdir: Path) -> list[Row]:
    from .experiments import EXPERIMENTS

    case = "Fig. 1 net (squared ReLU)"
    if "fig1" not in EXPERIMENTS:
        why = "experiment fig1 is not available in this build"
        return [
            missing_row("directional path length is finite", "Thm 3.1", case, why),
            missing_row("alignment -> 1", "Thm 4.1", case, why),
        ]
    run = run_experiment("fig1", overrides, workdir / "fig1")
    case = f"Fig. 1 net (m={run.config['width']}, n={run.n})"
    return [path_length_plateau(run, case), alignment(run, case)]


def alexnet_case(overrides: list[str], workdir: Path) -> list[Row]:
    from .experiments import EXPERIMENTS
    from .models import MODELS

    case = "H-AlexNet (digits)"
    if "margins" not in EXPERIMENTS or "h-alexnet" not in MODELS:
        why = "experiment margins / model h-alexnet not available in this build"
        return [missing_row("directional path length is finite", "Thm 3.1", case, why)]
    # sklearn digits upsampled to 16x16 (the smallest H-AlexNet takes): 4x fewer pixels than 32x32.
    from .data.images import digits

    data = digits(size=16, dtype=torch.float64)
    path = workdir / "digits16.npz"
    np.savez(path, X=data.X.numpy(), y=data.y)
    run = run_experiment("margins", overrides + [f"data={path}"], workdir / "h-alexnet")
    case = f"H-AlexNet (digits 16x16, n={run.n})"
    rows = [path_length_plateau(run, case), margins_converge(run, case)]
    rows.append(alignment(run, case, applies=False, why_not="H-AlexNet has ReLU and max-pool kinks"))
    return rows


# -- the counterexample ------------------------------------------------------------------------


def counterexample_case(sigma_end: float, workdir: Path) -> list[Row]:
    from .models.counterexample import planar_reference, spiral_flow

    case = "Mexican hat (non-definable)"
    flow = spiral_flow(sigma_end, points_per_decade=50, rtol=1e-8, atol=1e-10)
    sigma, zeta = flow.sigma, flow.path_length

    def at(values, s):
        return float(np.interp(math.log(s), np.log(sigma[1:]), values[1:]))

    lo = 100.0  # the direction has fallen into the spiral valley by sigma ~ 1e2 (it leaves the repelling curve at ~10)
    first = at(zeta, 10 * lo) - at(zeta, lo)
    last = at(zeta, sigma_end) - at(zeta, sigma_end / 10)
    ratio = last / first
    late = sigma >= lo
    # The same winding read on the ln(n/L) axis, where definable models are tested: ln(n/L) ~ e^{k^2 sigma},
    # so a decade of ln(n/L) is ever less sigma and the increments shrink like 1/ln(n/L).
    lnln = flow.log_ln_n_over_L()

    def zeta_at_s(s):
        return float(np.interp(math.log(s), lnln, zeta))

    s_ratio = (zeta_at_s(1e4) - zeta_at_s(1e3)) / (zeta_at_s(1e2) - zeta_at_s(1e1))
    slope, intercept = np.polyfit(np.log10(sigma[late]), zeta[late], 1)
    fit = np.polyval([slope, intercept], np.log10(sigma[late]))
    r2 = 1.0 - float(((zeta[late] - fit) ** 2).sum() / ((zeta[late] - zeta[late].mean()) ** 2).sum())
    rows = [
        Row(
            "without definability the direction need not converge: path length grows without bound",
            "Thm 3.1 (contrast; Lyu & Li 2020 App. J)",
            case,
            "path-length growth per decade of sigma: last / first",
            ">= 1 (linear in log sigma; -> ln 10 per decade)",
            ratio,
            ">= 1 - 1e-6 (integrator rtol 1e-8)",
            verdict(ratio >= 1 - 1e-6),
            f"zeta +{first:.3f} on [1e2, 1e3], +{last:.3f} on [{sigma_end / 10:.0e}, {sigma_end:.0e}], total {zeta[-1]:.3f} rad; "
            f"linear fit in log10 sigma: {slope:.3f} rad/decade, R^2 = {r2:.4f}; the plateau test (ratio < 1) fails here, as it must. "
            f"But read on the ln(n/L) axis the same spiral's decade [1e3, 1e4] grows {s_ratio:.2f} x decade [10, 100]: it looks like "
            f"slow convergence there, so the Thm 3.1 rows cannot rule such spirals out at finite ln(n/L); ln ln(n/L) reaches {lnln[-1]:.3g}",
            {"first_decade": first, "last_decade": last, "slope_per_decade": slope, "r2": r2},
        )
    ]
    # Reference: the same flow in the plane, in closed form (independent code: hand-written gradient, no torch).
    early = sigma <= 5.0  # the start lies on Absil's invariant spiral phi = 1/(1-r^2), which repels; past sigma ~ 6
    reference = planar_reference(sigma[early])  # rounding decides when the flow leaves it, so compare before that
    deviation = float(np.abs(reference - flow.direction[early]).max())
    rows.append(
        Row(
            "3-D torch flow = planar Mexican-hat flow through stereographic projection",
            "reference (conformality)",
            case,
            "max |theta~_3D - theta~_planar| for sigma <= 5",
            "0",
            deviation,
            "<= 1e-6 (both integrators at rtol <= 1e-8)",
            verdict(deviation <= 1e-6),
            "planar ODE dp/dsigma = -((1+r^2)^2/4) grad f(p), gradient by hand",
            {},
        )
    )
    tan = flow.tan_alignment
    t1, t0 = at(tan, sigma_end), at(tan, sigma_end / 10)
    rows.append(
        Row(
            "C^2 margins align even without definability",
            "Thm 4.1 (second part)",
            case,
            "tan(angle(theta, grad q)) at the end",
            "-> 0 (like 1/sigma)",
            t1,
            "<= 0.5 x its value a decade earlier (decade test)",
            verdict(t1 <= 0.5 * t0),
            f"tan = {t0:.3g} at sigma = {sigma_end / 10:.0e}; alignment holds while the direction never converges",
            {},
        )
    )
    q = flow.normalized_margin
    worst = float((np.diff(q) / q[1:]).min())
    rows.append(
        Row(
            "normalised smoothed margin alpha~ (= q(theta~) here) is nondecreasing",
            "Lyu & Li 2020, Thm 4.1",
            case,
            "smallest relative step of alpha~",
            ">= 0",
            worst,
            ">= -1e-7 (integrator rtol 1e-8, x10)",
            verdict(worst >= -1e-7),
            f"alpha~ {q[0]:.4f} -> {q[-1]:.8f} (-> 1); {flow.rhs_evaluations} gradient evaluations (scipy LSODA, clock ln sigma)",
            {},
        )
    )
    return rows


CASES = {
    "deep-linear": deep_linear_case,
    "srelu": srelu_case,
    "relu": relu_case,
    "fig1": fig1_case,
    "h-alexnet": alexnet_case,
    "counterexample": counterexample_case,
}
