"""The Python API: train, probe and reload your own networks.

    python -c "import diralign, torch; print(diralign.probe(torch.nn.Linear(3, 1, bias=False), torch.randn(8, 3), torch.tensor([1., -1.] * 4))['verdict'])"

``train`` runs the ``custom`` experiment (:mod:`diralign.experiments.custom`) on an
in-memory model and tensors through the same runner, trainer and run directory as the
CLI, so plots, ``load_run`` and ``diralign plot DIR`` work the same on its runs.
``probe`` reads the instrument panel of a model as it stands (a checkpoint trained
elsewhere) without changing it.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import probes, runner
from .config import config_from_dict, typed_value
from .data.labels import check_features, model_outputs, resolve_labels
from .errors import UserError
from .experiments import get_experiment
from .experiments.base import Setup
from .experiments.custom import IN_MEMORY, CustomConfig, CustomExperiment
from .kinks import KinkMode, unsupported_kinks
from .models.structure import nonsmooth_operations
from .problem import Problem
from .rundir import Run as RunReader
from .rundir import read_json, schema
from .runtime import RuntimeOptions, resolve_dtype_device
from .trainer import Interrupted

__all__ = ["Run", "load_run", "probe", "resume", "train"]


class Run(RunReader):
    """A run directory seen from Python: the reader (:class:`diralign.rundir.Run`: config,
    summary, log, margin trajectories) plus the trained model, its figures and a verdict."""

    def __init__(self, path, model: Optional[nn.Module] = None):
        super().__init__(path)
        self._model = model
        self._model_tried = model is not None
        self.model_error: Optional[str] = None

    @property
    def model(self) -> Optional[nn.Module]:
        """The trained model; for a reloaded run, rebuilt from config.json where possible.

        Runs of in-memory models cannot be rebuilt (their class lives in the caller's
        session): pass the model to ``load_run(DIR, model=...)``.  ``model_error`` says
        why a rebuild did not happen.
        """
        if not self._model_tried:
            self._model_tried = True
            self._model = self._rebuild_model()
        return self._model

    def _rebuild_model(self) -> Optional[nn.Module]:
        try:
            experiment = get_experiment(self.experiment)
            config = config_from_dict(experiment.Config, self.config)
            if config.device.startswith("cuda") and not torch.cuda.is_available():
                config = dataclasses.replace(config, device="cpu")
            dtype, device = resolve_dtype_device(RuntimeOptions.from_config(config))
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stays untouched
                torch.manual_seed(int(config.seed))
                setup = experiment.setup(config, dtype, device)
            w = self.final_weights()
            if w.numel() != setup.problem.dim:
                raise UserError(f"checkpoint holds {w.numel()} parameters, the rebuilt model {setup.problem.dim}")
            return setup.problem.load_into_model(w.to(device=device, dtype=dtype))
        except UserError as exc:
            self.model_error = str(exc)
            return None

    def plot(self, out_dir=None) -> list[Path]:
        """Write the figures (curves, Fig. 2-style margins, experiment extras); returns paths."""
        from .figures import plot_run

        return plot_run(self, out_dir)

    def verdict(self) -> str:
        return run_verdict(self.summary, self.assumptions, self.config)

    def __repr__(self) -> str:
        state = self.verdict() if self.finished else "unfinished (no summary.json; diralign resume DIR continues it)"
        return f"Run({str(self.path)!r}: {state})"


def load_run(path, model: Optional[nn.Module] = None) -> Run:
    """Read any run directory (Python API or CLI).

    ``model``: an instance of the run's architecture; the checkpoint's final weights are
    loaded into it (needed for runs of in-memory models, optional otherwise).
    """
    run = Run(path)
    if model is not None:
        run._model = load_flat_weights(model, run.final_weights())
        run._model_tried = True
    return run


def load_flat_weights(model: nn.Module, w: torch.Tensor) -> nn.Module:
    """Copy a flat vector (the order of ``Problem``: trainable parameters in
    ``named_parameters`` order) into ``model``, casting to each parameter's dtype."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if total != w.numel():
        raise UserError(
            f"the checkpoint holds {w.numel()} parameters but this model has {total}; pass the run's architecture"
        )
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(w[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return model


def run_verdict(summary: dict, assumptions: dict, config: dict) -> str:
    parts = [assumptions.get("homogeneity_verdict", "homogeneity unknown")]
    s, target = summary.get("ln_n_over_L"), config.get("target_ln_n_over_L")
    if s is not None and target is not None:
        reached = "reached" if s >= target else f"not reached: {summary.get('stop_reason')}"
        parts.append(f"ln(n/L) = {s:.4g} (target {target:g} {reached})")
    elif s is not None:
        parts.append(f"ln(n/L) = {s:.4g}")
    if summary.get("train_accuracy") is not None:
        parts.append(f"train accuracy {summary['train_accuracy']:.4g}")
    if summary.get("min_normalized_margin") is not None:
        parts.append(f"min normalised margin {summary['min_normalized_margin']:.4g}")
    if summary.get("alignment_cos") is not None:
        faithful = " iterates, not the flow's" if summary.get("faithful_to_flow") is False else ""
        parts.append(f"alignment cos {summary['alignment_cos']:.6f} ({summary.get('dynamics')}{faithful})")
    return "; ".join(parts)


# -- train ---------------------------------------------------------------------------


def _typed_overrides(overrides: dict) -> dict:
    """Python keyword overrides of the config, type-checked like ``--set``."""
    return {key: typed_value(CustomConfig, key, value) for key, value in overrides.items()}


def _materialise(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """All batches of a DataLoader as two tensors: the oracle needs the full data for
    ``log L`` (every log point and every sgd risk estimate is a full-data evaluation)."""
    xs, ys = [], []
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise UserError("the DataLoader must yield (inputs, labels) pairs")
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]))
    if not xs:
        raise UserError("the DataLoader yielded no batches")
    return torch.cat(xs), torch.cat(ys)


