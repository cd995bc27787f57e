"""``fig2.png/pdf``: the paper's Figure 2/3 from a ``margins`` run directory.

diralign plot runs/margins
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..rundir import schema
from .common import _pyplot, as_run, draw_margins, margin_trajectories, save
from .margins_convergence import draw_convergence


def plot_margin_panel(run, out_dir=None) -> list:
    """``fig2.png/pdf``: the Fig. 2 margin plot; beside it the margins' convergence on log
    axes (:mod:`.margins_convergence`); below, alignment ``1 - cos(W, -grad L)`` and the
    directional path length (plus the angle to the final direction when directions were
    stored), all against ``ln(n/L)``."""
    plt = _pyplot()
    run = as_run(run)
    out_dir = Path(out_dir or run.path)
    log = run.log
    if len(log) == 0:
        return []
    fig, ((ax_m, ax_c), (ax_a, ax_p)) = plt.subplots(2, 2, figsize=(13, 9))
    draw_margins(ax_m, run)
    trajectories = margin_trajectories(run)
    if trajectories is not None:
        draw_convergence(ax_c, trajectories[0], trajectories[1])
    summary, config, data = run.summary, run.config, run.data_info
    ax_m.set_title(
        f"{config.get('model', '?')} on {data.get('data', config.get('data', '?'))}, "
        f"n = {data.get('n', '?')} ({summary.get('dynamics', config.get('dynamics', '?'))})"
    )
    x = run.ln_n_over_L
    cos = run.column(schema.ALIGNMENT_COS)
    ok = np.isfinite(cos)
    if ok.any() and 1.0 - cos[ok][-1] < 0.05:  # close to 1: the distance to 1 on a log scale
        ax_a.semilogy(x[ok], np.clip(1.0 - cos[ok], 1e-16, None), lw=1.5)
        ax_a.set_title("alignment: $1 - \\cos(W, -\\nabla L)$")
    else:
        ax_a.plot(x[ok], cos[ok], lw=1.2)
        ax_a.set_ylim(min(-0.05, float(np.nanmin(cos[ok])) if ok.any() else 0.0), 1.02)
        ax_a.set_title("alignment: $\\cos(W, -\\nabla L)$")
    ax_a.set_xlabel("$\\ln(n/L)$")
    ax_a.grid(alpha=0.3, which="both")
    ax_p.plot(x, run.column(schema.PATH_LENGTH), lw=1.5, color="C0", label="path length $\\zeta$")
    ax_p.set_ylabel("directional path length $\\zeta$")
    ax_p.set_xlabel("$\\ln(n/L)$")
    ax_p.set_title("directional path length")
    ax_p.grid(alpha=0.3)
    angles = run.angle_to_final
    if angles is not None:
        m = min(len(angles), len(x))
        keep = angles[:m] > 0  # the last point is the final direction itself (angle 0)
        twin = ax_p.twinx()
        twin.semilogy(x[:m][keep], angles[:m][keep], lw=1.2, color="C3")
        twin.set_ylabel("angle to final direction (rad)", color="C3")
        ax_p.set_title("path length (blue), angle to final (red)")
    fig.tight_layout()
    paths = save(fig, out_dir, "fig2")
    plt.close(fig)
    return paths
