"""Start, resume and summarise runs: config -> setup -> dynamics -> trainer -> run directory.

diralign run deep-linear --out runs/dl      # CLI front end of start_run
diralign resume runs/dl                     # resume_run
"""

from __future__ import annotations

import dataclasses
import json
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
from .rundir import Run, RunWriter, load_checkpoint_file, schema
from .rundir.integrity import config_checksum, new_run_id, tensor_sha256
from .runtime import ProblemOptions, RuntimeOptions, apply_runtime_settings, resolve_dtype_device
from .separability import check_separable
from .trainer import Coordinator, GoalOptions, Interrupted, LoggingOptions, Trainer, TrainState, initial_state


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
        "initially_below_loss_at_zero": None
        if ev is None
        else bool(ev.log_risk < losses.log_loss_at_zero(problem.loss)),
    }


def structural_extras(report: dict) -> list[str]:
    """What the model has that puts it outside Assumption 2.1 (the report's or a probe's keys)."""
    named = (("has_bias", "biases"), ("has_batch_norm", "batch norm"), ("has_skip_connections", "skip connections"))
    return [name for key, name in named if report[key]]


def format_assumptions(report: dict) -> str:
    lines = [f"model: {report['homogeneity_verdict']}"]
    extras = structural_extras(report)
    if extras:
        lines.append("  outside Assumption 2.1 (homogeneous, definable): has " + ", ".join(extras))
    homogeneity = report["homogeneity"]
    if homogeneity.get("declared") is not None and homogeneity["declared"] != homogeneity.get("degree"):
        lines.append(f"  the model declares degree {homogeneity['declared']}; the measured value above is used")
    if not homogeneity.get("homogeneous"):
        lines.append(
            "  margins are normalised by the median nonnegative margin (the paper's choice for DenseNet/ResNet)"
        )
    kinks = report.get("nonsmooth_operations") or []
    if kinks:
        lines.append(
            f"  non-smooth ({', '.join(kinks)}): Theorem 4.1's alignment wants locally Lipschitz gradients; "
            "Theorem 3.1 (directional convergence) does not"
        )
    if report["initially_below_loss_at_zero"] is not None:
        state = (
            "holds"
            if report["initially_below_loss_at_zero"]
            else "does not hold yet (the summary records when it first does)"
        )
        lines.append(f"  Assumption 2.3 (L(W0) < l(0)) at start: {state}")
    if extras or not homogeneity.get("homogeneous") or report["initially_below_loss_at_zero"] is False:
        lines.append(
            "  training anyway: where an assumption fails, the numbers are measurements, not the theorems' guarantees"
        )
    return "\n".join(lines)


class Progress:
    """tqdm bar over ln(n/L): shows the paper's axis, gamma and alignment, with an ETA."""

    def __init__(self, target: float, quiet: bool, start: float = 0.0):
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(
                total=round(target, 3),
                unit="ln",
                bar_format="{l_bar}{bar}| {n:.1f}/{total:.0f} ln(n/L) [{elapsed}<{remaining}{postfix}]",
            )
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


def resolve_pieces(config, coordinator: Coordinator):
    """``pieces = 0`` means one per process of the launch that starts the run; a run's
    config.json records the number, so that its resumes use the same arithmetic."""
    if ProblemOptions.from_config(config).pieces:
        return config
    return dataclasses.replace(config, pieces=coordinator.world_size)


def build(experiment, config, coordinator: Coordinator):
    return build_identified(experiment, config, coordinator)[0]


def build_identified(experiment, config, coordinator: Coordinator):
    """The setup as this process trains it, and the identity of the full problem: sha256 of
    the data and (where the config alone makes them) the initial weights, before sharding."""
    runtime = RuntimeOptions.from_config(config)
    dtype, device = resolve_dtype_device(runtime)
    apply_runtime_settings(runtime)
    setup = experiment.setup(config, dtype, device)
    check_separable(setup.problem)  # all n examples, on every process alike
    problem = setup.problem
    identity = {
        schema.META_DATA_SHA256: tensor_sha256(problem.X, problem.y),
        schema.META_INITIAL_WEIGHTS_SHA256: tensor_sha256(setup.w0)
        if experiment.initial_weights_reproducible(config)
        else None,
    }
    if runtime.threads == 0 and problem.device.type == "cpu" and problem.dim * problem.X.shape[0] < 2_000_000:
        # Tiny problems (deep linear, small nets): one gradient costs tens of
        # microseconds, less than waking a second BLAS/OpenMP thread; and on a shared
        # machine spinning threads make every evaluation wait on the slowest core.
        torch.set_num_threads(1)
    return coordinator.prepare(setup, config), identity


