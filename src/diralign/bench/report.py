"""Markdown tables from a results JSON file (for benchmarks/RESULTS.md).

python -m diralign.bench.report benchmarks/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _num(value, digits: int = 3) -> str:
    if value is None:
        return "--"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def _cos(value) -> str:
    return "--" if value is None else f"{value:.6f}"


def reach_table(case: str, section: dict) -> str:
    targets = [f"{t:g}" for t in section["targets"]]
    head = "| dynamics | " + " | ".join(f"ln(n/L) = {t}: evals / s" for t in targets) + " | furthest ln(n/L) (stop) |"
    lines = [
        f"**{case}** (P = {section['parameters']}, n = {section['n']}, cap {section['time_cap_seconds']:g} s each)",
        "",
        head,
        "|" + "---|" * (len(targets) + 2),
    ]
    for label, record in section["dynamics"].items():
        cells = []
        for t in targets:
            at = record["targets"][t]
            cells.append(f"{_num(at['grad_evals'])} / {_num(at['wall_seconds'])}" if at["reached"] else "not reached")
        furthest = record["furthest"]
        reason = furthest["stop_reason"].split(" (")[0].split(":")[0]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_num(furthest['ln_n_over_L'], 4)} ({reason}) |")
    baseline = section["dynamics"].get("constant-gd")
    if baseline and baseline.get("extrapolated", {}).get("fit"):
        est = baseline["extrapolated"]["log10_grad_evals"]
        limit = baseline.get("float64_limit", {})
        lines += [
            "",
            f"constant-gd (eta = {baseline['eta_tuning']['eta']:.3g}, the best of a grid): extrapolated "
            + ", ".join(f"ln(n/L) = {t}: 10^{_num(v)} evals" for t, v in est.items() if v is not None)
            + f"; float64 rounds its updates away at ln(n/L) ~ {_num(limit.get('rounded_away_at_ln_n_over_L'), 4)}"
            + f" and exp(log L) underflows at {_num(limit.get('risk_underflows_at_ln_n_over_L'), 4)}.",
        ]
    return "\n".join(lines)


def precision_table(case: str, section: dict) -> str:
    targets = list(section["reference"]["targets"])
    head = "| dynamics | " + " | ".join(f"ln(n/L) = {t}: error / cos (ref cos)" for t in targets) + " |"
    ref = section["reference"]
    lines = [f"**{case}**: reference {ref['label']}", "", head, "|" + "---|" * (len(targets) + 1)]
    for label, record in section["dynamics"].items():
        cells = []
        for t in targets:
            at = record["targets"].get(t)
            if not at or not at["reached"]:
                cells.append("not reached")
            else:
                cells.append(
                    f"{_num(at['direction_error'])} / {_cos(at['alignment_cos'])} ({_cos(at['reference_alignment_cos'])})"
                )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    check = section.get("reference_check")
    if check:
        diffs = ", ".join(f"ln(n/L) = {t}: {_num(v)}" for t, v in check["direction_difference"].items())
        lines += ["", f"reference check: {check['label']} differs from the reference by {diffs or 'nothing reached'}."]
    return "\n".join(lines)


def overhead_table(overheads: dict) -> str:
    lines = [
        "| problem | steps (rows logged) | bare s/step | oracle | + probes | + log, margins | + directions (= ratio) | ratio, CPU time | with experiment callbacks | same steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, o in overheads.items():
        if "error" in o:
            lines.append(f"| {case} | {o['error']} ||||||||")
            continue
        r = o["stage_ratios"]
        lines.append(
            f"| {case} ({o['dynamics']}, P = {o['parameters']:,}, {o['dtype']}) | {o['steps']} ({o['logged_rows']}) | "
            f"{_num(o['seconds_per_step_bare'])} | {r['oracle']:.3f} | {r['probes']:.3f} | {r['logged']:.3f} | **{o['ratio']:.3f}** | "
            f"{_num(o['ratio_cpu_time'])} | {_num(o.get('ratio_with_experiment_callbacks'))} | {o['same_steps']} |"
        )
    return "\n".join(lines)


def acceptance_lines(acc: dict) -> str:
    lines = []
    reach = acc.get("deep_linear_reach")
    if reach and reach["met"] is None:
        lines.append(f"- deep linear reach: not measured ({reach['note']})")
    elif reach:
        lines.append(
            f"- deep linear: best dynamics to ln(n/L) = 1000 with direction error <= 1e-6: "
            f"{reach['best_dynamics']} ({_num(reach['best_grad_evals_to_1000'])} evals, error {_num(reach['best_direction_error_at_1000'])}); "
            f"constant-step GD to ln(n/L) = 30: 10^{_num(reach['constant_gd_log10_grad_evals_to_30'])} evals ({reach['constant_gd_to_30_is']}); "
            f"ratio 10^{_num(reach['log10_ratio'])} -> {'MET' if reach['met'] else 'MISSED'}"
        )
    overhead = acc.get("fig1_instrument_overhead")
    if overhead:
        lines.append(
            f"- Fig. 1 instrument overhead {_num(overhead['ratio'])} (target <= 1.10) -> {'MET' if overhead['met'] else 'MISSED'}"
        )
    return "\n".join(lines)


def render(results: dict) -> str:
    parts = ["### Reach", ""]
    for case, section in results["problems"].items():
        parts += [reach_table(case, section), ""]
    parts += ["### Work-precision (direction error at matched ln(n/L); alignment reported vs the reference's)", ""]
    for case, section in results["problems"].items():
        parts += [precision_table(case, section), ""]
    if results.get("instrument_cost"):
        parts += [
            "### Instrument cost (wall time, instrumented / bare)",
            "",
            overhead_table(results["instrument_cost"]),
            "",
        ]
    parts += ["### Acceptance", "", acceptance_lines(results.get("acceptance", {})), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m diralign.bench.report RESULTS.json", file=sys.stderr)
        return 2
    print(render(json.loads(Path(argv[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
