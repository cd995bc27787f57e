"""What the instruments cost: a fully logged run against a bare PyTorch loop, same steps.

    python -c "from diralign.bench.overhead import measure_overhead; print(measure_overhead('deep-linear', steps=50))"

*Instrumented*: the project's trainer (:class:`~diralign.trainer.Trainer`) with the whole instrument
panel logged at **every** step -- ``probes.panel`` and ``block_panel`` (margins, smoothed
margin, beta, alignment overall and per block), path length, a row of ``log.csv``, every
example's normalised margin (``margins.bin``) and ``W/||W||`` (``directions.bin``) -- into a
real run directory, with the problem's oracle (``Problem.evaluate``) doing the
forward/backward.  Checkpoints are not instruments and are skipped (``_NoCheckpointStore``).
Experiment callbacks (e.g. Fig. 1's surface on a grid) are left out of ``ratio`` and
measured as ``ratio_with_experiment_callbacks``.

*Bare*: the loop a user would write: ``model(X)``, the log-space risk, ``autograd.grad``,
``p -= eta * g``, nothing else.

Both do the same optimisation steps from the same ``W0`` (``FixedStep``: a fixed step on
``log L``, full batch; or a fixed-step epoch of the paper's SGD, whose shuffles the bare loop
replays), in the same process, advancing alternately a few steps at a time so that a shared
machine's changing load hits both alike; the final weights are compared to prove the steps
were the same.  A minibatch step computes no full-data gradient, but alignment needs one at
every log point: ``FixedStep`` (like ``sgd``) takes it with its end-of-epoch forward pass when
the trainer says a log point follows (``Dynamics.gradient_wanted``), so that pass is reused.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch

from .. import losses
from ..config import apply_overrides
from ..dynamics.base import Dynamics, StepResult
from ..rundir import RunWriter
from ..trainer import GoalOptions, LoggingOptions, Trainer, initial_state
from .problems import case_config

SGD_SEED_OFFSET = 20_200_612  # MinibatchSGD's generator seed offset (replayed by the bare loop)


class _NoCheckpointStore:
    """A RunWriter that skips checkpoints: the trainer writes one at the end of every
    ``train`` call, i.e. after every chunk here, where a real run writes one every 30 s.
    Checkpoints are not instruments, and their fsyncs would stall the next appends (pages
    under writeback), charging the instruments for them."""

    def __init__(self, store: RunWriter):
        self._store = store
        self.skipped_checkpoints = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def positions(self):
        return {}

    def save_checkpoint(self, payload):
        self.skipped_checkpoints += 1


class FixedStep(Dynamics):
    """The bare loop's update through the oracle: ``W <- W - eta grad log L`` (full batch), or
    one epoch of the paper's SGD with a fixed ``eta`` (minibatch), and nothing else -- no
    safeguards, so that the ratio prices the instruments, not a dynamics' bookkeeping."""

    name = "fixed-step"

    def __init__(self, problem, eta: float, batch_size: int, seed: int):
        super().__init__(problem, None)
        self.eta = eta
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(int(seed) + SGD_SEED_OFFSET)

    def step(self, w, ev, target=None) -> StepResult:
        if self.batch_size >= self.problem.n:
            w = w - self.eta * ev.grad
            return StepResult(w, self.problem.evaluate(w), 1, 0)
        log_full = ev.log_risk
        for batch in torch.randperm(self.problem.n, generator=self.generator).split(self.batch_size):
            part = self.problem.evaluate_subset(w, batch)
            w = w - (self.eta * math.exp(min(part.log_risk - log_full, 700.0))) * part.grad
        # The full-data risk scales the next epoch; its gradient only if a log point follows.
        return StepResult(w, self.problem.evaluate(w, need_grad=self.gradient_wanted), 1, 0)


def _fixed_step_config(config, eta: float, steps: int):
    return apply_overrides(
        config,
        [
            f"max_steps={steps}",
            "target_ln_n_over_L=1e300",
            "log_every_ln=1e300",  # log points come from log_step_growth=1: every step
            "log_step_growth=1.0",
            "checkpoint_every_seconds=1e300",
            "checkpoint_every_steps=0",
        ],
    )


