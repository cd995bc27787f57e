"""Start, resume and summarise runs: config -> setup -> dynamics -> store.

    diralign run deep-linear --out runs/dl      # CLI front end of start_run
    diralign resume runs/dl                     # resume_run
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import losses, probes
from .config import apply_overrides, config_from_dict, config_to_dict
from .dynamics import make_dynamics
from .errors import UserError
from .experiments import Experiment, get_experiment
from .models.homogeneity import homogeneity_degree
from .models.structure import nonsmooth_operations
from .store import RunDir, finite_or_none, read_array_log, versions
from .trainer import TrainContext, TrainState, initial_state, prepare_context, train_loop

DTYPES = {"float64": torch.float64, "float32": torch.float32}

SUMMARY_KEYS = (
    "ln_n_over_L",
    "log_risk",
    "smoothed_margin",
    "min_normalized_margin",
    "alignment_cos",
    "path_length",
    "param_norm",
    "homogeneity_degree",
    "train_accuracy",
    "steps",
    "grad_evals",
    "rejected_steps",
    "wall_seconds",
)


def resolve_dtype_device(config):
    if config.dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise UserError(f"unknown device {config.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda requested but no CUDA device is available; use --set device=cpu")
    return DTYPES[config.dtype], device


def apply_runtime_settings(config) -> None:
    from .allocator import keep_freed_memory

    if int(config.threads) > 0:
        torch.set_num_threads(int(config.threads))
    torch.manual_seed(int(config.seed))
    keep_freed_memory()  # big activations are reused, not page-faulted back every step


def assumption_report(setup, config) -> dict:
    """Which of the paper's assumptions hold for this model, measured, never enforced."""
    problem = setup.problem
    model = problem.model
    problem.load_into_model(setup.w0)
    probe_x = problem.X[: min(64, problem.X.shape[0])]
    report = homogeneity_degree(model, probe_x)
    has_bias = any(name.endswith("bias") for name, p in model.named_parameters() if p.requires_grad)
    batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    skip = any(type(m).__name__ in ("BasicBlock", "Bottleneck", "_DenseBlock", "_DenseLayer") for m in model.modules())
    ev = setup.extras.get("initial_evaluation")
    return {
        "homogeneity": report.as_dict(),
        "homogeneity_verdict": report.verdict(),
        "declared_degree": problem.degree,
        "has_bias": has_bias,
        "has_batch_norm": batch_norm,
        "has_skip_connections": skip,
        "nonsmooth_operations": nonsmooth_operations(model),
        "initial_log_risk": None if ev is None else ev.log_risk,
        "log_loss_at_zero": losses.log_loss_at_zero(problem.loss),
        "initially_below_loss_at_zero": None if ev is None else bool(ev.log_risk < losses.log_loss_at_zero(problem.loss)),
    }


def format_assumptions(report: dict) -> str:
    lines = [f"model: {report['homogeneity_verdict']}"]
    extras = [name for key, name in (("has_bias", "biases"), ("has_batch_norm", "batch norm"), ("has_skip_connections", "skip connections")) if report[key]]
    if extras:
        lines.append("  outside Assumption 2.1 (homogeneous, definable): has " + ", ".join(extras))
    homogeneity = report["homogeneity"]
    if homogeneity.get("declared") is not None and homogeneity["declared"] != homogeneity.get("degree"):
        lines.append(f"  the model declares degree {homogeneity['declared']}; the measured value above is used")
    if not homogeneity.get("homogeneous"):
        lines.append("  margins are normalised by the median nonnegative margin (the paper's choice for DenseNet/ResNet)")
    kinks = report.get("nonsmooth_operations") or []
    if kinks:
        lines.append(
            f"  non-smooth ({', '.join(kinks)}): Theorem 4.1's alignment wants locally Lipschitz gradients; "
            "Theorem 3.1 (directional convergence) does not"
        )
    if report["initially_below_loss_at_zero"] is not None:
        state = "holds" if report["initially_below_loss_at_zero"] else "does not hold yet (the summary records when it first does)"
        lines.append(f"  Assumption 2.3 (L(W0) < l(0)) at start: {state}")
    if extras or not homogeneity.get("homogeneous") or report["initially_below_loss_at_zero"] is False:
        lines.append("  training anyway: where an assumption fails, the numbers are measurements, not the theorems' guarantees")
    return "\n".join(lines)


