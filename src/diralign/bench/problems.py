"""The benchmark's problems, built exactly as ``diralign run`` builds them.

    python -c "from diralign.bench.problems import build_case; p, w0, cfg = build_case('deep-linear'); print(p.dim, p.n)"

Each case is an experiment of the registry plus ``--set`` overrides, so the numbers in
``benchmarks/RESULTS.md`` are about the same problems users run.
"""

from __future__ import annotations

from ..config import apply_overrides
from ..errors import UserError

CASES = {
    # Prop. 4.4's deep linear network: depth 3, widths 8, n = 60 separable points in R^6.
    "deep-linear": ("deep-linear", []),
    # Fig. 1's squared-ReLU network on 100 planar teacher points (embedded in R^3).
    "fig1-width1000": ("fig1", ["width=1000"]),
    "fig1-width10000": ("fig1", ["width=10000"]),
    # H-AlexNet on a class-balanced subset of sklearn digits (32x32x3), float32, minibatch SGD.
    "h-alexnet-digits": ("margins", ["model=h-alexnet", "data=digits", "subset=512", "dynamics=sgd", "batch_size=128"]),
    # H-AlexNet (ReLU + max-pool kinks) on 16 digits (32x32x3), float64, every dynamics: the
    # flows start at ln(n/L) = 2 (flow_from_ln, gd before; see diralign.dynamics.warm).
    "h-alexnet-16": (
        "margins",
        ["model=h-alexnet", "data=digits", "subset=16", "dtype=float64", "flow_from_ln=2", "batch_size=8"],
    ),
}
KINKED = ("h-alexnet-16",)  # problems whose flow is the sliding one (and only it: the others chatter)


def available(case: str) -> bool:
    from ..experiments import EXPERIMENTS

    return CASES[case][0] in EXPERIMENTS


def case_config(case: str, overrides=()):
    from ..experiments import get_experiment

    if case not in CASES:
        raise UserError(f"unknown benchmark problem {case!r}; choose one of {', '.join(CASES)}")
    experiment, base = CASES[case]
    return experiment, apply_overrides(get_experiment(experiment).default_config(), [*base, *overrides])


def build_case(case: str, overrides=()):
    """``(problem, w0, config)`` for a case, with the runner's dtype/thread settings."""
    from ..experiments import get_experiment
    from ..runner import build
    from ..trainer import Coordinator

    experiment, config = case_config(case, overrides)
    setup = build(get_experiment(experiment), config, Coordinator())
    return setup.problem, setup.w0, config
