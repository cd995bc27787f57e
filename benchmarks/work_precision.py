"""Work-precision and reach of every dynamics on deep linear and Fig. 1 (issue 6).

    python benchmarks/work_precision.py --quick --json /tmp/wp.json --out /tmp
    python benchmarks/work_precision.py --json benchmarks/work_precision.json

The same runs as ``diralign bench`` without the instrument-cost part: a tight-tolerance flow
is the reference, and each dynamics (flows at several tolerances and integrators, ``gd``,
``constant-gd`` with its best step, ``loss-based``) is followed through ln(n/L) = 10 ... 1e4
under a time cap.  Writes the JSON and the figure ``OUT/work_precision[-quick].{png,pdf}``
and prints the tables of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diralign.bench import run_bench, settings_for
from diralign.bench.report import render


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", required=True, metavar="FILE")
    parser.add_argument("--out", default="benchmarks", help="folder for the figure")
    parser.add_argument("--problems", help="comma-separated: deep-linear,fig1-width1000")
    parser.add_argument("--cap", type=float, help="seconds per dynamics and problem")
    args = parser.parse_args(argv)
    settings = settings_for(args.quick, args.problems.split(",") if args.problems else None, args.cap)
    stem = Path(args.out) / ("work_precision-quick" if args.quick else "work_precision")
    command = "python benchmarks/work_precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run_bench(settings, Path(args.json), stem, overhead=False, command=command)
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