def sealed_meta(experiment, config, meta: dict) -> dict:
    """config.json as it will be written, checksummed, after checking that it reads back as
    this very config: a value JSON cannot hold (inf, 1e400) is refused here, before
    anything on disk is touched, instead of being written as ``null`` or crashing later."""
    try:
        plain = schema.json_safe(meta, strict=True)
    except ValueError as exc:
        where, value = exc.args
        where = where.removeprefix(f"{schema.META_CONFIG}.")
        raise UserError(
            f"--set {where}={value!r} cannot be stored in {schema.CONFIG} (JSON has no inf or NaN); use a finite number"
        ) from None
    again = config_to_dict(config_from_dict(type(config), json.loads(json.dumps(plain))[schema.META_CONFIG]))
    changed = [k for k, v in config_to_dict(config).items() if again.get(k) != v]
    if changed:
        raise UserError(
            f"--set {changed[0]}={config_to_dict(config)[changed[0]]!r} would read back from "
            f"{schema.CONFIG} as {again.get(changed[0])!r}; choose a value JSON can hold"
        )
    plain[schema.META_CHECKSUM] = config_checksum(plain, schema.META_CHECKSUM)
    return plain


def start_run(
    experiment, config, out, force: bool = False, quiet: bool = False, coordinator: Optional[Coordinator] = None
):
    """Run ``experiment`` (a name or an instance) with ``config`` into ``out``.

    ``config``: the experiment's config object, or a list of ``key=value`` overrides of its
    defaults (parsed and validated here, once)."""
    experiment = _experiment(experiment)
    if isinstance(config, (list, tuple)):
        config = apply_overrides(experiment.default_config(), list(config))
    coordinator = coordinator or Coordinator()
    config = resolve_pieces(config, coordinator)
    if coordinator.is_writer:
        RunWriter.check_target(out, force=force)
    # Build everything before touching the disk: a bad setting must not leave a half-made
    # run directory, nor delete the run that --force would replace.
    setup, identity = build_identified(experiment, config, coordinator)
    _check_tensorboard(config)
    meta = {
        schema.META_EXPERIMENT: experiment.name,
        schema.META_CONFIG: config_to_dict(config),
        schema.META_SEED: config.seed,
        schema.META_DATA: setup.info,
        schema.META_PARAMETERS: setup.problem.dim,
        schema.META_VERSIONS: versions(),
        schema.META_CREATED: time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        schema.META_RUN_ID: new_run_id(),
        **identity,
    }
    meta = sealed_meta(experiment, config, meta)
    state = initial_state(setup.problem, setup.w0)
    check_target_above_start(config, setup.problem, state.ev)
    setup.extras["initial_evaluation"] = state.ev
    report = assumption_report(setup, config)
    store = None
    if coordinator.is_writer:
        # Built beside `out` and moved into place by _run once its first checkpoint is written.
        store = RunWriter.create(out, force=force, experiment=experiment.name)
        try:
            store.run_id = meta[schema.META_RUN_ID]
            store.write_json(schema.CONFIG, meta, strict=True)
            store.write_json(schema.ASSUMPTIONS, report)
        except BaseException:
            store.abandon()
            raise
        if not quiet:
            print(format_assumptions(report), flush=True)
    return _run(experiment, setup, config, store, state, quiet, coordinator)


def check_target_above_start(config, problem, ev) -> None:
    """A target at or below the starting ln(n/L) means nothing: the run would "finish"
    after 0 steps.  Refused before the run directory is touched."""
    target = GoalOptions.from_config(config).target_ln_n_over_L
    start = math.log(problem.n) - ev.log_risk
    if target is not None and not target > start:
        raise UserError(
            f"target_ln_n_over_L={target:g} is at or below where this run starts: ln(n/L) = {start:.6g} at the "
            f"initial weights (risk falls from there); set a target above it, e.g. --set target_ln_n_over_L={_above(start):g}"
        )


def _above(start: float) -> float:
    """A round target above ``start``: the next power of ten (at least 10)."""
    return 10.0 ** max(1, math.ceil(math.log10(max(start, 1.0) * 1.01)))


def resume_run(path, quiet: bool = False, coordinator: Optional[Coordinator] = None, experiment=None):
    """Continue the run in ``path`` from its last checkpoint, after checking that every file
    is this run's and whole: run id, checksums, data and initial weights, log lengths."""
    path = Path(path)
    coordinator = coordinator or Coordinator()
    run = Run(path)
    recorded = run.identity()
    if experiment is not None and experiment.name != run.experiment:
        raise UserError(f"{path} is a {run.experiment!r} run, not {experiment.name!r}")
    experiment = experiment if experiment is not None else get_experiment(run.experiment)
    config = resolve_pieces(config_from_dict(experiment.Config, run.config), coordinator)
    _check_tensorboard(config)
    # The one writer: refused while a run or another resume writes this directory.
    store = RunWriter.open_existing(path, experiment.name) if coordinator.is_writer else None
    try:
        payload = load_checkpoint_file(path / schema.CHECKPOINT, run_id=recorded[schema.META_RUN_ID])
        setup, identity = build_identified(experiment, config, coordinator)
        for key, what in ((schema.META_DATA_SHA256, "data"), (schema.META_INITIAL_WEIGHTS_SHA256, "initial weights")):
            if recorded.get(key) is not None and identity[key] is not None and identity[key] != recorded[key]:
                raise UserError(
                    f"the {what} rebuilt from {path / schema.CONFIG} differ from the run's (sha256 {identity[key][:12]}, "
                    f"recorded {str(recorded[key])[:12]}): its data file or library versions changed, or the config "
                    "was edited; restore them, or start a new run with diralign run"
                )
        problem = setup.problem
        w = payload[schema.CKPT_STATE]["w"]
        if w.numel() != setup.w0.numel():
            raise UserError(
                f"{path / schema.CHECKPOINT} holds {w.numel()} parameters but this run's model "
                f"has {setup.w0.numel()}; it belongs to another run"
            )
        state = TrainState.from_payload(payload[schema.CKPT_STATE], problem.device, problem.dtype)
        coordinator.adopt(state)
    except BaseException:
        if store is not None:
            store.abandon()
        raise
    if store is not None:
        store.run_id = recorded[schema.META_RUN_ID]
    return _run(experiment, setup, config, store, state, quiet, coordinator, payload=payload)


