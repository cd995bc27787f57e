"""Instrument cost: a run logging the full panel at every step against a bare PyTorch loop (issue 6).

    python benchmarks/instrument_cost.py --steps 200 --json /tmp/cost.json
    python benchmarks/instrument_cost.py --cases fig1-width10000 --steps 600

Fig. 1's network at width 10,000 (full batch, float64) and H-AlexNet on 512 sklearn digits
(minibatch 128, float32; one step = one epoch, ``--steps / 10`` of them).  Both loops do the
same steps from the same weights in the same process, alternating a few steps at a time;
the table gives instrumented/bare wall time and where the difference goes
(see ``diralign.bench.overhead``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diralign.bench import OVERHEAD_CASES, finite_json
from diralign.bench.overhead import measure_overhead
from diralign.bench.report import overhead_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(OVERHEAD_CASES))
    parser.add_argument("--steps", type=int, default=200, help="full-batch steps (minibatch: a tenth, in epochs)")
    parser.add_argument("--no-callbacks", action="store_true", help="skip the run with the experiment's callbacks")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    out = {}
    for case in args.cases.split(","):
        minibatch = case.startswith("h-alexnet")
        steps = max(2, args.steps // 10) if minibatch else args.steps
        out[case] = measure_overhead(case, steps=steps, chunk=1 if minibatch else 5, with_callbacks=not args.no_callbacks)
    out = finite_json(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(overhead_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
