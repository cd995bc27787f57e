"""The diralign command line.

diralign run deep-linear --out runs/dl --set target_ln_n_over_L=1000
diralign resume runs/dl
diralign plot runs/dl
diralign verify --quick --json verify.json
diralign bench --quick --json b.json
"""

from __future__ import annotations

import argparse
import os
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
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
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

    sweep = sub.add_parser("sweep", help="run the product of --grid values, one run directory per point")
    sweep_module.add_arguments(sweep)

    compare = sub.add_parser("compare", help="overlay runs' curves against ln(n/L), labelled by config differences")
    compare_module.add_arguments(compare)

    export = sub.add_parser("export", help="convert a run (or each run of a sweep) to TensorBoard event files")
    export.add_argument("dir", help="run directory or sweep directory")
    export.add_argument(
        "--tensorboard",
        metavar="OUT",
        required=True,
        help="write TensorBoard event files into OUT (a sweep: OUT/POINT)",
    )
    export.add_argument("--force", action="store_true", help="replace the event files in a non-empty OUT")

    show = sub.add_parser("config", help="every key --set accepts: section, type, default and meaning")
    show.add_argument("experiment")

    verify = sub.add_parser("verify", help="check the paper's theorems on seeded runs against independent references")
    verify.add_argument("--quick", action="store_true", help="short runs (about 3 minutes on 2 cores)")
    verify.add_argument("--json", metavar="FILE", help="also write the verdict table as JSON")
    verify.add_argument("--keep", metavar="DIR", help="keep the runs' directories here (default: a temporary folder)")
    verify.add_argument("--force", action="store_true", help="with --keep: replace runs already in DIR")
    verify.add_argument("--jobs", type=int, default=2, help="cases run side by side (default 2)")
    verify.add_argument(
        "--only", metavar="CASES", help="comma-separated cases (deep-linear,srelu,relu,fig1,h-alexnet,counterexample)"
    )
    verify.add_argument(
        "--integrator", help="flow integrator for the smooth cases (default: cvode if available, else dopri5)"
    )
    verify.add_argument("--quiet", action="store_true", help="print only the table")

    bench = sub.add_parser(
        "bench", help="work-precision, reach and instrument cost of the dynamics (benchmarks/RESULTS.md)"
    )
    bench.add_argument("--quick", action="store_true", help="short caps and targets (under 5 minutes on 2 cores)")
    bench.add_argument("--json", metavar="FILE", help="results file (default: OUT/results[-quick].json)")
    bench.add_argument(
        "--out", default="benchmarks", help="folder for the results and the figure (default: benchmarks)"
    )
    bench.add_argument(
        "--problems", metavar="CASES", help="comma-separated: deep-linear,fig1-width1000 (default: both)"
    )
    bench.add_argument("--cap", type=float, metavar="SECONDS", help="time cap per dynamics and problem")
    bench.add_argument("--no-overhead", action="store_true", help="skip the instrument-cost measurement")
    bench.add_argument("--no-figure", action="store_true", help="do not draw the work-precision figure")
    bench.add_argument("--quiet", action="store_true", help="no progress lines or tables")
    return parser


def _default_out(experiment: str) -> str:
    import time

    return f"runs/{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_summary(summary: dict, out) -> None:
    keys = (
        "ln_n_over_L",
        "min_normalized_margin",
        "alignment_cos",
        "path_length",
        "train_accuracy",
        "grad_evals",
        "wall_seconds",
    )
    parts = [f"{k}={summary[k]:.6g}" if isinstance(summary.get(k), float) else f"{k}={summary.get(k)}" for k in keys]
    print(f"{out}: " + " ".join(parts), flush=True)


def _print_stop(summary: dict) -> None:
    """A run that ended on a stall says why, even with --quiet (its numbers are not converged)."""
    if summary.get("stop_message"):
        print(
            f"diralign: stopped ({summary.get('stop_reason')}): {summary['stop_message']}", file=sys.stderr, flush=True
        )


def _plot(out, quiet: bool) -> None:
    from .figures import plot_run

    paths = plot_run(out)
    if not quiet:
        print(f"figures: {len(paths)} files in {out}", flush=True)


def _run(args):
    from . import runner
    from .config import apply_overrides
    from .distributed import coordinator_for
    from .experiments import get_experiment

    experiment = get_experiment(args.experiment)
    out = args.out or _default_out(args.experiment)
    overrides = list(args.overrides) + (["download=true"] if args.download else [])
    config = apply_overrides(experiment.default_config(), overrides)  # parsed and validated once
    coordinator = coordinator_for("run", config.distributed, config.device, out)
    summary, _, _ = runner.start_run(
        experiment, config, out, force=args.force, quiet=args.quiet, coordinator=coordinator
    )
    return out, summary, coordinator


def _resume(args):
    from . import runner
    from .distributed import coordinator_for
    from .rundir import Run

    run = Run(args.dir)
    device = run.config.get("device", "cpu")
    coordinator = coordinator_for("resume", True, device if isinstance(device, str) else "cpu", args.dir)
    summary, _, _ = runner.resume_run(args.dir, quiet=args.quiet, coordinator=coordinator)
    return args.dir, summary, coordinator


def _show_config(name: str) -> int:
    from .config import describe, format_description
    from .experiments import get_experiment

    experiment = get_experiment(name)
    print(format_description(describe(experiment.Config, experiment.name)))
    return 0


def dispatch(args) -> int:
    from .trainer import Interrupted

    if args.command == "plot":
        from .figures import plot_run

        for path in plot_run(args.dir):
            print(path)
        return 0
    if args.command == "verify":
        from .verify import main as verify_main

        return verify_main(args)
    if args.command == "bench":
        from .bench import main_from_args

        return main_from_args(args)
    if args.command == "config":
        return _show_config(args.experiment)
    if args.command == "sweep":
        from .sweep import main as sweep_main

        return sweep_main(args)
    if args.command == "compare":
        from .compare import main as compare_main

        return compare_main(args)
    if args.command == "export":
        from .tensorboard import export_many

        for path in export_many(args.dir, args.tensorboard, force=args.force):
            print(path)
        return 0
    if args.command == "run" and not args.out:
        args.out = _default_out(args.experiment)
    out = args.out if args.command == "run" else args.dir
    try:
        out, summary, coordinator = _run(args) if args.command == "run" else _resume(args)
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":  # one message for all ranks of a torchrun launch
            print(
                f"diralign: interrupted by {exc}; checkpoint saved, continue with: diralign resume {out}",
                file=sys.stderr,
            )
        return 130
    if coordinator is None or coordinator.is_writer:
        if not args.quiet:
            _print_summary(summary, out)
        _print_stop(summary)
        if not args.no_plot:
            _plot(out, args.quiet)
    return 0


def _terminate_as_interrupt(signum, frame):
    # Until the trainer installs its own handler (and after it restores this one), SIGTERM
    # unwinds like Ctrl-C: a half-built run directory is removed on the way out.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    except ValueError:  # not the main thread
        previous = None
    # Known before parsing: building the parser imports the experiments (and torch).
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        return dispatch(_parser().parse_args(argv))
    except UserError as exc:
        print(f"diralign: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if command in ("run", "resume"):
            # Before training began (the trainer turns later signals into a checkpoint and
            # Interrupted): nothing was written, or a half-built run was removed.
            print("diralign: interrupted before training began; nothing on disk was changed", file=sys.stderr)
        else:
            print("diralign: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        from .rundir.disk import DISK_ERRNOS, reason

        if exc.errno not in DISK_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(f"diralign: error: cannot access{where}: {reason(exc)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
