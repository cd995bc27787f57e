"""Figures every run gets, drawn from its run directory (through :class:`~diralign.rundir.Run`).

    diralign plot runs/deep-linear

``curves``: the instrument panel against ``ln(n/L)`` (margins, alignment, path length, angle
to the final direction, per-layer shares); ``margins``: the paper's Fig. 2-style plot of
every example's normalised margin.  The drawing helpers here are shared by the experiments'
figures and by ``diralign compare``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..rundir import Run, schema
from ..rundir.disk import disk_errors


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def as_run(run) -> Run:
    return run if isinstance(run, Run) else Run(run)


def save(fig, out_dir: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        path = Path(out_dir) / f"{stem}.{ext}"
        with disk_errors(
            f"write the figure {path}",
            "the run itself is unchanged; plot it elsewhere with diralign.load_run(DIR).plot(OUT_DIR)",
        ):
            fig.savefig(path, dpi=150 if ext == "png" else None, bbox_inches="tight")
        paths.append(path)
    return paths


# The instrument panel's curves against ln(n/L): name -> (title, y scale).  ``diralign
# plot`` draws one run per panel, ``diralign compare`` overlays several (one code path).
ONE_MINUS_COS = "one_minus_cos"  # 1 - alignment_cos, for a log axis
ANGLE_TO_FINAL = "angle_to_final"
CURVES = {
    schema.MIN_NORMALIZED_MARGIN: ("min normalised margin $\\gamma$", "linear"),
    schema.ALIGNMENT_COS: ("alignment $\\cos(W, -\\nabla L)$", "linear"),
    ONE_MINUS_COS: ("$1 - \\cos(W, -\\nabla L)$", "log"),
    schema.PATH_LENGTH: ("directional path length $\\zeta$", "linear"),
    schema.NORMALIZED_SMOOTHED_MARGIN: ("normalised smoothed margin $\\tilde\\alpha$", "linear"),
    ANGLE_TO_FINAL: ("angle to final direction (rad)", "log"),
}


def _positive(values) -> np.ndarray:
    # Log axes: an exact 0 (the final direction's angle to itself) is a gap, not a cliff.
    values = np.asarray(values, dtype=float)
    return np.where(values > 0, values, np.nan)


def curve(run, name: str):
    """``(x, y)`` of curve ``name`` (a ``CURVES`` key) for a run, x = ``ln(n/L)``; None if absent."""
    run = as_run(run)
    x = run.ln_n_over_L
    if name == ANGLE_TO_FINAL:
        angles = run.angle_to_final  # written when the run finishes
        if angles is None:
            return None
        m = min(len(angles), len(x))
        return x[:m], _positive(angles[:m])
    if name == ONE_MINUS_COS:
        y = _positive(1.0 - run.column(schema.ALIGNMENT_COS))
    else:
        y = run.column(name)
    if not np.isfinite(y).any():
        return None
    return x, y


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


def draw_curve(ax, run, name: str, **line) -> bool:
    """Curve ``name`` of one run on ``ax`` (matplotlib ``line`` keywords); False if absent."""
    data = curve(run, name)
    if data is None:
        return False
    ax.plot(*data, **{"lw": 1.5, **line})
    return True


def plot_curves(run, out_dir=None) -> list[Path]:
    plt = _pyplot()
    run = as_run(run)
    out_dir = Path(out_dir or run.path)
    log = run.log
    x = run.ln_n_over_L
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    panels = [
        schema.MIN_NORMALIZED_MARGIN,
        schema.ALIGNMENT_COS,
        schema.PATH_LENGTH,
        schema.NORMALIZED_SMOOTHED_MARGIN,
        ANGLE_TO_FINAL,
    ]
    for ax, name in zip(axes.flat, panels):
        draw_curve(ax, run, name)
        style_axis(ax, name)
    ax = axes.flat[5]
    shares = schema.block_columns(log.columns)
    for col in shares[:12]:
        ax.plot(x, log[col], label=col[len(schema.SHARE_PREFIX) :])
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


def margin_trajectories(run, max_lines: int = 2000):
    """``(x, traj, degree)``: ``ln(n/L)`` at each log point and the stored normalised margins
    of at most ``max_lines`` examples, columns in final-margin order (thinned evenly in rank).

    Reads only the selected columns of the memory-mapped ``margins.bin``, so 50,000
    examples times thousands of log points never have to fit in memory.
    """
    run = as_run(run)
    margins = run.margins
    if len(margins) == 0:
        return None
    rows = len(margins)
    x = run.ln_n_over_L[:rows]
    order = np.argsort(np.asarray(margins[rows - 1], dtype=np.float64), kind="stable")
    n = len(order)
    if n > max_lines:  # thin out evenly in final-margin order so the plot stays legible
        order = order[np.linspace(0, n - 1, max_lines).astype(int)]
    traj = np.asarray(margins[:rows][:, order], dtype=np.float64)
    return x, traj, run.degree


def draw_margins(ax, run, max_lines: int = 2000, cmap_name: str = "rainbow") -> bool:
    """Paper Fig. 2/3 on ``ax``: one line per example, coloured by final-margin rank."""
    import matplotlib.pyplot as plt

    data = margin_trajectories(run, max_lines)
    if data is None:
        return False
    x, traj, degree = data
    from matplotlib.collections import LineCollection

    count = traj.shape[1]
    colors = plt.get_cmap(cmap_name)(np.linspace(0.0, 1.0, count))
    # One collection instead of thousands of Line2D objects: same picture, far faster.
    lines = LineCollection(
        [np.column_stack([x, traj[:, r]]) for r in range(count)], colors=colors, linewidths=0.5, alpha=0.7
    )
    ax.add_collection(lines)
    finite = traj[np.isfinite(traj)]
    if finite.size:
        # Robust limits: a few wild early values (before the data are fitted) would
        # otherwise squash the late trajectories the figure is about into a line.
        low, high = (float(v) for v in np.quantile(finite, [0.005, 0.995]))
        pad = 0.05 * (high - low) or 1.0
        ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("$\\ln(n/L)$")
    ax.set_ylabel(f"margin / $\\|W\\|^{{{degree}}}$" if degree else "margin / median nonnegative margin")
    ax.axhline(0.0, color="k", lw=0.5)
    if x[-1] > x[0]:
        ax.set_xlim(x[0], x[-1])
    ax.grid(alpha=0.3)
    return True


def plot_margins(run, out_dir=None, max_lines: int = 2000) -> list[Path]:
    """Paper Fig. 2/3: one line per example, coloured by final-margin rank."""
    plt = _pyplot()
    run = as_run(run)
    out_dir = Path(out_dir or run.path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if not draw_margins(ax, run, max_lines):
        plt.close(fig)
        return []
    ax.set_title(f"per-example margins ({run.experiment})")
    fig.tight_layout()
    paths = save(fig, out_dir, "margins")
    plt.close(fig)
    return paths
