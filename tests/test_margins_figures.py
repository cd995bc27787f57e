"""fig2's convergence panel (issue 13): distances to the final margins and the rate |dq/d ln s|
read as falling for converging margins and as level or rising for drifting ones."""

import numpy as np

from diralign.figures import margins_convergence as mc


def _slope(x, y):
    return np.polyfit(np.log(x), np.log(y), 1)[0]


def test_converging_margins_fall_like_their_power_law():
    s = np.geomspace(5.0, 5000.0, 300)
    limits = np.linspace(0.5, 1.5, 7)
    traj = limits[None, :] + 2.0 / s[:, None]  # q_i = q_i* + 2/s: converges like s^-1
    curves = mc.convergence_curves(s, traj)
    early = curves["rate_x"] < 500
    assert abs(_slope(curves["rate_x"][early], curves["rate_median"][early]) + 1) < 0.05
    early_d = curves["x"] < 500  # away from the end, where the distance to the final point plunges
    assert abs(_slope(curves["x"][early_d], curves["distance_median"][early_d]) + 1) < 0.1
    assert curves["scale"] == traj[-1].max()


def test_drifting_margins_have_a_rising_rate():
    s = np.geomspace(5.0, 200.0, 200)
    traj = 1e-3 * s[:, None] * np.linspace(1, 2, 5)[None, :]  # still rising at a steady slope
    curves = mc.convergence_curves(s, traj)
    assert _slope(curves["rate_x"], curves["rate_median"]) > 0.9


def test_panel_starts_where_every_example_is_fitted_and_needs_three_points():
    s = np.array([-0.5, 0.5, 2.0, 4.0, 8.0, 16.0])
    traj = np.array([[-1, 1], [-0.1, 1], [0.2, 1.1], [0.3, 1.2], [0.35, 1.25], [0.37, 1.27]])
    curves = mc.convergence_curves(s, traj)
    assert curves["start"] == 2.0 and curves["x"][0] == 2.0
    assert mc.convergence_curves(s[:4], traj[:4]) is None  # two fitted points only


def test_fig2_draws_the_convergence_panel(tmp_path, monkeypatch):
    from diralign.figures import margins as fig2
    from diralign.runner import start_run

    start_run("margins", ["data=digits", "subset=20", "target_risk=1e-4"], tmp_path / "run", quiet=True)
    drawn = []
    real = fig2.draw_convergence
    monkeypatch.setattr(fig2, "draw_convergence", lambda ax, x, traj: drawn.append(traj.shape) or real(ax, x, traj))
    paths = fig2.plot_margin_panel(tmp_path / "run")
    assert drawn and drawn[0][1] == 20 and any(p.suffix == ".png" for p in paths)


def test_draw_convergence_uses_log_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.geomspace(1.0, 100.0, 60)
    traj = 1.0 + 1.0 / s[:, None] * np.linspace(1, 3, 10)[None, :]
    fig, ax = plt.subplots()
    assert mc.draw_convergence(ax, s, traj)
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "convergence" in ax.get_title()
    plt.close(fig)
