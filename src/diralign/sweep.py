"""Grid sweeps: the product of ``--grid`` values, each point an ordinary run directory.

    diralign sweep fig1 --grid width=200,400 --grid seed=0,1 --set target_ln_n_over_L=30 --jobs 2 --out sweeps/width

Layout of ``DIR``::

    sweep.json        the experiment, grid and --set values (a re-run must match them)
    sweep.csv         one row per point: point, status, error, grid values, summary keys
    POINT/            a run directory, named by its grid values (``width=200,seed=0``)
    logs/POINT.log    the point's stdout and stderr, every attempt appended
    logs/POINT.lock   held while a process works on the point
    submitit/         submitit's job files (--launcher submitit / submitit-local)

Each point is ``diralign run EXPERIMENT --out DIR/POINT --set ...`` in a fresh process
(``sys.executable -m diralign``, this environment), so points are isolated: a crash or a
bad value fails that point only.  Re-running the same command skips finished points
(``summary.json`` present), resumes interrupted ones (``diralign resume``) and starts the
rest.  Concurrency comes from an existing launcher, never a scheduler of our own: a
thread pool of ``--jobs`` subprocesses on this machine, or submitit (a SLURM job array
with ``--jobs`` running at once; ``submitit-local`` runs the same jobs on this machine).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError
from .rundir import schema

SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.csv"
LAUNCHERS = ("local", "submitit", "submitit-local")
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
_MAX_NAME = 120


# -- the grid -------------------------------------------------------------------------


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["width=200,400", "seed=0,1"]`` -> ``[("width", ["200", "400"]), ("seed", ["0", "1"])]``."""
    if not specs:
        raise UserError("a sweep needs at least one --grid KEY=V1,V2,... (e.g. --grid seed=0,1,2)")
    grid, seen = [], set()
    for spec in specs:
        if "=" not in spec:
            raise UserError(f"--grid expects KEY=V1,V2,..., got {spec!r}")
        key, raw = spec.split("=", 1)
        key = key.strip().replace("-", "_")
        values = [v.strip() for v in raw.split(",") if v.strip()]
        if not key:
            raise UserError(f"--grid {spec!r} has no key; give KEY=V1,V2,...")
        if not values:
            raise UserError(f"--grid {key}= has no values; give {key}=V1,V2,...")
        if key in seen:
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid {key}=V1,V2,...")
        if len(set(values)) != len(values):
            raise UserError(f"--grid {key}={raw} repeats a value; each point must differ")
        seen.add(key)
        grid.append((key, values))
    return grid


def point_name(values: dict) -> str:
    """A safe directory name from grid values, e.g. ``width=200,seed=0``."""
    name = _UNSAFE.sub("_", ",".join(f"{k}={v}" for k, v in values.items()))
    if len(name) > _MAX_NAME:  # long values (file paths): keep a readable head, stay unique
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}-{digest}"
    return name


@dataclass
class Point:
    name: str
    values: dict  # grid key -> value as given
    overrides: list  # every --set of the run: the sweep's --set, then the grid values


def expand(experiment: str, grid, overrides: list[str]) -> list[Point]:
    """The product grid (first key outermost), each point's config type-checked now so a
    bad value is an error before anything is written."""
    from .config import apply_overrides
    from .experiments import get_experiment

    exp = get_experiment(experiment)
    base = exp.default_config()
    base = apply_overrides(base, overrides)
    set_keys = {pair.split("=", 1)[0].strip().replace("-", "_") for pair in overrides if "=" in pair}
    for key, values in grid:
        clash = key in set_keys
        if clash:
            raise UserError(f"{key} is both in --grid and --set; keep it in one of them")
        for value in values:
            try:
                apply_overrides(base, [f"{key}={value}"])
            except UserError as exc:
                raise UserError(f"--grid {key}: {exc}") from None
    points, names = [], set()
    for combo in itertools.product(*[[(key, v) for v in values] for key, values in grid]):
        values = dict(combo)
        name = point_name(values)
        if name in names:
            raise UserError(
                f"two grid points share the directory name {name!r}; make the values differ in letters or digits"
            )
        names.add(name)
        points.append(Point(name, values, list(overrides) + [f"{k}={v}" for k, v in values.items()]))
    return points


# -- the sweep directory ----------------------------------------------------------------


def sweep_record(experiment: str, grid, overrides: list[str]) -> dict:
    return {"experiment": experiment, "grid": [[k, list(v)] for k, v in grid], "set": list(overrides)}