def train(
    model: nn.Module,
    X,
    y=None,
    loss: str = "logistic",
    dynamics: str = "auto",
    target_ln_n_over_L: float = 100.0,  # noqa: N803 - the paper's symbol
    out=None,
    log_every: Optional[float] = None,
    force: bool = False,
    quiet: bool = False,
    **config_overrides,
) -> Run:
    """Train (a copy of) ``model`` on ``(X, y)`` to ``ln(n/L) = target_ln_n_over_L``.

    ``y``: labels in {-1, +1} for a model with one output per example, class indices
    for a model with ``K`` logits.  ``X`` may be a DataLoader of ``(inputs, labels)``
    (then ``y`` is None; with ``dynamics="sgd"`` its batch size is the default).
    ``dynamics``: ``flow`` (error-controlled gradient flow), ``gd``, ``sgd``, or ``auto``:
    ``sgd`` for a DataLoader; ``flow`` for a smooth model; for ReLU / max-pool models with up
    to ``SLIDING_AUTO_UNITS`` kink units over the data, gd to ``ln(n/L) = 5`` and then the
    sliding (Filippov) flow (``flow_from_ln=5``, unless given); ``gd`` for larger ones, or for
    other kinks.  The choice is printed and kept in config.json.
    ``log_every``: spacing of log points in ``ln(n/L)`` (default ``target/200``).
    ``out``: run directory (default: a new temporary directory, kept); ``force`` replaces
    an earlier run there.  The run uses the model's device and float64 unless
    ``device=``/``dtype=`` say otherwise.  Further keyword
    arguments set :class:`~diralign.config.TrainConfig` fields (``dtype``, ``rtol``,
    ``max_wall_seconds``, ``eta``, ``batch_size`` ...).  Models that break the paper's
    assumptions are trained anyway; the report says which assumptions fail.
    """
    overrides = dict(config_overrides)
    if isinstance(X, torch.utils.data.DataLoader):
        if y is not None:
            raise UserError("pass either a DataLoader or tensors X, y, not both")
        loader_batch_size = X.batch_size
        X, y = _materialise(X)
        loader = True
    elif y is None:
        raise UserError("train(model, X, y): labels y are missing")
    else:
        loader, loader_batch_size = False, None
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    info = {"model_repr": repr(model)[:2000]}
    if dynamics == "auto":
        dynamics, info["dynamics_choice"], implied = _auto_dynamics(model, X, loader)
        for key, value in implied.items():
            overrides.setdefault(key, value)
        if not quiet:
            print(f"dynamics: {dynamics} ({info['dynamics_choice']})", flush=True)
    if dynamics == "sgd" and "batch_size" not in overrides and loader_batch_size:
        overrides["batch_size"] = int(loader_batch_size)
    overrides.update(loss=loss, dynamics=dynamics, target_ln_n_over_L=target_ln_n_over_L)
    first = next((p for p in model.parameters()), None)
    if "device" not in overrides and first is not None:
        overrides["device"] = str(first.device)  # train where the model lives
    if log_every is not None:
        overrides["log_every_ln"] = log_every
    config = dataclasses.replace(CustomConfig(), **_typed_overrides(overrides), model=IN_MEMORY, data=IN_MEMORY)
    experiment = CustomExperiment(model, X, y, config, info=info)
    if out is None:
        out = tempfile.mkdtemp(prefix="diralign-run-")
    try:
        summary, state, setup = runner.start_run(experiment, config, out, force=force, quiet=quiet)
    except Interrupted as exc:
        raise KeyboardInterrupt(
            f"interrupted by {exc}; checkpoint saved in {out}, continue with diralign.resume({str(out)!r}, model, X, y)"
        ) from None
    run = Run(out, model=setup.problem.load_into_model(state.w))
    if not quiet:
        print(f"{run.path}: {run.verdict()}", flush=True)
        _print_late_assumption(run)
    return run