class Instrumented:
    """The trainer (logging at every step) advanced ``k`` steps at a time; with a run
    directory (the full panel on disk) or without one (``directory=None``: probes only)."""

    def __init__(self, experiment, setup, config, dynamics, with_callbacks: bool, directory):
        problem = setup.problem
        self.store = None
        if directory is not None:
            writer = RunWriter.create(directory)
            writer.publish()  # no set-up to protect: a benchmark's scratch directory
            self.store = _NoCheckpointStore(writer)
        self.goals = GoalOptions.from_config(config)
        self.trainer = Trainer(
            problem,
            dynamics,
            self.goals,
            LoggingOptions.from_config(config),
            store=self.store,
            callbacks=experiment.callbacks(setup, config) if with_callbacks else [],
        )
        if self.store is not None:
            self.store.open_logs(
                self.trainer.columns,
                problem.n,
                problem.dim if self.trainer.store_directions else 0,
                "<f8" if problem.dtype == torch.float64 else "<f4",
            )
        self.state = initial_state(problem, setup.w0.clone())

    def run(self, k: int) -> None:
        self.trainer.goals = dataclasses.replace(self.goals, max_steps=self.state.steps + k)
        self.trainer.train(self.state)

    @property
    def w(self) -> torch.Tensor:
        return self.state.w

    def close(self) -> int:
        for cb in self.trainer.callbacks:
            cb.close()
        if self.store is None:
            return 0
        self.store.close()
        with open(self.store.log_path) as f:
            return sum(1 for _ in f) - 1


class OracleOnly:
    """The same steps through ``Problem.evaluate`` in a plain loop: no trainer, no probes."""

    def __init__(self, problem, w0, dynamics):
        self.problem, self.dynamics = problem, dynamics
        self.w = w0.clone()
        self.ev = problem.evaluate(self.w)

    def run(self, k: int) -> None:
        for _ in range(k):
            result = self.dynamics.step(self.w, self.ev)
            self.w, self.ev = result.w, result.ev


def _log_risk(problem, out, y):
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if problem.multiclass:
        return torch.logsumexp(losses.multiclass_log_losses(out, y, problem.loss), dim=0)
    return torch.logsumexp(losses.binary_log_losses(y * out, problem.loss), dim=0)


class Bare:
    """The plain loop on the ``nn.Module``, advanced ``k`` steps at a time.

    Full batch: ``W <- W - eta grad log L``.  Minibatch (``batch_size < n``): one step is an
    epoch of the paper's SGD, ``W <- W - eta exp(log L_B - log L_full) grad log L_B`` over a
    seeded shuffle (the same generator as ``MinibatchSGD``), then the full-data risk for the
    next epoch's scale.
    """

    def __init__(self, problem, w0, eta: float, batch_size: int, seed: int):
        import copy

        self.problem = problem
        self.model = copy.deepcopy(problem.model)
        with torch.no_grad():
            for (_, p), view in zip(
                [(n, p) for n, p in self.model.named_parameters() if p.requires_grad],
                problem.unflatten(w0.clone()).values(),
            ):
                p.copy_(view)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.eta = eta
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(int(seed) + SGD_SEED_OFFSET)
        self.log_full = None

    def run(self, k: int) -> None:
        X, y, params, eta = self.problem.X, self.problem.y, self.params, self.eta
        if self.batch_size >= self.problem.n:
            for _ in range(k):
                lr = _log_risk(self.problem, self.model(X), y)
                grads = torch.autograd.grad(lr, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(eta * g)
            return
        if self.log_full is None:
            with torch.no_grad():
                self.log_full = float(_log_risk(self.problem, self.model(X), y))
        for _ in range(k):
            for batch in torch.randperm(self.problem.n, generator=self.generator).split(self.batch_size):
                batch = batch.to(X.device)
                lr = _log_risk(self.problem, self.model(X[batch]), y[batch])
                grads = torch.autograd.grad(lr, params)
                scale = math.exp(min(float(lr.detach()) - self.log_full, 700.0))
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_((eta * scale) * g)
            with torch.no_grad():
                self.log_full = float(_log_risk(self.problem, self.model(X), y))

    @property
    def w(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])


def _timed(fn, k) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn(k)
    return time.perf_counter() - wall, time.process_time() - cpu


def stable_eta(problem, w0, steps: int, batch_size: int, seed: int) -> float:
    """A fixed step whose every update lowers the risk over ``steps`` steps (checked)."""
    eta = 0.01 * float(w0.norm()) / float(problem.evaluate(w0).grad.norm())
    for _ in range(12):
        loop = Bare(problem, w0, eta, batch_size, seed)
        risks = []
        for _ in range(steps):
            loop.run(1)
            risks.append(problem.evaluate(loop.w, need_grad=False).log_risk)
        start = problem.evaluate(w0, need_grad=False).log_risk
        if all(math.isfinite(r) for r in risks) and all(b < a for a, b in zip([start, *risks], risks)):
            return eta
        eta *= 0.25
    raise FloatingPointError(
        "no fixed step lowers the risk at every step; the overhead benchmark cannot match the steps"
    )


