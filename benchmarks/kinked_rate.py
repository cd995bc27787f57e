"""The sliding flow's cost per unit of ``ln(n/L)`` along an H-AlexNet run (issue 12).

    python benchmarks/kinked_rate.py --seed 0 --starts 10,30,60,100 --span 2

From the point gd brought to each start (the problem of ``tests/test_dynamics_kinked.py``:
16 digits at 16x16, float64), the sliding flow (``integrator=sliding``) runs ``span`` units of
``s = ln(n/L)``; printed are its gradients, events and seconds.  Gradients per unit of ``s``
times the ``s`` covered is what a run there costs: a decade test (``diralign verify``) needs two
decades of ``s``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_dynamics_kinked as cases  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--digits", type=int, default=16)
    parser.add_argument("--starts", default="10,30,60,100", help="ln(n/L) where gd hands over, ascending")
    parser.add_argument("--span", type=float, default=2.0, help="units of ln(n/L) the flow runs from each start")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem, w = cases.alexnet16(n=args.digits, seed=args.seed)
    for s0 in (float(x) for x in args.starts.split(",")):
        w = cases.gd_to(problem, w, s0)  # gd goes on from the last start: one gd path for all
        began = time.perf_counter()
        _, _, evals, flow = cases.sliding_to(problem, w, s0 + args.span)
        seconds = time.perf_counter() - began
        events = sum(flow.events.values())
        print(
            f"h-alexnet seed {args.seed} n {args.digits}: s {s0:g} -> {s0 + args.span:g}: {evals} gradients "
            f"({evals / args.span:.0f} per unit of s), {events} events ({events / args.span:.0f} per unit), "
            f"{flow.events}, {seconds:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