# ``auto`` picks the sliding flow for ReLU / max-pool models up to this many kink units (ReLU
# inputs and pool windows, over all examples).  Its cost is its events, which grow with the
# units: measured at ln(n/L) 25 to 30, the ReLU twin (400 units) and a ReLU MLP (256) take
# 15-55x fewer gradients than Euler, H-AlexNet on 16 digits at 16x16 (~22,000) 2.4x more, and
# from initialisation on 128 digits (~175,000) it did not leave ln(n/L) = -0.83 in 4 minutes.
SLIDING_AUTO_UNITS = 5_000
# From initialisation the pattern changes thousands of times before the data are fitted; gd
# brings the run to where it settles, and from there every number is the flow's.
AUTO_FLOW_FROM_LN = 5.0


def _auto_dynamics(model: nn.Module, X, loader: bool) -> tuple[str, str, dict]:
    if loader:
        return "sgd", "auto: a DataLoader was given", {}
    kinks = nonsmooth_operations(model)
    if not kinks:
        return "flow", "auto: no kinks found, so the error-controlled gradient flow", {}
    if unsupported_kinks(model, kinks):
        return "gd", (
            f"auto: {', '.join(kinks)} has kinks the sliding flow does not follow (it follows ReLU and 2-D "
            "max-pool); dynamics='flow' insists on CVODE"
        ), {}
    units = kink_units(model, X)
    if units > SLIDING_AUTO_UNITS:
        return "gd", (
            f"auto: {', '.join(kinks)} kinks on {units:,} units over the data (> {SLIDING_AUTO_UNITS:,}): the sliding "
            f"flow resolves each pattern change, and here they would come faster than it steps; dynamics='flow' "
            "insists on the sliding flow"
        ), {}
    return "flow", (
        f"auto: {', '.join(kinks)} kinks on {units:,} units: normalised GD to ln(n/L) = {AUTO_FLOW_FROM_LN:g}, then the "
        "sliding (Filippov) flow, error-controlled"
    ), {"flow_from_ln": AUTO_FLOW_FROM_LN}


def kink_units(model: nn.Module, X) -> int:
    """ReLU inputs and max-pool windows one forward of ``X`` passes through (one example, times n)."""
    first = next((p for p in model.parameters()), None)
    x = torch.as_tensor(X[:1])
    if first is not None:
        x = x.to(device=first.device, dtype=first.dtype)
    mode = KinkMode(record=True)
    with torch.no_grad(), mode:
        model(x)
    per_example = sum(int(s.z.numel()) if s.kind == "relu" else int(s.argmax.numel()) for s in mode.sites)
    return per_example * len(X)


def resume(path, model: nn.Module, X, y=None, quiet: bool = False) -> Run:
    """Continue an interrupted ``train`` run (same model architecture and data)."""
    if isinstance(X, torch.utils.data.DataLoader):
        X, y = _materialise(X)
    meta = read_json(Path(path) / schema.CONFIG) or {}
    if meta.get(schema.META_EXPERIMENT) != CustomExperiment.name:
        summary, state, setup = runner.resume_run(path, quiet=quiet)
        return Run(path, model=setup.problem.load_into_model(state.w))
    experiment = CustomExperiment(model, X, y, info={"model_repr": repr(model)[:2000]})
    summary, state, setup = runner.resume_run(path, quiet=quiet, experiment=experiment)
    return Run(path, model=setup.problem.load_into_model(state.w))