def _check_tensorboard(config) -> None:
    if LoggingOptions.from_config(config).tensorboard:
        from .tensorboard import summary_writer_class

        summary_writer_class()  # a missing package is one line, before the disk is touched


def _run(experiment, setup, config, store, state, quiet, coordinator, payload=None):
    """Train and finish; ``store`` is released (its lock, or an unpublished directory) on every path."""
    published = payload is not None
    try:
        problem = setup.problem
        dynamics = make_dynamics(problem, config)
        trainer = Trainer(
            problem,
            dynamics,
            GoalOptions.from_config(config),
            LoggingOptions.from_config(config),
            store=store,
            callbacks=experiment.callbacks(setup, config),
            coordinator=coordinator,
        )
        if store is not None:
            direction_dtype = "<f8" if problem.dtype == torch.float64 else "<f4"
            store.open_logs(
                trainer.columns,
                problem.n,
                problem.dim if trainer.store_directions else 0,
                direction_dtype,
                positions=None if payload is None else payload[schema.CKPT_POSITIONS],
            )
        if payload is not None:
            dynamics.load_state_dict(payload[schema.CKPT_DYNAMICS])
            trainer.load_instrument_state(payload.get(schema.CKPT_INSTRUMENTS))
        else:
            # Step 0's checkpoint, before the run appears at --out: from then on a kill at
            # any moment resumes to the same result as an uninterrupted run.
            trainer.checkpoint(state)
            if store is not None:
                store.publish()
            published = True
        live_tb = None
        if store is not None and trainer.logging.tensorboard:
            from .tensorboard import LiveWriter

            # After open_logs cut the logs back to the checkpoint (and after the new run is in
            # place): the stream is rebuilt from the rows it kept, so no step is written twice.
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
            store.close_logs()
        summary = summarize(experiment, setup, state, config, dynamics)
        summary.update(experiment.finish(setup, state, store, config))
        if store is not None:
            finish_store(store, setup, state, summary)
        if live_tb is not None:
            live_tb.finish(summary)
    except KeyboardInterrupt:
        if store is not None:
            store.abandon()
        if published:  # the run has a checkpoint to continue from (Ctrl-C outside the training loop)
            raise Interrupted("SIGINT") from None
        raise
    except BaseException:
        if store is not None:
            store.abandon()
        raise
    if store is not None:
        store.close()
    return summary, state, setup


def summarize(experiment, setup, state, config, dynamics) -> dict:
    problem = setup.problem
    row = probes.panel(problem, state.w, state.ev, problem.degree)
    homogeneous = problem.degree is not None
    summary = {
        key: row.get(key)
        for key in (
            schema.LN_N_OVER_L,
            schema.LOG_RISK,
            schema.SMOOTHED_MARGIN,
            schema.ALIGNMENT_COS,
            schema.PARAM_NORM,
            schema.TRAIN_ACCURACY,
        )
    }
    summary.update(
        {
            schema.MIN_NORMALIZED_MARGIN: row[schema.MIN_NORMALIZED_MARGIN] if homogeneous else None,
            schema.NORMALIZED_SMOOTHED_MARGIN: row[schema.NORMALIZED_SMOOTHED_MARGIN] if homogeneous else None,
            schema.BETA: row.get(schema.BETA) if homogeneous else None,
            schema.PATH_LENGTH: state.path_length,
            "homogeneity_degree": problem.degree,
            "steps": state.steps,
            schema.GRAD_EVALS: state.grad_evals,
            schema.REJECTED_STEPS: state.rejected_steps,
            schema.WALL_SECONDS: state.wall_seconds,
            "dynamics": describe_dynamics(config, problem.model),
            "faithful_to_flow": bool(dynamics.faithful_to_flow),
            "stop_reason": state.stop_reason,
            "stop_message": state.stop_message,
            "first_separable_step": state.first_separable_step,
            "first_separable_ln_n_over_L": state.first_separable_ln,
            "assumption_2_3_step": state.below_loss_at_zero_step,
        }
    )
    summary.update(dynamics.report())  # a dynamics' own counters (the sliding flow's events)
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
