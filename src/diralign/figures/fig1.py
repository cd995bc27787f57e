"""Figure 1 from a run directory: contour panels a/b/c and the late-phase curves.

    diralign plot runs/fig1

``fig1_contours`` -- (a) the NTK max-margin predictor, (b) the network at the first perfect
classification, (c) the network at the end; filled contours of the prediction, each
divided by its own largest value on the grid (so the shapes compare), the zero level in
black, points as red "+" and blue "-".  Also ``fig1a``, ``fig1b``, ``fig1c`` one by one.
``fig1_curves`` -- against ``ln(n/L)``: min normalised margin, alignment cos (and
``1 - cos``), directional path length, and the distance of the normalised prediction
surface from the final one and from the NTK max-margin one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..probes import surface_distance
from ..rundir import Run, schema
from .common import _pyplot, as_run, save

SNAPSHOTS = schema.FIG1_SNAPSHOTS

TITLES = {
    "a": "(a) NTK max-margin predictor",
    "b": "(b) first perfect classification",
    "c": "(c) end of training",
}


def load_snapshot(run: Run, panel: str):
    return run.npz(SNAPSHOTS[panel])


def draw_contour(ax, snap: dict, title: str) -> None:
    xs = snap["xs"]
    values = snap["values"]
    scale = float(np.abs(values).max()) or 1.0
    levels = np.linspace(-1.0, 1.0, 21)
    ax.contourf(xs, xs, values / scale, levels=levels, cmap="BrBG", alpha=0.85)
    ax.contour(xs, xs, values / scale, levels=[0.0], colors="k", linewidths=1.6)
    X, y = snap["X"], snap["y"]
    ax.scatter(X[y > 0, 0], X[y > 0, 1], marker="+", c="red", s=45, linewidths=1.6, label="+")
    ax.scatter(X[y < 0, 0], X[y < 0, 1], marker="_", c="blue", s=45, linewidths=1.6, label="-")
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(xs[0], xs[-1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    if str(snap.get("kind")) == "ntk-svm":
        ax.set_title(f"{title}\n(hard-margin SVM on the NTK features)", fontsize=10)
    else:
        ax.set_title(f"{title}\nat $\\ln(n/L)$ = {float(snap['ln_n_over_L']):.3g}", fontsize=10)


def plot_contours(run: Run, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    snaps = {panel: load_snapshot(run, panel) for panel in SNAPSHOTS}
    if not any(snaps.values()):
        return []
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for ax, (panel, snap) in zip(axes, snaps.items()):
        if snap is None:
            ax.set_axis_off()
            ax.set_title(f"{TITLES[panel]}\n(not reached in this run)", fontsize=10)
            continue
        draw_contour(ax, snap, TITLES[panel])
    fig.tight_layout()
    paths += save(fig, out_dir, "fig1_contours")
    plt.close(fig)
    for panel, snap in snaps.items():
        if snap is None:
            continue
        fig, ax = plt.subplots(figsize=(4.6, 4.8))
        draw_contour(ax, snap, TITLES[panel])
        fig.tight_layout()
        paths += save(fig, out_dir, f"fig1{panel}")
        plt.close(fig)
    return paths


def plot_fig1_curves(run: Run, out_dir: Path) -> list[Path]:
    plt = _pyplot()
    log = run.log
    x = run.ln_n_over_L
    summary = run.summary
    separable = summary.get("first_separable_ln_n_over_L")
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    ax = axes[0, 0]
    ax.plot(x, log["min_normalized_margin"], label="min normalised margin $\\gamma$")
    if "normalized_smoothed_margin" in log:
        ax.plot(x, log["normalized_smoothed_margin"], "--", label="normalised smoothed margin $\\tilde\\alpha$")
    ax.legend(fontsize=8)
    late = x >= (separable if separable is not None else x[0])
    shown = [log[c].to_numpy()[late] for c in ("min_normalized_margin", "normalized_smoothed_margin") if c in log]
    shown = np.concatenate(shown) if shown else np.array([])
    shown = shown[np.isfinite(shown)]
    if shown.size:  # the early smoothed margin is very negative: zoom on the late phase
        low, high = float(shown.min()), float(shown.max())
        pad = 0.1 * (high - low) or 0.1 * abs(high) or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.set_title("margins $/\\|W\\|^2$ (zoomed after first perfect classification)")
    ax = axes[0, 1]
    ax.plot(x, log["alignment_cos"])
    ax.set_title("alignment $\\cos(W, -\\nabla L)$")
    ax = axes[0, 2]
    ax.semilogy(x, np.clip(1.0 - log["alignment_cos"].to_numpy(), 1e-16, None))
    ax.set_title("$1 - $ alignment cos")
    ax = axes[1, 0]
    ax.plot(x, log["path_length"])
    ax.set_title("directional path length $\\zeta$")
    ax = axes[1, 1]
    surfaces = run.array(schema.SURFACES)
    if surfaces is not None and len(surfaces):
        rows = min(len(surfaces), len(x))
        traj = np.asarray(surfaces[:rows], dtype=np.float64)
        # The last row is the final surface itself (distance 0): not drawn on a log axis.
        to_final = np.array([surface_distance(row, traj[-1]) for row in traj[:-1]])
        ax.semilogy(x[: rows - 1], to_final, label="from the final surface")
        ntk = load_snapshot(run, "a")
        if ntk is not None and "surface_values" in ntk:
            to_ntk = np.array([surface_distance(row, ntk["surface_values"]) for row in traj])
            ax.semilogy(x[:rows], to_ntk, label="from the NTK max-margin surface")
        ax.legend(fontsize=8)
    ax.set_title("distance of the normalised prediction surface")
    ax = axes[1, 2]
    angles = run.angle_to_final
    if angles is not None:
        m = min(len(angles), len(x)) - 1  # without the final point (angle 0)
        ax.semilogy(x[:m], angles[:m])
    ax.set_title("angle of $W/\\|W\\|$ to the final direction (rad)")
    for ax in axes.flat:
        ax.set_xlabel("$\\ln(n/L)$")
        ax.grid(alpha=0.3)
        if separable is not None:
            ax.axvline(separable, color="grey", ls=":", lw=1)
    fig.suptitle(f"Fig. 1 network ({summary.get('dynamics', '?')}); dotted: first perfect classification", fontsize=11)
    fig.tight_layout()
    paths = save(fig, out_dir, "fig1_curves")
    plt.close(fig)
    return paths


def plot_fig1(run, out_dir=None) -> list[Path]:
    run = as_run(run)
    out_dir = Path(out_dir or run.path)
    return plot_contours(run, out_dir) + plot_fig1_curves(run, out_dir)
