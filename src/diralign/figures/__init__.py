"""Figures, drawn from a run directory only (never from live state, never importing experiments).

    diralign plot runs/fig1

Every run gets the common figures (:mod:`.common`); an experiment's own figures are listed
in ``EXPERIMENT_FIGURES`` by experiment name.
"""

from __future__ import annotations

from pathlib import Path

from ..rundir import Run
from ..rundir.disk import check_writable
from .common import plot_curves, plot_margins
from .fig1 import plot_fig1
from .margins import plot_margin_panel

EXPERIMENT_FIGURES = {
    "fig1": plot_fig1,
    "margins": plot_margin_panel,
}


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Every figure of a run directory; returns the paths written."""
    run = (run_dir if isinstance(run_dir, Run) else Run(run_dir)).check()
    out_dir = Path(out_dir or run.path)
    check_writable(
        out_dir,
        f"write figures into {out_dir}",
        "the run itself is unchanged; draw them elsewhere with diralign.load_run(DIR).plot(OUT_DIR)",
    )
    paths = plot_curves(run, out_dir) + plot_margins(run, out_dir)
    extra = EXPERIMENT_FIGURES.get(run.experiment)
    if extra is not None:
        paths += extra(run, out_dir)
    return paths


__all__ = ["EXPERIMENT_FIGURES", "plot_run"]