STAGES = ("bare", "oracle", "probes", "logged", "instrumented")


def measure_overhead(case: str, steps: int, chunk: int = 5, with_callbacks: bool = True, threads: int = 1) -> dict:
    """Instrumented/bare wall-time ratio on ``case`` (see the module docstring).

    Four loops do the same steps, alternately ``chunk`` steps at a time until each has done
    ``steps`` (so a machine whose load changes from one second to the next slows all alike):
    ``bare``; ``oracle`` (the update through ``Problem.evaluate``, no trainer); ``probes``
    (the trainer computing the panel at every step, no run directory); ``logged`` (panel,
    ``log.csv`` and margins written, but not ``W/||W||``); ``instrumented`` (everything,
    ``directions.bin`` included).  ``ratio`` is instrumented/bare; the others say where the
    difference goes.  CPU time (``time.process_time``) is reported beside wall time.
    """
    from ..experiments import get_experiment
    from ..runner import build
    from ..trainer import Coordinator

    experiment_name, config = case_config(case)
    experiment = get_experiment(experiment_name)
    setup = build(experiment, config, Coordinator())
    torch.set_num_threads(int(threads))
    problem, w0 = setup.problem, setup.w0
    minibatch = config.dynamics == "sgd" and int(config.batch_size) < problem.n
    batch_size = int(config.batch_size) if minibatch else problem.n
    seed = int(config.seed)
    eta = stable_eta(problem, w0, steps + 1, batch_size, seed)
    config = _fixed_step_config(config, eta, steps)

    def dynamics():
        return FixedStep(problem, eta, batch_size, seed)

    names = list(STAGES) + (["with_callbacks"] if with_callbacks else [])
    totals = {name: [0.0, 0.0] for name in names}
    with tempfile.TemporaryDirectory(prefix="diralign-bench-") as tmp:
        loops = {
            "bare": Bare(problem, w0, eta, batch_size, seed),
            "oracle": OracleOnly(problem, w0, dynamics()),
            "probes": Instrumented(experiment, setup, config, dynamics(), False, None),
            "logged": Instrumented(
                experiment,
                setup,
                dataclasses.replace(config, store_directions_max_params=0),
                dynamics(),
                False,
                Path(tmp) / "no-directions",
            ),
            "instrumented": Instrumented(experiment, setup, config, dynamics(), False, Path(tmp) / "panel"),
        }
        if with_callbacks:
            loops["with_callbacks"] = Instrumented(experiment, setup, config, dynamics(), True, Path(tmp) / "callbacks")
        for loop in loops.values():  # warm-up step, not timed (allocator, first-call caches)
            loop.run(1)
        done = 0
        while done < steps:
            k = min(chunk, steps - done)
            for name in names:
                wall, cpu = _timed(loops[name].run, k)
                totals[name][0] += wall
                totals[name][1] += cpu
            done += k
        rows = loops["instrumented"].close()
        loops["probes"].close()
        loops["logged"].close()
        if with_callbacks:
            loops["with_callbacks"].close()
        w_bare, w_inst = loops["bare"].w, loops["instrumented"].w
    tol = 1e-4 if problem.dtype == torch.float32 else 1e-9
    difference = float((w_bare - w_inst).norm() / w_bare.norm())
    bare_wall, bare_cpu = totals["bare"]
    out = {
        "dynamics": f"fixed-step sgd, batch {batch_size}, one epoch per step"
        if minibatch
        else "fixed-step gd on log L (full batch)",
        "batch_size": batch_size,
        "n": problem.n,
        "parameters": problem.dim,
        "dtype": str(problem.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "chunk": chunk,
        "eta": eta,
        "logged_rows": rows,
        "seconds": {name: totals[name][0] for name in names},
        "cpu_seconds": {name: totals[name][1] for name in names},
        "ratio": totals["instrumented"][0] / bare_wall,
        "ratio_cpu_time": totals["instrumented"][1] / bare_cpu if bare_cpu > 0 else None,
        "stage_ratios": {name: totals[name][0] / bare_wall for name in names},
        "stage_ratios_cpu_time": {name: totals[name][1] / bare_cpu for name in names} if bare_cpu > 0 else None,
        "seconds_per_step_bare": bare_wall / steps,
        "seconds_per_step_instrumented": totals["instrumented"][0] / steps,
        "same_steps": bool(difference <= tol),
        "final_weight_relative_difference": difference,
    }
    if with_callbacks:
        out["ratio_with_experiment_callbacks"] = totals["with_callbacks"][0] / bare_wall
    return out
