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
the machine's load average is recorded.  Speed is a ratio measured here, never a constant.
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
            f"dtype={args.dtype}", f"threads={args.threads}", f"chunk_size={args.chunk_size}"]
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
class Recorder:
    def __init__(self):
        self.steps = []  # (seconds, full_batch)
        self.passes = []  # (seconds, need_grad, inside_step)
        self.inside = False


@contextlib.contextmanager
def recording(rec: Recorder):
    from diralign.dynamics.sgd import MinibatchSGD
    from diralign.problem import Problem

    evaluate, step = Problem.evaluate, MinibatchSGD.step

    def sync(problem):
        if problem.device.type == "cuda":
            torch.cuda.synchronize()

    def timed_evaluate(self, w, need_grad=True):
        sync(self)
        t = time.perf_counter()
        out = evaluate(self, w, need_grad)
        sync(self)
        rec.passes.append((time.perf_counter() - t, bool(need_grad), rec.inside))
        return out

    def timed_step(self, w, ev, target=None):
        rec.inside = True
        t = time.perf_counter()
        try:
            return step(self, w, ev, target)
        finally:
            rec.inside = False
            rec.steps.append((time.perf_counter() - t, self.full_batch))

    Problem.evaluate, MinibatchSGD.step = timed_evaluate, timed_step
    try:
        yield rec
    finally:
        Problem.evaluate, MinibatchSGD.step = evaluate, step


def diralign_epochs(model: str, data: str, args, epochs: int, forward_seconds: float) -> dict:
    from diralign.experiments.margins import MarginsExperiment
    from diralign.runner import start_run

    sets = _overrides(args, model, data) + [f"max_steps={epochs}"]
    rec = Recorder()
    with tempfile.TemporaryDirectory(prefix="epoch-cost-") as tmp, recording(rec):
        summary, _, _ = start_run(MarginsExperiment(), sets, Path(tmp) / "run", quiet=True)
        log_rows = _log_rows(Path(tmp) / "run")
    loop = float(summary["wall_seconds"])
    work = int(summary["steps"]) + int(summary["rejected_steps"])
    in_step = sum(s for s, _ in rec.steps)
    full_batch = any(fb for _, fb in rec.steps)
    grad_passes = [s for s, g, inside in rec.passes if g and inside]
    # A full-data gradient inside an epoch is log-point work (the epoch itself needs only the
    # risk), except in full-batch runs, where it *is* the epoch's step.
    extra = 0.0 if full_batch else sum(grad_passes) - len(grad_passes) * forward_seconds
    proper = in_step - extra
    return {
        "loop_seconds": loop,
        "epochs_of_work": work,
        "accepted_epochs": int(summary["steps"]),
        "rejected_epochs": int(summary["rejected_steps"]),
        "epoch_proper_seconds": proper / work,
        "log_point_seconds_per_epoch": (loop - proper) / work,
        "log_point_gradient_passes": 0 if full_batch else len(grad_passes),
        "full_batch": full_batch,
        "ln_n_over_L": summary["ln_n_over_L"],
        "log_rows": log_rows,
    }


def forward_pass_seconds(problem, w, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        problem.evaluate(w, need_grad=False)
        if problem.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times)


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
                t = time.perf_counter()
                for _ in range(args.epochs):
                    plain.epoch()
                timing["plain"] = (time.perf_counter() - t) / args.epochs
            else:
                timing["diralign"] = diralign_epochs(model, data, args, args.epochs, forward)
        d = timing["diralign"]
        repeats.append({
            "plain_epoch_seconds": timing["plain"],
            **d,
            "ratio": d["epoch_proper_seconds"] / timing["plain"],
            "ratio_with_log_points": (d["epoch_proper_seconds"] + d["log_point_seconds_per_epoch"]) / timing["plain"],
        })
        load.append(os.getloadavg()[0])
    ratios = [r["ratio"] for r in repeats]
    return {
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
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "ratio_with_log_points_median": statistics.median(r["ratio_with_log_points"] for r in repeats),
        "plain_epoch_seconds_median": statistics.median(r["plain_epoch_seconds"] for r in repeats),
        "diralign_epoch_proper_seconds_median": statistics.median(r["epoch_proper_seconds"] for r in repeats),
        "log_point_seconds_per_epoch_median": statistics.median(r["log_point_seconds_per_epoch"] for r in repeats),
        "full_data_forward_seconds": forward,
        "load_average_1min": load,
        "repeats": repeats,
    }


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
                f"{row['model']:>12} {row['data']:>16} n={row['n']:<6} batch={row['batch_size']:<4} "
                f"plain {row['plain_epoch_seconds_median']:.3f} s/epoch  diralign {row['diralign_epoch_proper_seconds_median']:.3f}"
                f"  ratio {row['ratio_median']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]"
                f"  + log points {row['log_point_seconds_per_epoch_median']:.3f} s/epoch"
                f" (ratio with them {row['ratio_with_log_points_median']:.3f})  load {max(row['load_average_1min']):.1f}",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