def prepare_dir(out: Path, record: dict) -> None:
    """Create ``out`` or check it holds this same sweep (then it is continued)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    existing = out / SWEEP_FILE
    if existing.is_file():
        try:
            old = json.loads(existing.read_text())
        except ValueError:
            raise UserError(f"{existing} is unreadable; restore it or choose another --out") from None
        mine = {k: old.get(k) for k in record}
        if mine != record:
            raise UserError(
                f"--out {out} holds another sweep ({_describe(old)}); "
                "re-run that command to continue it, or choose another --out"
            )
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty and holds no {SWEEP_FILE}; choose another directory for the sweep")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    tmp = out / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(dict(record, created=time.strftime("%Y-%m-%dT%H:%M:%S%z")), indent=2) + "\n")
    os.replace(tmp, existing)


def _describe(record: dict) -> str:
    grid = " ".join(f"--grid {k}={','.join(v)}" for k, v in record.get("grid", []))
    sets = " ".join(f"--set {s}" for s in record.get("set", []))
    return " ".join(part for part in (str(record.get("experiment")), grid, sets) if part)


def read_record(path) -> Optional[dict]:
    path = Path(path) / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is unreadable; the sweep directory is damaged") from None


def sweep_runs(path) -> Optional[list[Path]]:
    """The run directories of a sweep directory, in grid order (None: not a sweep)."""
    record = read_record(path)
    if record is None:
        return None
    grid = [(k, v) for k, v in record["grid"]]
    names = [point_name(dict(combo)) for combo in itertools.product(*[[(k, v) for v in values] for k, values in grid])]
    return [Path(path) / name for name in names if (Path(path) / name / schema.CONFIG).is_file()]


# -- one point --------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    status: str  # finished, skipped (finished before), failed, interrupted, busy
    action: str = ""  # run, resume, skip
    returncode: Optional[int] = None
    message: str = ""
    seconds: float = 0.0


def _action(run_dir: Path) -> str:
    if (run_dir / schema.SUMMARY).is_file():
        return "skip"
    if (run_dir / schema.CONFIG).is_file() and (run_dir / schema.CHECKPOINT).is_file():
        return "resume"
    return "run"  # never started, or killed before its first checkpoint (then --force)


def run_point(experiment: str, sweep_dir: str, point: Point, plot: bool, register=None, keep_waiting=None) -> Outcome:
    """Run, resume or skip one point; the unit of work of every launcher.

    ``register(proc)`` (local pool) is told each child process so that the sweep can
    forward a signal to it; submitit jobs run this same function on the cluster.  A point
    locked by another process (a run left going by a sweep that was SIGKILLed) is waited
    for while ``keep_waiting(name)`` says so, else reported ``busy``.
    """
    started = time.perf_counter()
    sweep_dir = Path(sweep_dir)
    run_dir = sweep_dir / point.name
    logs = sweep_dir / "logs"
    logs.mkdir(exist_ok=True)
    lock = open(logs / f"{point.name}.lock", "w")
    try:
        # The lock travels into the child (pass_fds) and dies with the last holder, so a
        # point still being run by an orphan of a killed sweep is never run twice.
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if keep_waiting is None or not keep_waiting(point.name):
                    return Outcome(point.name, "busy", message="another process is running this point")
                time.sleep(0.5)
        action = _action(run_dir)
        if action == "skip":
            return Outcome(point.name, "skipped", action)
        if action == "resume":
            argv = ["resume", str(run_dir), "--quiet"]
        else:
            argv = ["run", experiment, "--out", str(run_dir), "--quiet"]
            if run_dir.exists() and any(run_dir.iterdir()):
                if not (run_dir / schema.CONFIG).is_file():
                    return Outcome(
                        point.name,
                        "failed",
                        action,
                        message=f"{run_dir} exists and is not a run directory; move it away",
                    )
                argv.append("--force")  # our own run, killed before its first checkpoint
            for pair in point.overrides:
                argv += ["--set", pair]
        if not plot:
            argv.append("--no-plot")
        with open(logs / f"{point.name}.log", "a") as log:
            log.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} diralign {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", "diralign", *argv],
                stdout=log,
                stderr=subprocess.PIPE,
                text=True,
                pass_fds=(lock.fileno(),),
                env=dict(os.environ),
            )
            if register is not None:
                register(proc)
            _, err = proc.communicate()
            log.write(err)
        seconds = time.perf_counter() - started
        if proc.returncode == 0:
            return Outcome(point.name, "finished", action, 0, seconds=seconds)
        if (run_dir / schema.SUMMARY).is_file():  # stopped while drawing its figures
            return Outcome(
                point.name, "finished", action, proc.returncode, f"figures not drawn: diralign plot {run_dir}", seconds
            )
        last = _last_line(err)
        status = (
            "interrupted" if proc.returncode in (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL) else "failed"
        )
        return Outcome(point.name, status, action, proc.returncode, last or f"exit status {proc.returncode}", seconds)
    finally:
        lock.close()


def _last_line(text: str) -> str:
    return next((line for line in reversed(text.strip().splitlines()) if line.strip()), "")


# -- launchers ------------------------------------------------------------------------


class _Children:
    """Child processes of the local pool, so a signal to the sweep reaches them."""

    def __init__(self):
        self.procs = []
        self.lock = threading.Lock()
        self.stopped: Optional[int] = None

    def register(self, proc) -> None:
        with self.lock:
            self.procs.append(proc)
            if self.stopped is not None:
                proc.send_signal(self.stopped)

    def stop(self, signum, frame=None) -> None:
        self.stopped = signum
        with self.lock:
            for proc in self.procs:
                if proc.poll() is None:
                    proc.send_signal(signum)  # the run checkpoints and exits; resumed next time


def launch_local(experiment, out: Path, points, jobs: int, plot: bool, report):
    children = _Children()
    previous = {sig: signal.signal(sig, children.stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    waiting = set()

    def keep_waiting(name) -> bool:
        if name not in waiting:
            waiting.add(name)
            print(f"{name}: another process is running it (left by a killed sweep?); waiting for it", flush=True)
        return children.stopped is None

    def task(point):
        if children.stopped is not None:
            return Outcome(point.name, "pending", message="not started: the sweep was interrupted")
        return run_point(experiment, str(out), point, plot, children.register, keep_waiting)

    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(task, point) for point in points]
            for future in concurrent.futures.as_completed(futures):
                report(future.result())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return children.stopped


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--launcher submitit needs the submitit package: pip install 'diralign[cluster]' (or pip install submitit)"
        ) from None
    return submitit


def launch_submitit(experiment, out: Path, points, jobs: int, plot: bool, report, local: bool, slurm: dict):
    submitit = _submitit()
    folder = out / "submitit"
    if local:
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=int(slurm.get("timeout_min") or 60 * 24))
    else:
        executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        params = {"slurm_array_parallelism": jobs, "name": f"diralign-{experiment}"}
        params.update({k: v for k, v in slurm.items() if v is not None})
        executor.update_parameters(**params)
    try:
        jobs_ = executor.map_array(
            run_point, [experiment] * len(points), [str(out)] * len(points), points, [plot] * len(points)
        )
    except Exception as exc:  # no sbatch, a bad partition ...: say so in one line
        raise UserError(f"submitit could not submit the sweep: {type(exc).__name__}: {_last_line(str(exc))}") from None
    print(
        f"submitted {len(jobs_)} jobs ({jobs_[0].job_id.split('_')[0]}...); "
        "waiting (Ctrl-C stops waiting, the jobs go on)",
        flush=True,
    )
    by_job = {job.job_id: point for job, point in zip(jobs_, points)}
    try:
        # local jobs: notice each end at once; SLURM: do not hammer sacct
        for job in submitit.helpers.as_completed(jobs_, poll_frequency=0.5 if local else 30):
            try:
                report(job.result())
            except Exception as exc:  # the job died (killed, out of time, node failure)
                line = _last_line(str(exc)) or type(exc).__name__
                report(Outcome(by_job[job.job_id].name, "failed", message=f"job {job.job_id}: {line}"))
    except KeyboardInterrupt:
        return signal.SIGINT
    return None


# -- the table --------------------------------------------------------------------------


def write_table(out: Path, grid, points, outcomes: dict) -> Path:
    """``sweep.csv`` from the run directories as they are now (plus this run's errors)."""
    import pandas as pd

    from .rundir import Run

    rows, extra_keys = [], []
    for point in points:
        run_dir = out / point.name
        summary = {}
        if (run_dir / schema.CONFIG).is_file():
            try:
                summary = Run(run_dir).summary
            except UserError:  # a damaged point is reported by its status, not by a crash
                summary = {}
        outcome = outcomes.get(point.name)
        if summary:
            status = "finished"
        elif outcome is not None and outcome.status not in ("finished", "skipped"):
            status = outcome.status
        elif (run_dir / schema.CHECKPOINT).is_file():
            status = "interrupted"
        else:
            status = "pending"
        row = {
            "point": point.name,
            "status": status,
            "error": outcome.message if outcome and status == "failed" else "",
        }
        row.update({key: point.values[key] for key, _ in grid})
        for key, value in summary.items():
            if key not in schema.SUMMARY_KEYS and key not in extra_keys:
                extra_keys.append(key)
            row[key] = json.dumps(value) if isinstance(value, (list, dict)) else value
        rows.append(row)
    columns = ["point", "status", "error"] + [k for k, _ in grid] + list(schema.SUMMARY_KEYS) + extra_keys
    table = pd.DataFrame(rows).reindex(columns=columns)
    tmp = out / f".{TABLE_FILE}.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out / TABLE_FILE)
    return out / TABLE_FILE


# -- entry point ------------------------------------------------------------------------


def add_arguments(parser) -> None:
    from .experiments import EXPERIMENTS

    parser.add_argument("experiment", help="one of: " + ", ".join(sorted(EXPERIMENTS)))
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="a grid axis (repeatable; the product is run)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config value shared by every point",
    )
    parser.add_argument("--out", required=True, help="sweep directory (re-run the same command to continue it)")
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (default 1)")
    parser.add_argument(
        "--launcher",
        default="local",
        choices=LAUNCHERS,
        help="local: a process pool here; submitit: SLURM; submitit-local: submitit on this machine",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw each point's figures")
    parser.add_argument("--slurm-partition", help="submitit: SLURM partition")
    parser.add_argument(
        "--slurm-time",
        type=int,
        metavar="MINUTES",
        help="submitit: time limit per point (a point past it resumes on the next sweep run)",
    )
    parser.add_argument("--slurm-cpus", type=int, metavar="N", help="submitit: CPUs per point")
    parser.add_argument("--slurm-gpus", type=int, metavar="N", help="submitit: GPUs per point")
    parser.add_argument("--slurm-mem-gb", type=int, metavar="GB", help="submitit: memory per point")


def main(args) -> int:
    """``diralign sweep``: exit 0 when every point is finished, 1 when some failed, 130 interrupted."""
    if args.jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {args.jobs}")
    grid = parse_grid(args.grid)
    points = expand(args.experiment, grid, args.overrides)
    out = Path(args.out)
    if args.launcher != "local":
        submitit = _submitit()  # a missing package or cluster is reported before anything is written
        # AutoExecutor would quietly fall back to local jobs without SLURM: say so instead
        if args.launcher == "submitit" and submitit.AutoExecutor.which() != "slurm":
            raise UserError(
                "--launcher submitit found no SLURM here (no sbatch); use --launcher local, "
                "or submitit-local to try the jobs on this machine"
            )
    prepare_dir(out, sweep_record(args.experiment, grid, args.overrides))
    if args.launcher == "local" and "OMP_NUM_THREADS" not in os.environ:
        # N runs side by side share the cores instead of each spinning on all of them.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    outcomes: dict = {}
    done = itertools.count(1)
    table_lock = threading.Lock()

    def report(outcome: Outcome) -> None:
        with table_lock:
            outcomes[outcome.name] = outcome
            line = f"[{next(done)}/{len(points)}] {outcome.name}: {outcome.status}"
            if outcome.action == "resume":
                line += " (resumed)"
            if outcome.seconds:
                line += f" in {outcome.seconds:.1f} s"
            if outcome.message:
                line += f": {outcome.message}"
            if outcome.status == "failed":
                line += f" (log: {out / 'logs' / (outcome.name + '.log')})"
            print(line, flush=True)
            write_table(out, grid, points, outcomes)  # a killed sweep still leaves a current table

    print(
        f"sweep: {len(points)} points of {args.experiment} in {out} ({args.launcher}, {args.jobs} at a time)",
        flush=True,
    )
    if args.launcher == "local":
        stopped = launch_local(args.experiment, out, points, args.jobs, not args.no_plot, report)
    else:
        slurm = {
            "slurm_partition": args.slurm_partition,
            "timeout_min": args.slurm_time,
            "cpus_per_task": args.slurm_cpus,
            "gpus_per_node": args.slurm_gpus,
            "mem_gb": args.slurm_mem_gb,
        }
        stopped = launch_submitit(
            args.experiment, out, points, args.jobs, not args.no_plot, report, args.launcher == "submitit-local", slurm
        )
    table = write_table(out, grid, points, outcomes)
    import pandas as pd

    counts = pd.read_csv(table)["status"].value_counts().to_dict()
    print("sweep: " + ", ".join(f"{n} {status}" for status, n in counts.items()) + f"; table: {table}", flush=True)
    if stopped is not None:
        print(
            "sweep: interrupted; re-run the same command to continue (finished points are kept)",
            file=sys.stderr,
            flush=True,
        )
        return 130
    return 0 if counts.get("finished", 0) == len(points) else 1