class Progress:
    """tqdm bar over ln(n/L): shows the paper's axis, gamma and alignment, with an ETA."""

    def __init__(self, target: float, quiet: bool, start: float = 0.0):
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=round(target, 3), unit="ln", bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} ln(n/L) [{elapsed}<{remaining}{postfix}]")
            self.bar.n = round(max(start, 0.0), 3)

    def __call__(self, state, row) -> None:
        if self.bar is None:
            return
        self.bar.n = round(min(max(row["ln_n_over_L"], 0.0), self.bar.total), 3)
        self.bar.set_postfix_str(
            f"gamma={row['min_normalized_margin']:.4g} cos={row.get('alignment_cos', float('nan')):.6f}", refresh=False
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _experiment(spec) -> Experiment:
    """A registry name, or an Experiment instance (the Python API's in-memory runs)."""
    return spec if isinstance(spec, Experiment) else get_experiment(spec)


def build(experiment_name, config):
    experiment = _experiment(experiment_name)
    dtype, device = resolve_dtype_device(config)
    apply_runtime_settings(config)
    setup = experiment.setup(config, dtype, device)
    problem = setup.problem
    if int(config.threads) == 0 and problem.device.type == "cpu" and problem.dim * problem.X.shape[0] < 2_000_000:
        # Tiny problems (deep linear, small nets): one gradient costs tens of
        # microseconds, less than waking a second BLAS/OpenMP thread; and on a shared
        # machine spinning threads make every evaluation wait on the slowest core.
        torch.set_num_threads(1)
    return experiment, setup


def start_run(experiment_name, overrides: list[str], out, force: bool = False, quiet: bool = False, distributed=None):
    experiment = _experiment(experiment_name)
    experiment_name = experiment.name
    config = apply_overrides(experiment.default_config(), overrides)
    is_writer = distributed is None or distributed.rank == 0
    if is_writer:
        RunDir.check_target(out, force=force)
    # Build and validate everything before touching the disk: a bad setting must not
    # leave a half-made run directory, nor delete the run that --force would replace.
    experiment, setup = build(experiment, config)
    make_dynamics(setup.problem, config)
    _check_tensorboard(config)
    store = RunDir.create(out, force=force) if is_writer else None
    if distributed is not None:
        distributed.attach(setup, config)
    state = initial_state(setup.problem, setup.w0)
    setup.extras["initial_evaluation"] = state.ev
    report = assumption_report(setup, config)
    if store is not None:
        store.write_json(
            "config.json",
            {
                "experiment": experiment_name,
                "config": config_to_dict(config),
                "seed": config.seed,
                "data": setup.info,
                "parameters": setup.problem.dim,
                "versions": versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        store.write_json("assumptions.json", finite_or_none_dict(report))
    if not quiet and is_writer:
        print(format_assumptions(report), flush=True)
    return _run(experiment, setup, config, store, state, quiet, experiment_name, distributed)


def resume_run(path, quiet: bool = False, distributed=None, experiment=None):
    path = Path(path)
    is_writer = distributed is None or distributed.rank == 0
    store = RunDir.open_existing(path)
    meta = store.read_json("config.json")
    payload = store.load_checkpoint()
    if experiment is not None and experiment.name != meta["experiment"]:
        raise UserError(f"{path} is a {meta['experiment']!r} run, not {experiment.name!r}")
    experiment = experiment if experiment is not None else get_experiment(meta["experiment"])
    config = config_from_dict(experiment.Config, meta["config"])
    _check_tensorboard(config)
    experiment, setup = build(experiment, config)
    if distributed is not None:
        distributed.attach(setup, config)
    problem = setup.problem
    if payload["state"]["w"].numel() != problem.dim:
        raise UserError(f"{path}/checkpoint.pt holds {payload['state']['w'].numel()} parameters but this run's model has {problem.dim}; it belongs to another run")
    state = TrainState.from_payload(payload["state"], problem.device, problem.dtype)
    if distributed is not None:
        distributed.adopt_state(state)
    if not is_writer:
        store = None
    return _run(experiment, setup, config, store, state, quiet, meta["experiment"], distributed, payload=payload)


def _check_tensorboard(config) -> None:
    if getattr(config, "tensorboard", False):
        from .tensorboard import summary_writer_class

        summary_writer_class()  # a missing package is one line, before the disk is touched


def finite_or_none_dict(d: dict) -> dict:
    return {k: (finite_or_none_dict(v) if isinstance(v, dict) else finite_or_none(v)) for k, v in d.items()}


def _run(experiment, setup, config, store, state, quiet, experiment_name, distributed, payload=None):
    problem = setup.problem
    dynamics = make_dynamics(problem, config)
    ctx = TrainContext(
        problem=problem,
        dynamics=dynamics,
        config=config,
        store=store,
        callbacks=experiment.callbacks(setup, config),
        quiet=quiet,
        is_writer=store is not None,
        distributed=distributed,
    )
    prepare_context(ctx)
    if store is not None:
        store.open_logs(ctx.columns, problem.n, problem.dim if ctx.store_directions else 0, "<f8" if problem.dtype == torch.float64 else "<f4")
        if payload is not None:
            store.truncate_to(payload["positions"])
    if payload is not None:
        dynamics.load_state_dict(payload["dynamics"])
    live_tb = None
    if store is not None and getattr(config, "tensorboard", False):
        from .tensorboard import LiveWriter

        # after truncate_to: the stream is rebuilt from the rows the checkpoint kept
        live_tb = LiveWriter.open(store.path, problem.degree, resumed=payload is not None)
        ctx.callbacks.append(live_tb)
    progress = Progress(ctx.target, quiet or store is None, start=math.log(problem.n) - state.ev.log_risk)
    try:
        try:
            state = train_loop(ctx, state, progress)
        finally:
            progress.close()
        summary = summarize(setup, state, config, dynamics)
        summary.update(experiment.finish(setup, state, store, config))
        if store is not None:
            finish_store(store, setup, state, summary)
            store.close()
        if live_tb is not None:
            live_tb.finish(summary)
    finally:
        if live_tb is not None:
            live_tb.close()
    return summary, state, setup


def summarize(setup, state, config, dynamics) -> dict:
    problem = setup.problem
    row = probes.panel(problem, state.w, state.ev, problem.degree)
    summary = {
        "ln_n_over_L": row["ln_n_over_L"],
        "log_risk": row["log_risk"],
        "smoothed_margin": row["smoothed_margin"],
        "min_normalized_margin": row["min_normalized_margin"] if problem.degree else None,
        "alignment_cos": row.get("alignment_cos"),
        "path_length": state.path_length,
        "param_norm": row["param_norm"],
        "homogeneity_degree": problem.degree,
        "train_accuracy": row["train_accuracy"],
        "steps": state.steps,
        "grad_evals": state.grad_evals,
        "rejected_steps": state.rejected_steps,
        "wall_seconds": state.wall_seconds,
        "normalized_smoothed_margin": row["normalized_smoothed_margin"] if problem.degree else None,
        "beta": row.get("beta") if problem.degree else None,
        "dynamics": config.dynamics + (f"/{config.integrator}" if config.dynamics == "flow" else ""),
        "faithful_to_flow": bool(dynamics.faithful_to_flow),
        "stop_reason": state.stop_reason,
        "first_separable_step": state.first_separable_step,
        "first_separable_ln_n_over_L": state.first_separable_ln,
        "assumption_2_3_step": state.below_loss_at_zero_step,
    }
    return summary


def finish_store(store: RunDir, setup, state, summary: dict) -> None:
    problem = setup.problem
    norm = float(state.w.norm())
    final = probes.normalized_margins(state.ev.margins, norm, problem.degree)
    np.save(store.path / "final_margins.npy", final.detach().cpu().double().numpy())
    directions = read_array_log(store.path, "directions")
    if directions is not None and len(directions):
        final_dir = (state.w / norm).detach().cpu().double().numpy()
        chords = np.linalg.norm(np.asarray(directions, dtype=np.float64) - final_dir, axis=1)
        angles = 2.0 * np.arcsin(np.clip(chords / 2.0, 0.0, 1.0))
        np.save(store.path / "angle_to_final.npy", angles)
    store.write_json("summary.json", {k: finite_or_none(v) for k, v in summary.items()})
