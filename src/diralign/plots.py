"""Figures from a run directory, never from live state.

    diralign plot runs/deep-linear

Common figures for every run: the instrument panel against ``ln(n/L)`` (margins,
alignment, path length, angle to the final direction, per-layer shares) and the
paper's Fig. 2-style margin plot.  Experiments may add their own (``Experiment.plot``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .store import read_array_log


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(run_dir):
    import pandas as pd

    path = Path(run_dir) / "log.csv"
    if not path.is_file():
        raise UserError(f"{run_dir} has no log.csv; is it a diralign run directory?")
    return pd.read_csv(path)


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = Path(out_dir) / f"{stem}.{ext}"
        fig.savefig(path, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    return paths


# The instrument panel's curves against ln(n/L): name -> (title, y scale).  ``diralign
# plot`` draws one run per panel, ``diralign compare`` overlays several (one code path).
CURVES = {
    "min_normalized_margin": ("min normalised margin $\\gamma$", "linear"),
    "alignment_cos": ("alignment $\\cos(W, -\\nabla L)$", "linear"),
    "one_minus_cos": ("$1 - \\cos(W, -\\nabla L)$", "log"),
    "path_length": ("directional path length $\\zeta$", "linear"),
    "normalized_smoothed_margin": ("normalised smoothed margin $\\tilde\\alpha$", "linear"),
    "angle_to_final": ("angle to final direction (rad)", "log"),
}


def curve(run_dir, name: str, log=None):
    """``(x, y)`` of curve ``name`` for a run (x = ``ln(n/L)`` at its log points), or None."""
    run_dir = Path(run_dir)
    log = read_log(run_dir) if log is None else log
    x = log["ln_n_over_L"].to_numpy()
    if name == "angle_to_final":
        path = run_dir / "angle_to_final.npy"  # written when the run finishes
        if not path.exists():
            return None
        angles = np.load(path)
        m = min(len(angles), len(x))
        return x[:m], _positive(angles[:m])
    if name == "one_minus_cos":
        if "alignment_cos" not in log:
            return None
        return x, _positive(1.0 - log["alignment_cos"].to_numpy(dtype=float))
    if name not in log or not np.isfinite(log[name].to_numpy(dtype=float)).any():
        return None
    return x, log[name].to_numpy(dtype=float)


def _positive(values: np.ndarray) -> np.ndarray:
    # Log axes: an exact 0 (the final direction's angle to itself) is a gap, not a cliff.
    values = np.asarray(values, dtype=float)
    return np.where(values > 0, values, np.nan)


def style_axis(ax, name: str) -> None:
    title, yscale = CURVES[name]
    ax.set_title(title)
    ax.set_xlabel("$\\ln(n/L)$")
    ax.set_yscale(yscale)
    ax.set_xscale("symlog", linthresh=10.0)
    xs = [np.asarray(line.get_xdata(), dtype=float) for line in ax.get_lines()]
    xs = np.concatenate(xs) if xs else np.zeros(0)
    xs = xs[np.isfinite(xs)]
    if xs.size and xs.max() > xs.min():  # autoscale pads symlog axes into negative ln(n/L)
        ax.set_xlim(xs.min(), xs.max())
    ax.grid(alpha=0.3)


def draw_curve(ax, run_dir, name: str, log=None, **line) -> bool:
    """Curve ``name`` of one run on ``ax`` (matplotlib ``line`` keywords); False if absent."""
    data = curve(run_dir, name, log)
    if data is None:
        return False
    ax.plot(*data, **{"lw": 1.5, **line})
    return True


def plot_curves(run_dir, out_dir=None) -> list[Path]:
    plt = _pyplot()
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    log = read_log(run_dir)
    x = log["ln_n_over_L"].to_numpy()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = ["min_normalized_margin", "alignment_cos", "path_length", "normalized_smoothed_margin", "angle_to_final"]
    for ax, name in zip(axes.flat, panels):
        draw_curve(ax, run_dir, name, log)
        style_axis(ax, name)
    ax = axes.flat[5]
    shares = [c for c in log.columns if c.startswith("share:")]
    for col in shares[:12]:
        ax.plot(x, log[col], label=col[6:])
    if shares:
        ax.legend(fontsize=7)
    ax.set_title("per-layer norm share $\\|U_j\\|^2/\\|W\\|^2$")
    ax.set_xlabel("$\\ln(n/L)$")
    ax.grid(alpha=0.3)
    ax.set_xscale("symlog", linthresh=10.0)
    fig.tight_layout()
    paths = save(fig, out_dir, "curves")
    plt.close(fig)
    return paths


def margin_trajectories(run_dir, max_lines: int = 2000):
    """``(x, traj, degree)``: ``ln(n/L)`` at each log point and the stored normalised margins
    of at most ``max_lines`` examples, columns in final-margin order (thinned evenly in rank).

    Reads only the selected columns of the memory-mapped ``margins.bin``, so 50,000
    examples times thousands of log points never have to fit in memory.
    """
    run_dir = Path(run_dir)
    margins = read_array_log(run_dir, "margins")
    if margins is None or len(margins) == 0:
        return None
    log = read_log(run_dir)
    rows = min(len(margins), len(log))
    x = log["ln_n_over_L"].to_numpy()[:rows]
    order = np.argsort(np.asarray(margins[rows - 1], dtype=np.float64), kind="stable")
    n = len(order)
    if n > max_lines:  # thin out evenly in final-margin order so the plot stays legible
        order = order[np.linspace(0, n - 1, max_lines).astype(int)]
    traj = np.asarray(margins[:rows][:, order], dtype=np.float64)
    degree = None
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        degree = json.loads(summary_path.read_text()).get("homogeneity_degree")
    return x, traj, degree


def draw_margins(ax, run_dir, max_lines: int = 2000, cmap_name: str = "rainbow") -> bool:
    """Paper Fig. 2/3 on ``ax``: one line per example, coloured by final-margin rank."""
    import matplotlib.pyplot as plt

    data = margin_trajectories(run_dir, max_lines)
    if data is None:
        return False
    x, traj, degree = data
    from matplotlib.collections import LineCollection

    count = traj.shape[1]
    colors = plt.get_cmap(cmap_name)(np.linspace(0.0, 1.0, count))
    # One collection instead of thousands of Line2D objects: same picture, far faster.
    lines = LineCollection([np.column_stack([x, traj[:, r]]) for r in range(count)], colors=colors, linewidths=0.5, alpha=0.7)
    ax.add_collection(lines)
    finite = traj[np.isfinite(traj)]
    if finite.size:
        # Robust limits: a few wild early values (before the data are fitted) would
        # otherwise squash the late trajectories the figure is about into a line.
        low, high = (float(v) for v in np.quantile(finite, [0.005, 0.995]))
        pad = 0.05 * (high - low) or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("$\\ln(n/L)$")
    ax.set_ylabel("margin / $\\|W\\|^{%s}$" % degree if degree else "margin / median nonnegative margin")
    ax.axhline(0.0, color="k", lw=0.5)
    if x[-1] > x[0]:
        ax.set_xlim(x[0], x[-1])
    ax.grid(alpha=0.3)
    return True


def plot_margins(run_dir, out_dir=None, max_lines: int = 2000) -> list[Path]:
    """Paper Fig. 2/3: one line per example, coloured by final-margin rank."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not draw_margins(ax, run_dir, max_lines):
        plt.close(fig)
        return []
    meta = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    ax.set_title(f"per-example margins ({meta.get('experiment', 'run')})")
    fig.tight_layout()
    paths = save(fig, out_dir, "margins")
    plt.close(fig)
    return paths


def plot_run(run_dir, out_dir=None) -> list[Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a diralign run directory (no config.json)")
    paths = plot_curves(run_dir, out_dir) + plot_margins(run_dir, out_dir)
    meta = json.loads((run_dir / "config.json").read_text())
    from .experiments import get_experiment

    paths += get_experiment(meta["experiment"]).plot(run_dir, Path(out_dir or run_dir))
    return paths
