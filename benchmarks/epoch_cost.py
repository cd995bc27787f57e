"""Cost of a `diralign run margins` (sgd) epoch against a plain PyTorch loop doing the same epoch.

    python benchmarks/epoch_cost.py --models h-alexnet,resnet18 --data synthetic-images --n 2048 --batch-size 512

*diralign*: the real run (``runner.start_run`` on the ``margins`` experiment, the paper's SGD,
the default log schedule, checkpoints, a run directory in a temporary folder), stopped after
``--epochs`` epochs by ``max_steps``.  Its training-loop wall time is split into

- the **epoch proper** -- the minibatch updates and the end-of-epoch full-data risk check,
  which the plain loop does too (the step is normalised by the full-data risk);
- the **log-point work** -- what a log point adds: the full-data *gradient* instead of a
  forward-only risk check (for alignment), the probes, a row of ``log.csv``, every example's
  margin and checkpoints.  It is reported on its own, per epoch and per log point.

*plain*: what a user would write: ``model(X[B])``, ``F.cross_entropy(reduction="sum")``,
``backward()``, ``p -= eta * p.grad / L_full`` (the same normalised step, ``eta grad L_B /
L_full``), the same seeded shuffles as ``MinibatchSGD``, and a forward-only full-data pass per
epoch for ``L_full``, chunked like diralign's.  No instruments, no safeguards.

``ratio = (diralign epoch proper) / (plain epoch)``, per epoch of work (diralign's rejected
epochs are work too: each is a full pass).  The two loops alternate (plain, diralign,
diralign, plain, ...) ``--repeats`` times in one process, after one untimed warm-up each, so
a shared machine's changing load hits both alike; the median over repeats is the headline and
the machine's load average is recorded.  Both wall and CPU time are reported: with one thread
(``--threads 1``) CPU time is what the epoch would take on an idle core, and it is the steadier
number on a shared machine.  Speed is a ratio measured here, never a constant.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SGD_SEED_OFFSET = 20_200_612  # MinibatchSGD's shuffle generator: seed + this (replayed by the plain loop)


def _overrides(args, model: str, data: str) -> list[str]:
    sets = [f"model={model}", f"data={data}", f"batch_size={args.batch_size}", f"device={args.device}",
            f"dtype={args.dtype}", f"threads={args.threads}", f"chunk_size={args.chunk_size}",
            "stall_seconds=0"]  # a few epochs on a loaded machine must not read as a stalled run
    if data == "synthetic-images":
        sets.append(f"n={args.n}")
    elif args.subset:
        sets.append(f"subset={args.subset}")
    return sets + list(args.set or [])


# -- the plain loop ------------------------------------------------------------------------------
class Plain:
    """The user's loop on a copy of the problem's module, from the same ``W0``."""

    def __init__(self, problem, w0, eta: float, batch_size: int, seed: int, chunk: int):
        self.model = copy.deepcopy(problem.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p, view in zip(params, problem.unflatten(w0.clone()).values()):
                p.copy_(view)
        self.params, self.X, self.y = params, problem.X, problem.y
        self.n, self.eta, self.batch_size, self.chunk = problem.n, eta, batch_size, chunk or problem.n
        self.generator = torch.Generator().manual_seed(seed + SGD_SEED_OFFSET)
        self.L_full = self.full_risk()

    def full_risk(self) -> torch.Tensor:
        with torch.no_grad():
            return sum(F.cross_entropy(self.model(self.X[a : a + self.chunk]), self.y[a : a + self.chunk], reduction="sum")
                       for a in range(0, self.n, self.chunk))

    def epoch(self) -> None:
        order = torch.randperm(self.n, generator=self.generator).to(self.X.device)
        for batch in order.split(self.batch_size):
            for p in self.params:
                p.grad = None
            F.cross_entropy(self.model(self.X[batch]), self.y[batch], reduction="sum").backward()
            with torch.no_grad():
                step = -self.eta / self.L_full
                for p in self.params:
                    p.add_(p.grad * step)
        self.L_full = self.full_risk()
        if self.X.device.type == "cuda":
            torch.cuda.synchronize()


# -- instruments on the real run (timing wrappers only; they change nothing) ---------------------------
def clocks() -> tuple[float, float]:
    """(wall, CPU) seconds.  CPU time of a one-thread process is what it would take on an idle
    core; on a shared machine it is the steadier of the two."""
    return time.perf_counter(), time.process_time()


def since(start) -> tuple[float, float]:
    wall, cpu = clocks()
    return wall - start[0], cpu - start[1]


class Recorder:
    def __init__(self):
        self.loop = (0.0, 0.0)  # Trainer.train: the training loop
        self.steps = []  # ((wall, cpu), full_batch)
        self.passes = []  # ((wall, cpu), need_grad, inside_step)
        self.inside = False


@contextlib.contextmanager
def recording(rec: Recorder):
    from diralign.dynamics.sgd import MinibatchSGD
    from diralign.problem import Problem
    from diralign.trainer import Trainer

    evaluate, step, train = Problem.evaluate, MinibatchSGD.step, Trainer.train

    def sync(problem):
        if problem.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_evaluate(self, w, need_grad=True):
        sync(self)
        t = clocks()
        out = evaluate(self, w, need_grad)
        sync(self)
        rec.passes.append((since(t), bool(need_grad), rec.inside))
        return out

    def timed_step(self, w, ev, target=None):
        rec.inside = True
        t = clocks()
        try:
            return step(self, w, ev, target)
        finally:
            rec.inside = False
            rec.steps.append((since(t), self.full_batch))

    def timed_train(self, *a, **k):
        t = clocks()
        try:
            return train(self, *a, **k)
        finally:
            d = since(t)
            rec.loop = (rec.loop[0] + d[0], rec.loop[1] + d[1])

    Problem.evaluate, MinibatchSGD.step, Trainer.train = timed_evaluate, timed_step, timed_train
    try:
        yield rec
    finally:
        Problem.evaluate, MinibatchSGD.step, Trainer.train = evaluate, step, train


def diralign_epochs(model: str, data: str, args, epochs: int, forward: tuple) -> dict:
    """The real run for ``epochs`` epochs; per epoch of work, (wall, CPU) seconds of the epoch
    proper and of the log-point work.  ``forward``: (wall, CPU) of a forward-only full pass."""
    from diralign.experiments.margins import MarginsExperiment
    from diralign.runner import start_run

    sets = _overrides(args, model, data) + [f"max_steps={epochs}"]
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="epoch-cost-") as tmp, recording(rec):
        summary, _, _ = start_run(MarginsExperiment(), sets, Path(tmp) / "run", quiet=True)
        log_rows = _log_rows(Path(tmp) / "run")
    work = int(summary["steps"]) + int(summary["rejected_steps"])
    if work == 0:
        raise RuntimeError(f"the diralign run stopped before its first epoch (stop_reason {summary.get('stop_reason')})")
    full_batch = any(fb for _, fb in rec.steps)
    grad_passes = [t for t, g, inside in rec.passes if g and inside]
    out = {
        "epochs_of_work": work,
        "accepted_epochs": int(summary["steps"]),
        "rejected_epochs": int(summary["rejected_steps"]),
        "log_point_gradient_passes": 0 if full_batch else len(grad_passes),
        "full_batch": full_batch,
        "ln_n_over_L": summary["ln_n_over_L"],
        "log_rows": log_rows,
    }
    for k, clock in enumerate(("wall", "cpu")):
        in_step = sum(t[k] for t, _ in rec.steps)
        # A full-data gradient inside an epoch is log-point work (the epoch itself needs only
        # the risk), except in full-batch runs, where it *is* the next epoch's step.
        extra = 0.0 if full_batch else sum(t[k] for t in grad_passes) - len(grad_passes) * forward[k]
        proper = in_step - extra
        out[f"epoch_proper_{clock}"] = proper / work
        out[f"log_point_{clock}_per_epoch"] = (rec.loop[k] - proper) / work
        out[f"loop_{clock}"] = rec.loop[k]
    return out


def forward_pass_seconds(problem, w, repeats: int = 3) -> tuple[float, float]:
    """(wall, CPU) of the fastest of ``repeats`` forward-only full-data passes."""
    best = None
    for _ in range(repeats):
        t = clocks()
        problem.evaluate(w, need_grad=False)
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        d = since(t)
        best = d if best is None or d[0] < best[0] else best
    return best


def _log_rows(run_dir) -> int:
    path = Path(run_dir) / "log.csv"
    return max(sum(1 for _ in open(path)) - 1, 0) if path.exists() else 0


def measure(model: str, data: str, args) -> dict:
    from diralign.config import apply_overrides
    from diralign.experiments.margins import MarginsExperiment
    from diralign.runner import build
    from diralign.trainer import Coordinator

    experiment = MarginsExperiment()
    config = apply_overrides(experiment.default_config(), _overrides(args, model, data))
    setup = build(experiment, config, Coordinator())
    problem = setup.problem
    batch = int(config.batch_size)
    plain = Plain(problem, setup.w0, float(config.eta), batch, int(config.seed), int(config.chunk_size))
    forward = forward_pass_seconds(problem, setup.w0)
    load = [os.getloadavg()[0]]
    plain.epoch()  # warm-up: allocator, oneDNN primitives, cuDNN autotuning
    diralign_epochs(model, data, args, 1, forward)
    repeats = []
    for r in range(args.repeats):
        order = ("plain", "diralign") if r % 2 == 0 else ("diralign", "plain")
        timing = {}
        for which in order:
            if which == "plain":
                t = clocks()
                for _ in range(args.epochs):
                    plain.epoch()
                wall, cpu = since(t)
                timing["plain"] = {"wall": wall / args.epochs, "cpu": cpu / args.epochs}
            else:
                timing["diralign"] = diralign_epochs(model, data, args, args.epochs, forward)
        d = timing["diralign"]
        row = {"plain_epoch_wall": timing["plain"]["wall"], "plain_epoch_cpu": timing["plain"]["cpu"], **d}
        for clock in ("wall", "cpu"):
            row[f"ratio_{clock}"] = d[f"epoch_proper_{clock}"] / timing["plain"][clock]
            row[f"ratio_with_log_points_{clock}"] = (d[f"epoch_proper_{clock}"] + d[f"log_point_{clock}_per_epoch"]) / timing["plain"][clock]
        repeats.append(row)
        load.append(os.getloadavg()[0])
    out = {
        "model": model,
        "data": data,
        "n": problem.n,
        "batch_size": batch,
        "minibatches_per_epoch": math.ceil(problem.n / batch),
        "parameters": problem.dim,
        "dtype": config.dtype,
        "device": str(problem.device),
        "threads": torch.get_num_threads(),
        "epochs_per_repeat": args.epochs,
        "full_data_forward_wall": forward[0],
        "full_data_forward_cpu": forward[1],
        "load_average_1min": load,
        "repeats": repeats,
    }
    for key in ("ratio_wall", "ratio_cpu", "ratio_with_log_points_wall", "ratio_with_log_points_cpu", "plain_epoch_wall",
                "plain_epoch_cpu", "epoch_proper_wall", "epoch_proper_cpu", "log_point_wall_per_epoch", "log_point_cpu_per_epoch"):
        values = [r[key] for r in repeats]
        out[f"{key}_median"] = statistics.median(values)
        if key.startswith("ratio"):
            out[f"{key}_range"] = [min(values), max(values)]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="h-alexnet,resnet18,densenet121")
    parser.add_argument("--data", default="synthetic-images,digits", help="comma-separated: synthetic-images, digits, cifar10, FILE.npz")
    parser.add_argument("--n", type=int, default=2048, help="synthetic-images: number of images")
    parser.add_argument("--subset", type=int, default=0, help="digits/cifar10: class-balanced subset (0: all)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed block")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="further margins config overrides")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    for data in args.data.split(","):
        for model in args.models.split(","):
            row = measure(model.strip(), data.strip(), args)
            results.append(row)
            print(
                f"{row['model']:>12} {row['data']:>16} n={row['n']:<6} batch={row['batch_size']:<4} threads={row['threads']}"
                f"  plain {row['plain_epoch_wall_median']:.3f} s/epoch (cpu {row['plain_epoch_cpu_median']:.3f})"
                f"  diralign {row['epoch_proper_wall_median']:.3f} (cpu {row['epoch_proper_cpu_median']:.3f})"
                f"  ratio wall {row['ratio_wall_median']:.3f} cpu {row['ratio_cpu_median']:.3f}"
                f"  + log points {row['log_point_wall_per_epoch_median']:.3f} s/epoch"
                f" (ratio with them {row['ratio_with_log_points_wall_median']:.3f})  load {max(row['load_average_1min']):.1f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
