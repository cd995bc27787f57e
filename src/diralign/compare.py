"""Overlay several runs' curves against ``ln(n/L)``, labelled by how their configs differ.

    diralign compare sweeps/width --out figures/width

Arguments are run directories or sweep directories (each sweep stands for its points,
in grid order).  Each run is labelled by the config keys in which the runs differ
(``width=200, seed=0``; a sweep's grid keys first, in grid order).  Figures, PNG and
PDF: ``compare`` (all panels) and ``compare_NAME`` for each of ``alignment_cos``,
``one_minus_cos`` (log axis), ``min_normalized_margin``, ``path_length`` and
``angle_to_final``.  The curves are drawn by :mod:`diralign.figures.common`, as in ``diralign plot``.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .rundir import schema

QUANTITIES = ("alignment_cos", "one_minus_cos", "min_normalized_margin", "path_length", "angle_to_final")
STEMS = ("compare",) + tuple(f"compare_{name}" for name in QUANTITIES)


def collect(paths) -> tuple[list[Path], list[str]]:
    """``(run directories, grid keys)`` from run and sweep directories, duplicates dropped."""
    from .sweep import SWEEP_FILE, read_record, sweep_runs

    runs, grid_keys = [], []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise UserError(f"{path} does not exist or is not a directory; give run or sweep directories")
        members = sweep_runs(path)
        if members is not None:
            if not members:
                raise UserError(f"{path} is a sweep with no run directories yet; run the sweep first")
            for key, _ in read_record(path)["grid"]:
                if key not in grid_keys:
                    grid_keys.append(key)
        elif (path / schema.CONFIG).is_file():
            members = [path]
        else:
            raise UserError(f"{path} is neither a run directory ({schema.CONFIG}) nor a sweep directory ({SWEEP_FILE})")
        for member in members:
            if not (member / schema.LOG).is_file():
                raise UserError(f"{member} has no {schema.LOG} yet; let the run log a point first")
            if member.resolve() not in [r.resolve() for r in runs]:
                runs.append(member)
    return runs, grid_keys


def _flat_config(run_dir: Path) -> dict:
    from .rundir import Run

    run = Run(run_dir)
    flat = {"experiment": run.experiment}

    def walk(d):  # sectioned configs (runtime, dynamics, ...) flatten to their leaf keys
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value)
            else:
                flat[key] = value

    walk(run.config)
    return flat


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)  # as --set writes tuples: widths=8x8
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{value:g}"
    return str(value)


def labels(runs: list[Path], first_keys=()) -> list[str]:
    """One label per run from the config keys whose values differ between the runs."""
    configs = [_flat_config(run) for run in runs]
    order = list(first_keys)
    for config in configs:
        order += [k for k in config if k not in order]
    differing = [k for k in order if len({json.dumps(c.get(k, "<unset>"), sort_keys=True) for c in configs}) > 1]
    if not differing:
        return [run.name for run in runs]  # same config: the directory tells them apart
    return [", ".join(f"{k}={_show(c[k])}" for k in differing if k in c) for c in configs]


def compare(paths, out, force: bool = False) -> list[Path]:
    """Write the overlay figures of ``paths`` into ``out``; returns the files written."""
    from .figures import common
    from .rundir import Run

    runs, grid_keys = collect(paths)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(
            f"--out {out} is not empty; pass --force to overwrite the comparison figures in it, "
            "or choose another directory"
        )
    names = labels(runs, grid_keys)
    readers = [Run(run) for run in runs]
    plt = common._pyplot()
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "viridis")
    color = [colors(i if len(runs) <= 10 else i / max(len(runs) - 1, 1)) for i in range(len(runs))]
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def overlay(ax, name):
        for run, label, c in zip(readers, names, color):
            common.draw_curve(ax, run, name, label=label, color=c)
        common.style_axis(ax, name)

    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, name in zip(axes.flat, QUANTITIES):
        overlay(ax, name)
    handles, texts = axes.flat[0].get_legend_handles_labels()
    axes.flat[5].axis("off")
    if handles:
        axes.flat[5].legend(handles, texts, loc="center", fontsize=8, frameon=False)
    fig.tight_layout()
    written += common.save(fig, out, "compare")
    plt.close(fig)
    for name in QUANTITIES:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        overlay(ax, name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        written += common.save(fig, out, f"compare_{name}")
        plt.close(fig)
    return written


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP", help="run directories and/or sweep directories")
    parser.add_argument("--out", required=True, help="folder for the figures")
    parser.add_argument("--force", action="store_true", help="overwrite the comparison figures in a non-empty --out")


def main(args) -> int:
    """``diralign compare RUN_OR_SWEEP... --out DIR``: prints the figure paths."""
    for path in compare(args.runs, args.out, force=args.force):
        print(path)
    return 0
