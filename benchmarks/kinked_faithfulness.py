"""Faithfulness of the sliding flow on kinked networks, on seeds the tests do not run (issue 12).

    python benchmarks/kinked_faithfulness.py --cases twin,mlp --seeds 1,2,3
    python benchmarks/kinked_faithfulness.py --cases h-alexnet --seeds 0 --s0 25 --integrator sliding-dopri5

The problems and the reference are those of ``tests/test_dynamics_kinked.py`` (imported from
there, so the benchmark and the test measure the same thing): from a point that gd brought to
``s0``, the sliding flow and explicit Euler in the clock ``s`` (at ``h`` and ``h/2``,
Richardson-extrapolated) run to ``ln(n/L) = 30`` (the reference to where the flow landed);
printed are the reference's own self-consistency, the direction gap, both alignments (each from
the central secant over +-0.02 in s; ours also at the point) and both evaluation counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_dynamics_kinked as cases  # noqa: E402

PROBLEMS = {
    "twin": (lambda seed: cases.relu_twin(seed=seed), cases.numpy_twin, 5e-4),
    "mlp": (lambda seed: cases.relu_mlp(seed=seed), cases.numpy_mlp, 5e-4),
    "h-alexnet": (lambda seed: cases.alexnet16(seed=seed), cases.torch_reference, 1e-3),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="twin,mlp")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--s0", type=float, default=5.0, help="where gd hands over to both flows")
    parser.add_argument(
        "--integrator", default="sliding", choices=("sliding", "sliding-dopri5"), help="CVODE or the explicit pair"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.cases.split(","):
        build, reference_gradient, h = PROBLEMS[name]
        for seed in map(int, args.seeds.split(",")):
            problem, w0 = build(seed)
            grad = reference_gradient(problem)
            start = cases.gd_to(problem, w0, args.s0)
            began = time.perf_counter()
            integrator = cases.SlidingCvode if args.integrator == "sliding" else cases.SlidingFlow
            w, ev, evals, flow, ours_alignment = cases.sliding_with_secant(problem, start, 30.0, integrator)
            seconds = time.perf_counter() - began
            ours = (w / w.norm()).numpy()
            at_point = cases.alignment(w, -ev.grad)
            landed = cases.s_of(problem, ev.log_risk)
            as_array = start.numpy() if name != "h-alexnet" else start
            d1, a1, e1 = cases.reference(grad, as_array, problem.n, h, landed)
            d2, a2, _ = cases.reference(grad, as_array, problem.n, h / 2, landed)
            d1, d2 = np.asarray(d1), np.asarray(d2)
            direction = 2 * d2 - d1
            direction /= np.linalg.norm(direction)
            alignment = 2 * a2 - a1
            print(
                f"{name} seed {seed} s0 {args.s0:g}: reference self-gap {np.linalg.norm(d1 - d2):.1e}; "
                f"direction gap {np.linalg.norm(ours - direction):.1e}; alignment {ours_alignment:.6f} vs "
                f"{alignment:.6f} (diff {abs(ours_alignment - alignment):.1e}; ours at the point {at_point:.6f}); evaluations {evals} vs {e1} at h={h:g} "
                f"({e1 / evals:.1f}x); events {flow.events}; {seconds:.0f} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
