"""The diralign command line.

    diralign run deep-linear --out runs/dl --set target_ln_n_over_L=1000
    diralign resume runs/dl
    diralign plot runs/dl
    diralign verify --quick --json verify.json
    diralign bench --quick --json b.json
    diralign sweep fig1 --grid width=200,400 --grid seed=0,1 --set target_ln_n_over_L=30 --jobs 2 --out sweeps/w
    diralign compare sweeps/w --out figures/w
    diralign export runs/dl --tensorboard tb/dl
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are the project's one-line errors (exit status 2)."""

    def error(self, message):
        raise UserError(f"{message}; see {self.prog} --help")


def _parser() -> argparse.ArgumentParser:
    from .experiments import EXPERIMENTS

    parser = _Parser(
        prog="diralign",
        description="Directional convergence and alignment (Ji & Telgarsky 2020): train to tiny risk, measure, plot.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run an experiment to its goals and write a run directory")
    run.add_argument("experiment", help="one of: " + ", ".join(sorted(EXPERIMENTS)))
    run.add_argument("--out", help="run directory (default: runs/EXPERIMENT-TIMESTAMP)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config field (repeatable)")
    run.add_argument("--force", action="store_true", help="replace an existing run directory at --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar or report")
    run.add_argument("--download", action="store_true", help="download datasets that are missing (needs internet)")
    run.add_argument("--no-plot", action="store_true", help="do not draw figures at the end")

    resume = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    resume.add_argument("dir")
    resume.add_argument("--quiet", action="store_true")
    resume.add_argument("--no-plot", action="store_true")

    plot = sub.add_parser("plot", help="draw the figures of a run directory")
    plot.add_argument("dir")

    from . import compare as compare_module
    from . import sweep as sweep_module

    sweep = sub.add_parser("sweep", help="run the product of --grid values, one run directory per point (re-run to continue)")
    sweep_module.add_arguments(sweep)

    compare = sub.add_parser("compare", help="overlay runs' curves against ln(n/L), labelled by how their configs differ")
    compare_module.add_arguments(compare)

    export = sub.add_parser("export", help="convert a run (or each run of a sweep) to other formats")
    export.add_argument("dir", help="run directory or sweep directory")
    export.add_argument("--tensorboard", metavar="OUT", required=True, help="write TensorBoard event files into OUT (a sweep: OUT/POINT)")
    export.add_argument("--force", action="store_true", help="replace the event files in a non-empty OUT")

    show = sub.add_parser("config", help="print an experiment's default config (the keys --set accepts)")
    show.add_argument("experiment")

    verify = sub.add_parser("verify", help="check the paper's theorems on seeded runs against independent references")
    verify.add_argument("--quick", action="store_true", help="short runs (about 3 minutes on 2 cores)")
    verify.add_argument("--json", metavar="FILE", help="also write the verdict table as JSON")
    verify.add_argument("--keep", metavar="DIR", help="keep the runs' directories here (default: a temporary folder)")
    verify.add_argument("--force", action="store_true", help="with --keep: replace runs already in DIR")
    verify.add_argument("--jobs", type=int, default=2, help="cases run side by side (default 2)")
    verify.add_argument("--only", metavar="CASES", help="comma-separated cases (deep-linear,srelu,relu,fig1,h-alexnet,counterexample)")
    verify.add_argument("--integrator", help="flow integrator for the smooth cases (default: cvode if available, else dopri5)")
    verify.add_argument("--quiet", action="store_true", help="print only the table")

    bench = sub.add_parser("bench", help="work-precision, reach and instrument cost of the dynamics (benchmarks/RESULTS.md)")
    bench.add_argument("--quick", action="store_true", help="short caps and targets (under 5 minutes on 2 cores)")
    bench.add_argument("--json", metavar="FILE", help="results file (default: OUT/results[-quick].json)")
    bench.add_argument("--out", default="benchmarks", help="folder for the results and the figure (default: benchmarks)")
    bench.add_argument("--problems", metavar="CASES", help="comma-separated: deep-linear,fig1-width1000 (default: both)")
    bench.add_argument("--cap", type=float, metavar="SECONDS", help="time cap per dynamics and problem")
    bench.add_argument("--no-overhead", action="store_true", help="skip the instrument-cost measurement")
    bench.add_argument("--no-figure", action="store_true", help="do not draw the work-precision figure")
    bench.add_argument("--quiet", action="store_true", help="no progress lines or tables")
    return parser


def _default_out(experiment: str) -> str:
    import time

    return f"runs/{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_summary(summary: dict, out) -> None:
    keys = ("ln_n_over_L", "min_normalized_margin", "alignment_cos", "path_length", "train_accuracy", "grad_evals", "wall_seconds")
    parts = [f"{k}={summary[k]:.6g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}" for k in keys]
    print(f"{out}: " + " ".join(parts), flush=True)


def _plot(out, quiet: bool) -> None:
    from .plots import plot_run

    paths = plot_run(out)
    if not quiet:
        print(f"figures: {len(paths)} files in {out}", flush=True)


def dispatch(args) -> int:
    from . import runner
    from .trainer import Interrupted

    distributed = None
    if getattr(args, "command", None) in ("run", "resume"):
        from .distributed import maybe_init

        distributed = maybe_init(args)
    try:
        if args.command == "run":
            out = args.out or _default_out(args.experiment)
            overrides = list(args.overrides)
            if args.download:
                overrides.append("download=true")
            summary, _, _ = runner.start_run(args.experiment, overrides, out, force=args.force, quiet=args.quiet, distributed=distributed)
        elif args.command == "resume":
            out = args.dir
            summary, _, _ = runner.resume_run(out, quiet=args.quiet, distributed=distributed)
        elif args.command == "plot":
            from .plots import plot_run

            for path in plot_run(args.dir):
                print(path)
            return 0
        elif args.command == "verify":
            from .verify import main as verify_main

            return verify_main(args)
        elif args.command == "bench":
            from .bench import main_from_args

            return main_from_args(args)
        elif args.command == "sweep":
            from .sweep import main as sweep_main

            return sweep_main(args)
        elif args.command == "compare":
            from .compare import main as compare_main

            return compare_main(args)
        elif args.command == "export":
            from .tensorboard import export_many

            for path in export_many(args.dir, args.tensorboard, force=args.force):
                print(path)
            return 0
        elif args.command == "config":
            import dataclasses
            from .experiments import get_experiment

            for field in dataclasses.fields(get_experiment(args.experiment).Config):
                print(f"{field.name} = {getattr(get_experiment(args.experiment).default_config(), field.name)!r}")
            return 0
        else:  # pragma: no cover - argparse guards this
            raise UserError(f"unknown command {args.command}")
    except Interrupted as exc:
        if distributed is None or distributed.rank == 0:  # one message for all ranks
            print(f"diralign: interrupted by {exc}; checkpoint saved, continue with: diralign resume {out}", file=sys.stderr)
        return 130
    is_writer = distributed is None or distributed.rank == 0
    if is_writer:
        if not args.quiet:
            _print_summary(summary, out)
        if not args.no_plot:
            _plot(out, args.quiet)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return dispatch(_parser().parse_args(argv))
    except UserError as exc:
        print(f"diralign: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diralign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
