"""``diralign verify``: the paper's theorems checked against independent references.

    diralign verify --quick --json verify.json       # a few minutes on 2 cores
    diralign verify --keep runs/verify               # longer runs, keep their directories

Runs small seeded experiments (:mod:`diralign.verify_cases`) with the gradient flow and
prints a verdict table, one row per claim: the claim and where the paper makes it, the
experiment, the quantity, the predicted value, the measured value, the tolerance and
PASS / FAIL.  Two more verdicts: INFO (a theorem that does not apply, reported so the
reader sees what happens outside it) and N/A (a case this build cannot run).  Rows are
explained in :mod:`diralign.verify_checks` (tolerances) and under the table (notes).
The exit status is 1 when any row FAILs, else 0.
"""

from __future__ import annotations

import json
import os
import tempfile
import textwrap
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError
from .verify_checks import FAIL, MISSING, PASS, Row

# The flow, error-controlled.  rtol 1e-9: alignment is read off grad L at the integrated W, and
# the late flow is stiff, so an error in W shows up amplified in the gradient's angle; at
# rtol 1e-7 S-ReLU's measured tan^2 rose from 4.4e-4 (s = 3e4) to 6.7e-4 (s = 1e5), at 1e-9 it
# kept falling (3.1e-4), for 10% more gradients with CVODE.
FLOW = ["dynamics=flow", "threads=1", "rtol=1e-9", "atol=1e-13"]  # + integrator=... (run_verify's choice)
# ReLU kinks of the twin: the sliding (Filippov) flow, whose right-hand side is exact on the
# switching surfaces where CVODE and dopri5 chatter (diralign.dynamics.kinked).
SLIDING = ["dynamics=flow", "integrator=sliding", "threads=1", "rtol=1e-6", "atol=1e-13"]
# H-AlexNet: in the full profile the sliding flow, from gd's point at ln(n/L) = 2 (the early
# transient, where nearly every kink moves) to 100 on 16 digits at 16x16: ~3,000 gradients per
# unit of s at s = 10 and ~1,000 at 60-100 (benchmarks/kinked_rate.py), so the decade test's
# two windows ([2, 20] and [10, 100]) cost ~1.5e5 gradients, about half an hour on one core.
# The quick profile cannot afford that and runs the paper's normalised GD; its rows are INFO
# there (measured on gd, not on the flow).
GD = ["dynamics=gd", "threads=1", "max_update_ratio=0.01"]


@dataclass(frozen=True)
class Profile:
    """How far each case runs.  ``quick`` keeps the whole table within ~3 minutes on 2 cores."""

    name: str
    cases: dict = field(default_factory=dict)  # case -> run overrides (or sigma_end for the counterexample)


QUICK = Profile(
    "quick",
    {
        "deep-linear": FLOW + ["n=30", "layer_scales=1.5,1,0.5", "target_ln_n_over_L=10000"],
        "srelu": FLOW
        + ["n=20", "width=20", "target_ln_n_over_L=10000", "lp_grid_points=1000", "lp_certificate_step=0.02"],
        "relu": SLIDING + ["n=20", "width=20", "target_ln_n_over_L=100"],
        "fig1": FLOW
        + [
            "n=20",
            "width=40",
            "target_ln_n_over_L=10000",
            "ntk_target_ln_n_over_L=20",
            "surface_resolution=5",
            "contour_resolution=11",
        ],
        "h-alexnet": GD
        + ["model=h-alexnet", "subset=30", "dtype=float64", "target_ln_n_over_L=100", "loss=cross-entropy"],
        "counterexample": 1e6,
    },
)
FULL = Profile(
    "full",
    {
        "deep-linear": FLOW + ["n=60", "layer_scales=1.5,1,0.5", "target_ln_n_over_L=100000"],
        "srelu": FLOW + ["n=40", "width=40", "target_ln_n_over_L=100000"],
        "relu": SLIDING + ["n=40", "width=40", "target_ln_n_over_L=300"],
        "fig1": FLOW
        + [
            "n=100",
            "width=1000",
            "target_ln_n_over_L=10000",
            "ntk_target_ln_n_over_L=100",
            "surface_resolution=9",
            "contour_resolution=21",
        ],
        "h-alexnet": SLIDING
        + ["flow_from_ln=2", "model=h-alexnet", "subset=16", "dtype=float64", "target_ln_n_over_L=100", "loss=cross-entropy"],
        "counterexample": 1e8,
    },
)
# Longest first, so two workers finish together.
ORDER = ("h-alexnet", "srelu", "fig1", "deep-linear", "relu", "counterexample")


def default_integrator() -> str:
    """CVODE (stiff-aware BDF, a required dependency): the late-phase flow is stiff, and it
    reaches ln(n/L) = 1e4 in a few thousand gradients where dopri5 needs ~100 per unit of s."""
    return "cvode"


def _run_case(name: str, setting, workdir: str, integrator: str) -> list[dict]:
    """One case in a worker process (one torch thread each: the cases run side by side)."""
    import torch

    from .verify_cases import CASES

    torch.set_num_threads(1)
    if (
        isinstance(setting, list)
        and "dynamics=flow" in setting
        and not any(x.startswith("integrator=") for x in setting)
    ):
        setting = setting + [f"integrator={integrator}"]
    start = time.perf_counter()
    try:
        rows = CASES[name](setting, Path(workdir))
    except Exception as exc:  # a case that crashes is a finding, not a traceback
        rows = [Row("case ran to completion", "-", name, "-", "-", None, "-", FAIL, f"{type(exc).__name__}: {exc}")]
    seconds = time.perf_counter() - start
    out = []
    for row in rows:
        d = row.as_dict()
        d["case_seconds"] = seconds
        d["case_key"] = name
        out.append(d)
    return out