def _print_late_assumption(run: Run) -> None:
    if run.assumptions.get("initially_below_loss_at_zero") is False:
        step = run.summary.get("assumption_2_3_step")
        when = f"first held at step {step}" if step is not None else "never held during this run"
        print(f"  Assumption 2.3 (L(W) < l(0)) {when}; the theory speaks about the run from there on", flush=True)


# -- probe ---------------------------------------------------------------------------


def probe(model: nn.Module, X, y, loss: str = "logistic", chunk_size: Optional[int] = None) -> dict:
    """The instrument panel of ``model`` as it stands, on data ``(X, y)``.

    Returns a dict: ``verdict`` (one line), ``homogeneous``, ``homogeneity_degree``,
    ``homogeneity`` (fitted degree, relative ``violation``), ``has_bias``,
    ``has_batch_norm``, ``has_skip_connections``, ``nonsmooth_operations``,
    ``ln_n_over_L``, ``log_risk``,
    ``smoothed_margin``, ``normalized_smoothed_margin``, ``min_margin``,
    ``min_normalized_margin``, ``normalized_margins`` (array ``[n]``; by ``||W||^k``, or
    by the median nonnegative margin when not homogeneous), ``alignment_cos``, ``beta``,
    ``param_norm``, ``grad_norm``, ``train_accuracy``, ``below_loss_at_zero`` and
    ``layers`` ({block: {"share", "alignment_cos"}}); ``assumptions`` holds the full
    report that ``train`` prints (and ``min_median_normalized_margin`` replaces the min
    normalised margin when there is no degree).  The model is evaluated in eval
    mode (batch norm uses its running statistics) and is not changed.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters")
    dtype, device = params[0].dtype, params[0].device
    X = torch.as_tensor(check_features(X)).to(dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        labels, _ = resolve_labels(y, model_outputs(model, X))
        if labels.shape[0] != X.shape[0]:
            raise UserError(f"X has {X.shape[0]} examples but y has {labels.shape[0]} labels; they must match")
        labels = labels.to(device) if labels.dtype == torch.int64 else labels.to(device=device, dtype=dtype)
        problem = Problem(model, X, labels, loss, degree=None, chunk_size=chunk_size)
        w = problem.flat_params()
        ev = problem.evaluate(w)
        report = runner.assumption_report(Setup(problem, w, extras={"initial_evaluation": ev}), None)
        degree = report["homogeneity"]["degree"]
        problem.degree = degree
        row = probes.panel(problem, w, ev, degree)
        blocks = probes.block_panel(problem, w, ev.grad, probes.block_groups(problem.names))
    finally:
        model.train(was_training)
    layers = {}
    for key, share in blocks.items():
        if key.startswith("share:"):
            name = key[len("share:") :]
            layers[name] = {"share": share, "alignment_cos": blocks[f"alignment_cos:{name}"]}
    result = {
        "homogeneous": bool(report["homogeneity"]["homogeneous"]),
        "homogeneity_degree": degree,
        "homogeneity": report["homogeneity"],
        "homogeneity_verdict": report["homogeneity_verdict"],
        "has_bias": report["has_bias"],
        "has_batch_norm": report["has_batch_norm"],
        "has_skip_connections": report["has_skip_connections"],
        "nonsmooth_operations": report["nonsmooth_operations"],
        **row,
        "normalized_margins": probes.normalized_margins(ev.margins, row["param_norm"], degree)
        .detach()
        .cpu()
        .double()
        .numpy(),
        "layers": layers,
        "assumptions": report,
    }
    if degree is None:
        # The median-normalised minimum is not the paper's gamma; keep it apart.
        result["min_median_normalized_margin"] = result.pop("min_normalized_margin")
        result["min_normalized_margin"] = None
        result["normalized_smoothed_margin"] = None
        result["beta"] = None
    result["verdict"] = probe_verdict(result)
    return result


def probe_verdict(p: dict) -> str:
    parts = [p["homogeneity_verdict"]]
    extras = runner.structural_extras(p)
    if extras:
        parts.append("has " + ", ".join(extras))
    parts.append(f"train accuracy {p['train_accuracy']:.4g}")
    parts.append(f"ln(n/L) = {p['ln_n_over_L']:.4g}")
    if p["min_normalized_margin"] is not None:
        parts.append(f"min normalised margin {p['min_normalized_margin']:.4g}")
    if p.get("alignment_cos") is not None and math.isfinite(p["alignment_cos"]):
        parts.append(f"alignment cos {p['alignment_cos']:.6f}")
    return "; ".join(parts)
