"""``diralign bench``: work-precision, reach and instrument cost, side by side in one run.

    diralign bench --quick --json b.json          # under 5 minutes on 2 cores
    diralign bench --json benchmarks/results.json # the numbers of benchmarks/RESULTS.md

Per problem (deep linear; Fig. 1 at width 1000) a tight-tolerance flow is the reference, and
every dynamics (flows at several tolerances and integrators, the paper's ``gd``, plain
``constant-gd``, Lyu & Li's ``loss-based``) is followed through ``ln(n/L)`` = 10 ... 1e4
under a time cap (``suite``); the instruments' cost is measured against a bare PyTorch loop
(``overhead``).  Results go to a JSON file (every number finite; ``null`` where undefined),
the figure is drawn from that file (``figures``) and the tables printed (``report``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from ..errors import UserError
from .problems import available
from .suite import FULL, QUICK, Settings, acceptance, run_problem

OVERHEAD_CASES = ("fig1-width10000", "h-alexnet-digits")


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def finite_json(value):
    """Non-finite floats become ``null``: every number in the file is finite."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def settings_for(quick: bool, problems=None, cap=None) -> Settings:
    settings = dataclasses.replace(QUICK if quick else FULL)
    if problems:
        from .problems import CASES

        unknown = [p for p in problems if p not in CASES or p not in settings.references]
        if unknown:
            raise UserError(
                f"unknown bench problem(s) {', '.join(unknown)}; choose from {', '.join(settings.references)}"
            )
        settings.problems = tuple(problems)
    if cap is not None:
        if not cap > 0:
            raise UserError(f"--cap must be a positive number of seconds, got {cap}")
        settings.time_cap = float(cap)
    return settings


def run_bench(
    settings: Settings,
    json_path: Path,
    figure_stem=None,
    overhead: bool = True,
    command: str = "",
    log=print,
    overhead_cases=OVERHEAD_CASES,
) -> dict:
    """Run everything, write ``json_path`` (and the figure, from that file); return the results."""
    from .overhead import measure_overhead

    started = time.perf_counter()
    results = {
        "command": command,
        "quick": settings.quick,
        "settings": dataclasses.asdict(settings),
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "problems": {},
        "instrument_cost": {},  # per case: instrumented / bare, and where the difference goes
        "skipped": [],
    }
    for case in settings.problems:
        if not available(case):
            results["skipped"].append(f"{case}: its experiment is not registered")
            continue
        results["problems"][case] = run_problem(case, settings, log=log)
    if overhead:
        for case in overhead_cases:
            if not available(case):
                results["skipped"].append(f"instrument cost on {case}: its experiment is not registered")
                continue
            minibatch = case.startswith("h-alexnet")
            steps = max(2, settings.overhead_steps // 10) if minibatch else settings.overhead_steps
            log(f"[instrument cost] {case}: {steps} steps")
            try:
                results["instrument_cost"][case] = measure_overhead(
                    case, steps=steps, chunk=1 if minibatch else 5, with_callbacks=not settings.quick
                )
            except FloatingPointError as exc:
                results["instrument_cost"][case] = {"error": str(exc)}
            o = results["instrument_cost"][case]
            if "ratio" in o:
                log(f"    ratio {o['ratio']:.3f} (CPU time {o['ratio_cpu_time']:.3f}), same steps: {o['same_steps']}")
    # The headline number: Fig. 1 (width 10,000) instrumented / bare wall time.
    fig1 = results["instrument_cost"].get("fig1-width10000", {})
    results["instrument_overhead"] = fig1.get("ratio")
    results["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["wall_seconds"] = time.perf_counter() - started
    results["acceptance"] = acceptance(results)
    results = finite_json(results)
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, json_path)
    if figure_stem is not None and results["problems"]:
        from .figures import plot_results

        # Drawn from the file just written, so the figure shows exactly what the JSON holds.
        results["figures"] = [str(p) for p in plot_results(json.loads(json_path.read_text()), Path(figure_stem))]
    return results


def main_from_args(args) -> int:
    from .report import render

    settings = settings_for(args.quick, args.problems.split(",") if args.problems else None, args.cap)
    out = Path(args.out)
    suffix = "-quick" if settings.quick else ""
    json_path = Path(args.json) if args.json else out / f"results{suffix}.json"
    stem = None if args.no_figure else out / f"work_precision{suffix}"
    command = (
        "diralign " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("diralign") else "diralign bench"
    )
    results = run_bench(
        settings,
        json_path,
        stem,
        overhead=not args.no_overhead,
        command=command,
        log=(lambda *a, **k: None) if args.quiet else (lambda msg: print(msg, flush=True)),
    )
    if not args.quiet:
        print(render(results))
        print(
            f"results: {json_path}"
            + (f"; figures: {', '.join(results.get('figures', []))}" if results.get("figures") else "")
        )
        for line in results["skipped"]:
            print(f"skipped: {line}")
    return 0


__all__ = ["FULL", "QUICK", "Settings", "finite_json", "main_from_args", "run_bench", "settings_for"]
