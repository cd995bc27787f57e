"""Start, resume and summarise runs: config -> setup -> dynamics -> trainer -> run directory.

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
from .dynamics import describe_dynamics, make_dynamics
from .errors import UserError
from .experiments import Experiment, get_experiment
from .models.homogeneity import homogeneity_degree
from .models.structure import nonsmooth_operations
from .rundir import Run, RunWriter, schema
from .runtime import RuntimeOptions, apply_runtime_settings, resolve_dtype_device
from .trainer import Coordinator, GoalOptions, LoggingOptions, Trainer, TrainState, initial_state


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


def versions() -> dict:
    import platform
    import sys

    import numpy
    import scipy

    out = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
    }
    try:
        from importlib.metadata import version

        out["diralign"] = version("diralign")
    except Exception:  # pragma: no cover - running from a source tree
        out["diralign"] = "unknown"
    return out


def _experiment(spec) -> Experiment:
    """A registry name, or an Experiment instance (the Python API's in-memory runs)."""
    return spec if isinstance(spec, Experiment) else get_experiment(spec)


def build(experiment, config, coordinator: Coordinator):
    runtime = RuntimeOptions.from_config(config)
    dtype, device = resolve_dtype_device(runtime)
    apply_runtime_settings(runtime)
    setup = experiment.setup(config, dtype, device)
    problem = setup.problem
    if runtime.threads == 0 and problem.device.type == "cpu" and problem.dim * problem.X.shape[0] < 2_000_000:
        # Tiny problems (deep linear, small nets): one gradient costs tens of
        # microseconds, less than waking a second BLAS/OpenMP thread; and on a shared
        # machine spinning threads make every evaluation wait on the slowest core.
        torch.set_num_threads(1)
    return coordinator.prepare(setup, config)


def start_run(experiment, config, out, force: bool = False, quiet: bool = False, coordinator: Optional[Coordinator] = None):
    """Run ``experiment`` (a name or an instance) with ``config`` into ``out``.

    ``config``: the experiment's config object, or a list of ``key=value`` overrides of its
    defaults (parsed and validated here, once)."""
    experiment = _experiment(experiment)
    if isinstance(config, (list, tuple)):
        config = apply_overrides(experiment.default_config(), list(config))
    coordinator = coordinator or Coordinator()
    if coordinator.is_writer:
        RunWriter.check_target(out, force=force)
    # Build everything before touching the disk: a bad setting must not leave a half-made
    # run directory, nor delete the run that --force would replace.
    setup = build(experiment, config, coordinator)
    _check_tensorboard(config)
    meta = {
        schema.META_EXPERIMENT: experiment.name,
        schema.META_CONFIG: config_to_dict(config),
        schema.META_SEED: config.seed,
        schema.META_DATA: setup.info,
        schema.META_PARAMETERS: setup.problem.dim,
        schema.META_VERSIONS: versions(),
        schema.META_CREATED: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    state = initial_state(setup.problem, setup.w0)
    setup.extras["initial_evaluation"] = state.ev
    report = assumption_report(setup, config)
    store = None
    if coordinator.is_writer:
        store = RunWriter.create(out, force=force, experiment=experiment.name)
        store.write_json(schema.CONFIG, meta)
        store.write_json(schema.ASSUMPTIONS, report)
        if not quiet:
            print(format_assumptions(report), flush=True)
    return _run(experiment, setup, config, store, state, quiet, coordinator)


def resume_run(path, quiet: bool = False, coordinator: Optional[Coordinator] = None, experiment=None):
    path = Path(path)
    coordinator = coordinator or Coordinator()
    run = Run(path)
    if experiment is not None and experiment.name != run.experiment:
        raise UserError(f"{path} is a {run.experiment!r} run, not {experiment.name!r}")
    experiment = experiment if experiment is not None else get_experiment(run.experiment)
    store = RunWriter.open_existing(path, experiment.name)
    payload = store.load_checkpoint()
    if not isinstance(payload.get("state"), dict) or "w" not in payload["state"]:
        raise UserError(f"{path / schema.CHECKPOINT} holds no training state; restore the run's own checkpoint")
    config = config_from_dict(experiment.Config, run.config)
    _check_tensorboard(config)
    setup = build(experiment, config, coordinator)
    problem = setup.problem
    if payload["state"]["w"].numel() != problem.dim:
        raise UserError(f"{path / schema.CHECKPOINT} holds {payload['state']['w'].numel()} parameters but this run's model "
                        f"has {problem.dim}; it belongs to another run")
    state = TrainState.from_payload(payload["state"], problem.device, problem.dtype)
    coordinator.adopt(state)
    if not coordinator.is_writer:
        store = None
    return _run(experiment, setup, config, store, state, quiet, coordinator, payload=payload)


def _check_tensorboard(config) -> None:
    if LoggingOptions.from_config(config).tensorboard:
        from .tensorboard import summary_writer_class

        summary_writer_class()  # a missing package is one line, before the disk is touched


def _run(experiment, setup, config, store, state, quiet, coordinator, payload=None):
    problem = setup.problem
    dynamics = make_dynamics(problem, config)
    trainer = Trainer(problem, dynamics, GoalOptions.from_config(config), LoggingOptions.from_config(config), store=store,
                      callbacks=experiment.callbacks(setup, config), coordinator=coordinator)
    if store is not None:
        direction_dtype = "<f8" if problem.dtype == torch.float64 else "<f4"
        store.open_logs(trainer.columns, problem.n, problem.dim if trainer.store_directions else 0, direction_dtype,
                        positions=None if payload is None else payload["positions"])
    if payload is not None:
        dynamics.load_state_dict(payload["dynamics"])
    live_tb = None
    if store is not None and trainer.logging.tensorboard:
        from .tensorboard import LiveWriter

        # After open_logs cut the logs back to the checkpoint: the stream is rebuilt from
        # the rows it kept, so no step is written twice.
        live_tb = LiveWriter.open(store.path, problem.degree, resumed=payload is not None)
        trainer.callbacks.append(live_tb)
    progress = Progress(trainer.target, quiet or store is None, start=math.log(problem.n) - state.ev.log_risk)
    try:
        state = trainer.train(state, progress)
    finally:
        progress.close()
        for cb in trainer.callbacks:
            cb.close()
        if store is not None:
            store.close()
    summary = summarize(experiment, setup, state, config, dynamics)
    summary.update(experiment.finish(setup, state, store, config))
    if store is not None:
        finish_store(store, setup, state, summary)
    if live_tb is not None:
        live_tb.finish(summary)
    return summary, state, setup


def summarize(experiment, setup, state, config, dynamics) -> dict:
    problem = setup.problem
    row = probes.panel(problem, state.w, state.ev, problem.degree)
    homogeneous = problem.degree is not None
    summary = {key: row.get(key) for key in (
        schema.LN_N_OVER_L, schema.LOG_RISK, schema.SMOOTHED_MARGIN, schema.ALIGNMENT_COS, schema.PARAM_NORM,
        schema.TRAIN_ACCURACY)}
    summary.update({
        schema.MIN_NORMALIZED_MARGIN: row[schema.MIN_NORMALIZED_MARGIN] if homogeneous else None,
        schema.NORMALIZED_SMOOTHED_MARGIN: row[schema.NORMALIZED_SMOOTHED_MARGIN] if homogeneous else None,
        schema.BETA: row.get(schema.BETA) if homogeneous else None,
        schema.PATH_LENGTH: state.path_length,
        "homogeneity_degree": problem.degree,
        "steps": state.steps,
        schema.GRAD_EVALS: state.grad_evals,
        schema.REJECTED_STEPS: state.rejected_steps,
        schema.WALL_SECONDS: state.wall_seconds,
        "dynamics": describe_dynamics(config),
        "faithful_to_flow": bool(dynamics.faithful_to_flow),
        "stop_reason": state.stop_reason,
        "first_separable_step": state.first_separable_step,
        "first_separable_ln_n_over_L": state.first_separable_ln,
        "assumption_2_3_step": state.below_loss_at_zero_step,
    })
    for milestone in schema.ALIGNMENT_MILESTONES:
        summary[schema.milestone_key(milestone)] = state.milestones.get(f"{milestone:g}")
    schema.check_summary(experiment.name, summary)
    return summary


def finish_store(store: RunWriter, setup, state, summary: dict) -> None:
    problem = setup.problem
    norm = float(state.w.norm())
    final = probes.normalized_margins(state.ev.margins, norm, problem.degree)
    store.write_npy(schema.FINAL_MARGINS, final.detach().cpu().double().numpy())
    directions = Run(store.path).directions
    if directions is not None and len(directions):
        final_dir = (state.w / norm).detach().cpu().double().numpy()
        chords = np.linalg.norm(np.asarray(directions, dtype=np.float64) - final_dir, axis=1)
        store.write_npy(schema.ANGLE_TO_FINAL, 2.0 * np.arcsin(np.clip(chords / 2.0, 0.0, 1.0)))
    store.write_summary(summary)
