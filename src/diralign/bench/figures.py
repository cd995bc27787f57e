"""The work-precision figure, drawn from a results JSON file (never from memory).

    python -m diralign.bench.figures benchmarks/results.json benchmarks/work_precision

One row per problem, three panels:

1. direction error ``||W~ - W~_ref||`` at matched ``ln(n/L)`` against gradient evaluations;
2. the same against wall seconds;
3. ``1 - cos`` (the alignment each dynamics reports at its own iterates) against
   ``ln(n/L)``, with the reference flow's as a thick black line.

Each contender is one colour; markers mark the target (``ln(n/L)`` = 10, 30, 100, 1000) and
a thin line joins one contender's targets, so a run's cost and error can be read as it goes
further.  Flows of one integrator share a colour family, darker = tighter tolerance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MARKERS = {"10": "v", "30": "s", "100": "o", "1000": "*", "10000": "D"}
ERROR_FLOOR = 1e-16  # errors are drawn at least here (log axes); the JSON keeps the value


def _colours(labels: list[str]) -> dict:
    import matplotlib

    families = {"flow/cvode": matplotlib.colormaps["Blues"], "flow/dopri5": matplotlib.colormaps["Greens"]}
    fixed = {"gd": "tab:orange", "loss-based": "tab:red", "constant-gd": "tab:purple"}
    out = {}
    for family, cmap in families.items():
        members = [label for label in labels if label.startswith(family + " ")]
        for i, label in enumerate(members):
            out[label] = cmap(0.45 + 0.5 * (i + 1) / max(len(members), 1))
    other = iter(["tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray"])
    for label in labels:
        out.setdefault(label, fixed.get(label) or next(other, "black"))
    return out


def plot_results(results: dict, stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    problems = results["problems"]
    fig, axes = plt.subplots(len(problems), 3, figsize=(16, 4.6 * len(problems)), squeeze=False)
    for row, (case, section) in enumerate(problems.items()):
        labels = list(section["dynamics"])
        colours = _colours(labels)
        ax_evals, ax_wall, ax_cos = axes[row]
        for label, record in section["dynamics"].items():
            points = [
                (target, at)
                for target, at in record["targets"].items()
                if at["reached"] and at.get("direction_error") is not None
            ]
            for ax, key in ((ax_evals, "grad_evals"), (ax_wall, "wall_seconds")):
                xs = [at[key] for _, at in points]
                ys = [max(at["direction_error"], ERROR_FLOOR) for _, at in points]
                if xs:
                    ax.plot(xs, ys, "-", color=colours[label], lw=0.8, alpha=0.6)
                for (target, _at), x, y in zip(points, xs, ys):
                    ax.plot(x, y, MARKERS.get(target, "o"), color=colours[label], ms=7, mec="black", mew=0.4)
            trace = record["trace"]
            # None: no gradient at that point (sgd logs its alignment only where it has one)
            pairs = [
                (s, 1.0 - c)
                for s, c in zip(trace["ln_n_over_L"], trace["alignment_cos"])
                if s > 0 and c is not None and c == c
            ]
            if pairs:
                ax_cos.plot(
                    [p[0] for p in pairs],
                    [max(p[1], ERROR_FLOOR) for p in pairs],
                    "-",
                    color=colours[label],
                    lw=1.0,
                    label=label,
                )
        ref = section["reference"]["trace"]
        pairs = [(s, 1.0 - c) for s, c in zip(ref["ln_n_over_L"], ref["alignment_cos"]) if s > 0 and c == c]
        if pairs:
            ax_cos.plot(
                [p[0] for p in pairs],
                [max(p[1], ERROR_FLOOR) for p in pairs],
                "-",
                color="black",
                lw=2.5,
                alpha=0.5,
                label=f"reference {section['reference']['label']}",
                zorder=0,
            )
        title = f"{case} (P = {section['parameters']}, n = {section['n']})"
        ax_evals.set(
            xscale="log",
            yscale="log",
            xlabel="gradient evaluations",
            ylabel=r"direction error $\|\tilde W - \tilde W_{ref}\|$",
            title=title,
        )
        ax_wall.set(
            xscale="log",
            yscale="log",
            xlabel="wall seconds",
            ylabel="direction error",
            title=f"{case}: against wall time",
        )
        ax_cos.set(
            xscale="log",
            yscale="log",
            xlabel=r"$\ln(n/L)$",
            ylabel=r"$1 - \cos\theta$ (alignment reported)",
            title=f"{case}: alignment each dynamics reports",
        )
        for ax in axes[row]:
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor log labels overlap
        # Colours are named in the third panel's legend; the first two name the markers.
        handles = [
            Line2D([], [], color="gray", marker=m, ls="", label=f"ln(n/L) = {t}")
            for t, m in MARKERS.items()
            if t in section["reference"]["targets"]
        ]
        ax_wall.legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.6)
        ax_cos.legend(fontsize=7, loc="lower left", framealpha=0.6)
    machine = results.get("machine", {})
    load = machine.get("load_average_start") or [float("nan")]
    fig.suptitle(
        f"diralign bench{' --quick' if results.get('quick') else ''}: work-precision against a tight flow "
        f"({machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, 1-minute load average {load[0]:.1f} at start)",
        fontsize=11,
    )
    fig.tight_layout()
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix in (".png", ".pdf"):
        path = stem.with_suffix(suffix)
        fig.savefig(path, dpi=130)
        paths.append(path)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m diralign.bench.figures RESULTS.json OUT_STEM", file=sys.stderr)
        return 2
    results = json.loads(Path(argv[0]).read_text())
    for path in plot_results(results, Path(argv[1])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
