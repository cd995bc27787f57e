"""Convergence of the per-example margins, legible at a glance (the panel beside the margins in ``fig2``).

    diralign plot runs/margins      # fig2.png: margins, convergence, alignment, path length

Corollary 3.2 says each normalised margin ``q_i = p_i / ||W||^k`` converges.  On the margin
plot itself a slow drift and a converged curve look alike; on a log axis they do not.  Two
curves per run, both relative to ``max_i |q_i(final)|`` so that runs compare:

* the **distance to the final margin** ``|q_i(s) - q_i(s_end)|`` of each example (thin lines
  coloured by final-margin rank, as in the margin plot; their median thick).  It reaches 0 at
  the end by construction, so its plunge at the right edge says nothing;
* the **rate** ``|dq_i / d ln s|`` (median over examples, dashed), over steps of 0.1 in ``ln s``.
  It has no end-point artefact.  If ``q_i = q_i* + C s^(-p)`` both curves fall like ``s^(-p)``
  (the rate is ``p`` times the distance to the limit ``q_i*``); a margin still drifting at a
  steady slope ``c`` per unit ``s`` has a rate ``c s`` that *rises*.  Flattening margins read
  as falling curves, unconverged ones as level or rising ones.

The x-axis is ``ln(n/L)`` on a log scale, from the first log point where every example is
classified correctly (before that the normalised margins are not yet the late-phase object).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

RATE_STEP = 0.1  # ln s between the points a rate is taken over (~23 per decade of ln(n/L))


def convergence_curves(x: np.ndarray, traj: np.ndarray, start: Optional[float] = None) -> Optional[dict]:
    """Distances to the final margins and rates ``|dq/d ln s|``, relative to ``max|q(end)|``.

    ``x``: ``ln(n/L)`` at each log point, ``traj``: ``[T, m]`` normalised margins.  Uses the
    points with ``x >= start`` (default: the first point where all margins are positive) and
    ``x > 0``.  Returns ``None`` when fewer than three such points exist.
    """
    x = np.asarray(x, dtype=np.float64)
    traj = np.asarray(traj, dtype=np.float64)
    if start is None:
        separated = np.flatnonzero((traj > 0).all(axis=1))
        start = x[separated[0]] if separated.size else x[0]
    keep = (x >= start) & (x > 0) & np.isfinite(traj).all(axis=1)
    x, traj = x[keep], traj[keep]
    if len(x) < 3:
        return None
    scale = float(np.max(np.abs(traj[-1]))) or 1.0
    distance = np.abs(traj[:-1] - traj[-1]) / scale  # the last point (distance 0) is dropped
    # The rate over steps of at least RATE_STEP in ln s: consecutive log points of an SGD run
    # can be a hair apart, and their ratio is then mostly the noise of one epoch.
    keep_rate = [0]
    for i in range(1, len(x)):
        if np.log(x[i] / x[keep_rate[-1]]) >= RATE_STEP or i == len(x) - 1:
            keep_rate.append(i)
    xr, tr = x[keep_rate], traj[keep_rate]
    ds = np.diff(np.log(xr))
    good = ds > 0
    mid = np.sqrt(xr[:-1] * xr[1:])[good]
    rate = (np.abs(np.diff(tr, axis=0))[good] / ds[good, None]) / scale
    return {
        "x": x[:-1],
        "distance": distance,
        "distance_median": np.median(distance, axis=1),
        "distance_band": np.quantile(distance, [0.1, 0.9], axis=1),
        "rate_x": mid,
        "rate_median": np.median(rate, axis=1) if rate.size else np.zeros(0),
        "scale": scale,
        "start": float(start),
    }


def draw_convergence(ax, x: np.ndarray, traj: np.ndarray, max_lines: int = 80, cmap_name: str = "rainbow") -> bool:
    """The panel on ``ax`` from ``(x, traj)`` as :func:`diralign.plots.margin_trajectories`
    returns them (columns in final-margin order)."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    curves = convergence_curves(x, traj)
    if curves is None:
        ax.text(
            0.5,
            0.5,
            "too few log points after\nall examples are fitted",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
        return False
    xs, distance = curves["x"], curves["distance"]
    floor = 1e-7  # float32 margins: relative changes below this are rounding
    columns = np.unique(np.linspace(0, distance.shape[1] - 1, min(max_lines, distance.shape[1])).astype(int))
    colors = plt.get_cmap(cmap_name)(np.linspace(0.0, 1.0, distance.shape[1]))[columns]
    segments = [np.column_stack([xs, np.maximum(distance[:, c], floor)]) for c in columns]
    ax.add_collection(LineCollection(segments, colors=colors, linewidths=0.4, alpha=0.3))
    ax.fill_between(
        xs,
        np.maximum(curves["distance_band"][0], floor),
        np.maximum(curves["distance_band"][1], floor),
        color="0.5",
        alpha=0.25,
        lw=0,
        label="distance, 10-90% of examples",
    )
    ax.plot(xs, np.maximum(curves["distance_median"], floor), color="k", lw=2.0, label="distance to final, median")
    if curves["rate_median"].size:
        ax.plot(
            curves["rate_x"],
            np.maximum(curves["rate_median"], floor),
            color="k",
            lw=1.5,
            ls="--",
            label="rate $|dq/d\\ln s|$, median",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(xs[0], xs[-1] * 1.02 if len(xs) > 1 else None)
    shown = np.concatenate([distance[:, columns].ravel(), curves["rate_median"]])
    shown = shown[shown > floor]
    if shown.size:
        low, high = np.quantile(shown, [0.01, 1.0])
        ax.set_ylim(max(low / 2, floor), high * 2)
    ax.set_xlabel("$s = \\ln(n/L)$")
    ax.set_ylabel("relative to $\\max_i |q_i(\\mathrm{end})|$")
    ax.set_title("convergence of $q_i$: falling = flattening")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    return True