def run_verify(
    profile: Profile,
    workdir: Path,
    jobs: int = 2,
    cases: Optional[list[str]] = None,
    progress=None,
    integrator: Optional[str] = None,
) -> list[dict]:
    names = [c for c in ORDER if cases is None or c in cases]
    integrator = integrator or default_integrator()
    results: dict[str, list[dict]] = {}
    if jobs <= 1:
        for name in names:
            results[name] = _run_case(name, profile.cases[name], str(workdir), integrator)
            if progress:
                progress(name, results[name])
    else:
        import multiprocessing

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                name: pool.submit(_run_case, name, profile.cases[name], str(workdir), integrator) for name in names
            }
            for name in names:
                results[name] = futures[name].result()
                if progress:
                    progress(name, results[name])
    # Table order: the paper's order of claims, then by case.
    rows = [row for name in names for row in results[name]]
    return sorted(rows, key=lambda r: (_source_rank(r["source"]), names.index(r["case_key"])))


SOURCE_ORDER = ("Thm 3.1", "Cor 3.2", "Thm 4.1", "Lemma E.1", "Prop 4.4", "Prop 4.6", "Lyu & Li", "Lemma C.5", "DESIGN")


def _source_rank(source: str) -> int:
    for i, prefix in enumerate(SOURCE_ORDER):
        if source.startswith(prefix):
            return i
    return len(SOURCE_ORDER)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or (1e-3 <= abs(value) < 1e4):
            return f"{value:.4g}"
        return f"{value:.2e}"
    return str(value)


def format_table(rows: list[dict], width: int = 160) -> str:
    """The verdict table, then numbered notes (for every row)."""
    headers = ("#", "source: claim", "case", "quantity", "predicted", "measured", "tolerance", "verdict")
    cells = [
        (
            str(i + 1),
            f"{r['source']}: {r['claim']}",
            r["case"],
            r["quantity"],
            r["predicted"],
            _fmt(r["measured"]),
            r["tolerance"],
            r["status"],
        )
        for i, r in enumerate(rows)
    ]
    limits = (3, 50, 22, 30, 26, 9, 34, 7)
    lines = []

    def clip(text, n):
        return text if len(text) <= n else text[: n - 1] + "~"

    widths = [min(limit, max(len(h), *(len(c[i]) for c in cells))) for i, (h, limit) in enumerate(zip(headers, limits))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(clip(x, w).ljust(w) for x, w in zip(c, widths)))
    lines.append("")
    lines.append("notes:")
    for i, r in enumerate(rows):
        text = f"{r['source']}: {r['claim']} [{r['case']}]: predicted {r['predicted']}; tolerance {r['tolerance']}. {r['note']}"
        lines.append(
            textwrap.fill(text, width=min(width, 110), initial_indent=f"{i + 1:>3}. ", subsequent_indent="     ")
        )
    counts = {status: sum(r["status"] == status for r in rows) for status in (PASS, FAIL, "INFO", MISSING)}
    lines.append("")
    lines.append(" ".join(f"{k}: {v}" for k, v in counts.items()))
    return "\n".join(lines)


def main(args) -> int:
    """CLI entry: ``diralign verify [--quick] [--json FILE] [--keep DIR] [--jobs N] [--only CASES]``."""
    profile = QUICK if args.quick else FULL
    only = None
    if args.only:
        only = [c.strip() for c in args.only.split(",") if c.strip()]
        unknown = [c for c in only if c not in ORDER]
        if unknown:
            raise UserError(f"unknown case(s) {', '.join(unknown)} for --only; choose from {', '.join(ORDER)}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    from .dynamics import FLOW_INTEGRATORS

    integrator = args.integrator or default_integrator()
    if integrator not in FLOW_INTEGRATORS:
        raise UserError(f"unknown --integrator {integrator!r}; choose one of {', '.join(FLOW_INTEGRATORS)}")
    if args.json:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise UserError(f"--json {args.json}: folder {parent} does not exist; create it first")
    if args.keep:
        workdir = Path(args.keep)
        if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())) and not args.force:
            raise UserError(f"--keep {workdir} is not empty; pass --force to replace its runs or choose another folder")
    start = time.perf_counter()

    def progress(name, rows):
        if not args.quiet:
            seconds = rows[0]["case_seconds"] if rows else 0.0
            print(f"  {name}: {len(rows)} rows in {seconds:.0f} s", flush=True)

    if not args.quiet:
        print(
            f"diralign verify ({profile.name}): running {len(only or ORDER)} cases on {args.jobs} worker(s), flow integrator {integrator}...",
            flush=True,
        )
    if args.keep:
        workdir.mkdir(parents=True, exist_ok=True)
        rows = run_verify(profile, workdir, args.jobs, only, progress, integrator)
    else:
        with tempfile.TemporaryDirectory(prefix="diralign-verify-") as tmp:
            rows = run_verify(profile, Path(tmp), args.jobs, only, progress, integrator)
    seconds = time.perf_counter() - start
    print(format_table(rows))
    print(
        f"{profile.name} profile, flow integrator {integrator}, {seconds:.0f} s wall on {os.cpu_count()} cores ({args.jobs} workers)"
    )
    if args.json:
        payload = {
            "profile": profile.name,
            "integrator": integrator,
            "wall_seconds": seconds,
            "jobs": args.jobs,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1, allow_nan=False))
    return 1 if any(r["status"] == FAIL for r in rows) else 0
