"""GPU readiness check (issue 13): every device code path once, then the cost of an epoch at CIFAR scale.

    bash benchmarks/gpu_check.sh                  # on a GPU machine, < 8 min: writes benchmarks/gpu_check.json
    bash benchmarks/gpu_check.sh --dry-run        # on CPU, small sizes: everything except the device parts
    python benchmarks/gpu_check.py --dry-run --steps env,margins,epochs --json /tmp/gpu_check.json

Steps (``--steps`` picks some; each runs the real command line in a subprocess unless noted):

``env``          torch, CUDA, cuDNN, NCCL versions; the device, its memory, TF32 settings.
``margins``      ``diralign run margins --set device=cuda`` (H-AlexNet, 512 digits, to risk 1e-8), then ``diralign plot``.
``resume``       the same run cut by ``max_wall_seconds`` and continued by ``diralign resume`` until done;
                 compared with the uninterrupted run (bit equality is reported, not required: cuDNN
                 may pick different algorithms).
``fig1``         ``diralign run fig1 --set device=cuda`` (width 1000, ``ln(n/L)`` to 30), then ``diralign plot``.
``api``          ``diralign.train`` / ``probe`` / ``load_run`` on a CUDA model, with tensors and with a DataLoader.
``distributed``  ``torchrun --nproc_per_node=<GPUs> -m diralign run margins --set distributed=true`` (NCCL),
                 then ``diralign resume`` of it in one process.
``epochs``       (in this process) 40 s of epochs of each network on 50,000 CIFAR-shaped images
                 (``synthetic-images``): seconds per epoch, peak device memory, the slope of
                 ``ln(n/L)`` per epoch over the last half of the epochs, and the time to risk 1e-8
                 projected from that slope.  The projection is a straight line through an early
                 stretch, where progress per epoch is still growing (the step grows 1.2x per
                 accepted epoch; on 512 digits ResNet-18 went from 0.03 to 1.5 per epoch), so
                 it overestimates: read it as an upper bound of the right order.
``epoch_cost``   (in this process) ``benchmarks/epoch_cost.py`` on the device: diralign's epoch
                 against a plain PyTorch loop, at 50,000 images (H-AlexNet and ResNet-18).

``--dry-run``: device ``cpu``, gloo instead of NCCL (2 processes), a few dozen examples, one or
two epochs: the same code paths except the device's own.  A step that fails is recorded with the
tail of its output and the check goes on; the exit status is 1 if any step failed.  Steps that
would not fit in ``--budget-seconds`` are skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = ("env", "margins", "resume", "fig1", "api", "distributed", "epochs", "epoch_cost")
MODELS = ("h-alexnet", "resnet18", "densenet121")


def profile(dry_run: bool) -> dict:
    """Sizes: the real check, or a dry run that exercises the same paths in seconds."""
    if dry_run:
        return dict(device="cpu", subset=64, fig1_width=40, fig1_target=10.0, epoch_n=96, epochs=2, epoch_seconds=5.0,
                    cost_n=96, models=MODELS, cost_models=("h-alexnet",), cost_repeats=1, ranks=2)
    import torch

    return dict(device="cuda", subset=512, fig1_width=1000, fig1_target=30.0, epoch_n=50_000, epochs=500, epoch_seconds=40.0,
                cost_n=50_000, models=MODELS, cost_models=("h-alexnet", "resnet18"), cost_repeats=1,
                ranks=max(torch.cuda.device_count(), 1))


# -- running things ------------------------------------------------------------------------------------
def _env(threads_one: bool = False) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads_one:
        env["OMP_NUM_THREADS"] = "1"
    return env


# One intra-op thread for the CPU processes of a dry run: on a shared machine two OpenMP threads
# stall at every parallel region whose second thread is descheduled (benchmarks/RESULTS.md).
CPU_ONE_THREAD = {"value": False}


def cli(args: list, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diralign", *map(str, args)], cwd=REPO, env=_env(CPU_ONE_THREAD["value"]),
                          capture_output=True, text=True, timeout=timeout)


def torchrun(ranks: int, args: list, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "diralign",
               *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=_env(threads_one=True), capture_output=True, text=True, timeout=timeout)


class StepFailed(Exception):
    pass


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-2500:]).strip()
        raise StepFailed(f"{what}: exit status {proc.returncode}\n{tail}")


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _margins_args(p: dict, out: Path, *more) -> list:
    return ["run", "margins", "--out", out, "--force", "--quiet", "--set", f"device={p['device']}",
            "--set", "model=h-alexnet", "--set", "data=digits", "--set", f"subset={p['subset']}", *more]


# -- the steps ------------------------------------------------------------------------------------------
def step_env(p, work, results) -> dict:
    import torch

    out = {"torch": torch.__version__, "python": platform.python_version(), "cuda_available": torch.cuda.is_available(),
           "cuda": torch.version.cuda, "device": p["device"]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            device_name=props.name,
            device_count=torch.cuda.device_count(),
            device_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
            # cuDNN convolutions run in TF32 by default on Ampere and later (10-bit mantissa);
            # NVIDIA_TF32_OVERRIDE=0 turns that off for the whole process.
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            tf32_override=os.environ.get("NVIDIA_TF32_OVERRIDE"),
        )
    elif p["device"] == "cuda":
        raise StepFailed("no CUDA device visible (torch.cuda.is_available() is False); run with --dry-run on CPU")
    out["cpu_count"] = os.cpu_count()
    return out


def step_margins(p, work, results) -> dict:
    out = work / "margins"
    t = time.perf_counter()
    _check(cli(_margins_args(p, out, "--no-plot"), timeout=300), "diralign run margins")
    seconds = time.perf_counter() - t
    _check(cli(["plot", out], timeout=120), "diralign plot")
    s = _summary(out)
    if not s.get("target_reached"):
        raise StepFailed(f"did not reach risk 1e-8: stop_reason={s.get('stop_reason')}")
    return {"seconds_with_startup": seconds, "wall_seconds": s["wall_seconds"], "epochs": s["steps"],
            "rejected_epochs": s["rejected_steps"], "ln_n_over_L": s["ln_n_over_L"],
            "fig2_png": (out / "fig2.png").is_file(), "n": s["n"]}


def step_resume(p, work, results) -> dict:
    reference = results.get("margins", {}).get("result", {})
    budget = max(0.45 * float(reference.get("wall_seconds") or 4.0), 0.5)  # about two resumes
    out = work / "resume"
    _check(cli(_margins_args(p, out, "--no-plot", "--set", f"max_wall_seconds={budget:.3f}"), timeout=300), "run (cut short)")
    first = _summary(out)
    resumes = 0
    while first["stop_reason"] == "max_wall_seconds" and resumes < 20:
        _check(cli(["resume", out, "--quiet", "--no-plot"], timeout=300), "diralign resume")
        first = _summary(out)
        resumes += 1
    if not first.get("target_reached"):
        raise StepFailed(f"resumed run did not reach its target after {resumes} resumes ({first.get('stop_reason')})")
    result = {"resumes": resumes, "session_budget_seconds": budget, "epochs": first["steps"], "ln_n_over_L": first["ln_n_over_L"]}
    if (work / "margins" / "summary.json").is_file():
        straight = _summary(work / "margins")
        result["equals_uninterrupted"] = all(straight[k] == first[k] for k in ("steps", "log_risk", "param_norm", "rejected_steps"))
        result["log_risk_difference"] = abs(straight["log_risk"] - first["log_risk"])
    if resumes == 0:
        raise StepFailed("the run finished within its first session; nothing was resumed")
    return result


def step_fig1(p, work, results) -> dict:
    out = work / "fig1"
    args = ["run", "fig1", "--out", out, "--force", "--quiet", "--no-plot", "--set", f"device={p['device']}",
            "--set", f"width={p['fig1_width']}", "--set", f"target_ln_n_over_L={p['fig1_target']}"]
    t = time.perf_counter()
    _check(cli(args, timeout=300), "diralign run fig1")
    seconds = time.perf_counter() - t
    _check(cli(["plot", out], timeout=120), "diralign plot fig1")
    s = _summary(out)
    return {"seconds_with_startup": seconds, "ln_n_over_L": s["ln_n_over_L"], "alignment_cos": s["alignment_cos"],
            "grad_evals": s["grad_evals"], "figures": sorted(f.name for f in out.glob("fig1*.png"))}


API_SCRIPT = r"""
import sys, torch, diralign
from torch import nn
device, out = sys.argv[1], sys.argv[2]
g = torch.Generator().manual_seed(0)
X = torch.randn(40, 5, dtype=torch.float64, generator=g)
y = torch.sign(X @ torch.randn(5, dtype=torch.float64, generator=g))
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16, bias=False), nn.ReLU(), nn.Linear(16, 1, bias=False)).double().to(device)
model = net()
run = diralign.train(model, X.to(device), y.to(device), target_ln_n_over_L=20, out=out + "/tensors", quiet=True)
assert run.summary["train_accuracy"] == 1.0, run.summary
assert next(run.model.parameters()).device.type == torch.device(device).type
panel = diralign.probe(run.model, X.to(device), y.to(device))
run.plot()
loaded = diralign.load_run(out + "/tensors", model=net())
assert loaded.summary["steps"] == run.summary["steps"]
# a DataLoader of CPU tensors for a model on the device: sgd, data moved once
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
run2 = diralign.train(net(), loader, target_ln_n_over_L=10, out=out + "/loader", quiet=True)
assert run2.summary["dynamics"] == "sgd" and run2.summary["ln_n_over_L"] >= 10, run2.summary
print(panel["verdict"] if isinstance(panel, dict) and "verdict" in panel else "probe ok")
"""


def step_api(p, work, results) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", API_SCRIPT, p["device"], str(work / "api")], cwd=REPO, env=_env(CPU_ONE_THREAD["value"]),
                          capture_output=True, text=True, timeout=300)
    _check(proc, "Python API on the device")
    return {"seconds_with_startup": time.perf_counter() - t, "probe": proc.stdout.strip().splitlines()[-1:]}


def step_distributed(p, work, results) -> dict:
    out = work / "ddp"
    args = ["run", "margins", "--out", out, "--force", "--quiet", "--no-plot", "--set", "distributed=true",
            "--set", f"device={p['device']}", "--set", "data=digits", "--set", f"subset={p['subset']}",
            "--set", "max_steps=10", "--set", "checkpoint_every_steps=5"]
    t = time.perf_counter()
    _check(torchrun(p["ranks"], args, timeout=300), f"torchrun --nproc_per_node={p['ranks']} diralign run margins")
    seconds = time.perf_counter() - t
    s = _summary(out)
    meta = json.loads((out / "config.json").read_text())
    _check(cli(["resume", out, "--quiet", "--no-plot"], timeout=300), "diralign resume of a distributed run (one process)")
    return {"ranks": p["ranks"], "backend": meta["data"].get("distributed", {}).get("backend"), "seconds_with_startup": seconds,
            "epochs": s["steps"], "ln_n_over_L": s["ln_n_over_L"]}


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def epoch_numbers(run_dir: Path, n: int, target_risk: float = 1e-8) -> dict:
    """Seconds per epoch and the projection to ``target_risk`` from ``run_dir/log.csv``."""
    import pandas as pd

    log = pd.read_csv(run_dir / "log.csv", usecols=["step", "wall_seconds", "ln_n_over_L", "rejected_steps"])
    last = log.iloc[-1]
    epochs = int(last["step"])
    work = epochs + int(last["rejected_steps"])
    seconds_per_epoch = float(last["wall_seconds"]) / max(work, 1)
    half = log[log["step"] >= epochs / 2]
    first = half.iloc[0] if len(half) > 1 else log.iloc[0]
    slope = (float(last["ln_n_over_L"]) - float(first["ln_n_over_L"])) / max(float(last["step"] - first["step"]), 1.0)
    target = math.log(n) - math.log(target_risk)
    out = {"epochs": epochs, "rejected_epochs": int(last["rejected_steps"]), "seconds_per_epoch": seconds_per_epoch,
           "ln_n_over_L": float(last["ln_n_over_L"]), "slope_ln_n_over_L_per_epoch": slope, "target_ln_n_over_L": target}
    if slope > 0:
        more = (target - float(last["ln_n_over_L"])) / slope
        per_accepted = float(last["wall_seconds"]) / max(epochs, 1)  # rejected epochs included, at the rate seen
        out["projected_epochs_to_target"] = epochs + more
        out["projected_seconds_to_target"] = float(last["wall_seconds"]) + more * per_accepted
    else:
        out["projected_epochs_to_target"] = out["projected_seconds_to_target"] = None
    return out


def step_epochs(p, work, results) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from diralign.experiments.margins import MarginsExperiment
    from diralign.runner import start_run

    out = {}
    for model in p["models"]:
        run_dir = work / f"epochs-{model}"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        # As many epochs as fit in epoch_seconds (at least one), so that the slope comes from
        # past the first few epochs, where the step size is still growing fastest.
        sets = [f"model={model}", "data=synthetic-images", f"n={p['epoch_n']}", f"device={p['device']}", f"max_steps={p['epochs']}",
                f"max_wall_seconds={p['epoch_seconds']}", "stall_seconds=0"]  # (a few slow epochs are not a stall)
        summary, _, _ = start_run(MarginsExperiment(), sets, run_dir, quiet=True, force=True)
        if summary["steps"] == 0:  # the budget ran out inside the first epoch: take exactly one
            sets = [s for s in sets if not s.startswith(("max_wall_seconds=", "max_steps="))] + ["max_steps=1"]
            summary, _, _ = start_run(MarginsExperiment(), sets, run_dir, quiet=True, force=True)
        _sync()
        row = {"seconds_with_setup": time.perf_counter() - t, "n": summary["n"], "parameters": summary["parameters"],
               **epoch_numbers(run_dir, summary["n"])}
        if torch.cuda.is_available():
            row["peak_device_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_rss_gib_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        out[model] = row
    return out


def step_epoch_cost(p, work, results) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "src"))
    import epoch_cost

    args = ["--models", ",".join(p["cost_models"]), "--data", "synthetic-images", "--n", str(p["cost_n"]),
            "--epochs", "1", "--repeats", str(p["cost_repeats"]), "--device", p["device"], "--json", str(work / "epoch_cost.json")]
    epoch_cost.main(args)
    return json.loads((work / "epoch_cost.json").read_text())["results"]


# Rough seconds each step takes on one modern GPU, for the budget (the dry run is quicker).
ESTIMATES = {"env": 5, "margins": 40, "resume": 60, "fig1": 60, "api": 30, "distributed": 40, "epochs": 170, "epoch_cost": 90}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, small sizes: everything except the device parts")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of: " + ", ".join(STEPS))
    parser.add_argument("--json", help="results file (default: benchmarks/gpu_check.json; dry run: a temporary file)")
    parser.add_argument("--budget-seconds", type=float, default=440.0, help="skip steps that would end after this")
    parser.add_argument("--keep", metavar="DIR", help="keep the run directories here")
    parser.add_argument("--models", help=f"networks for the epoch steps (default: {','.join(MODELS)})")
    parser.add_argument("--epoch-n", type=int, help="images for the epoch steps (default: 50,000; dry run 96)")
    parser.add_argument("--subset", type=int, help="digits for the margins, resume and distributed steps (default: 512; dry run 64)")
    args = parser.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    p = profile(args.dry_run)
    CPU_ONE_THREAD["value"] = args.dry_run
    if args.dry_run:
        import torch

        torch.set_num_threads(1)
    if args.models:
        p["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
        p["cost_models"] = p["models"]
    if args.epoch_n:
        p["epoch_n"] = p["cost_n"] = args.epoch_n
    if args.subset:
        p["subset"] = args.subset
    json_path = Path(args.json) if args.json else (
        Path(tempfile.gettempdir()) / "gpu_check_dry_run.json" if args.dry_run else REPO / "benchmarks" / "gpu_check.json")
    start = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "dry_run": args.dry_run, "profile": {
        k: list(v) if isinstance(v, tuple) else v for k, v in p.items()}, "steps": {}}
    keep = Path(args.keep) if args.keep else None
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in steps:
            elapsed = time.perf_counter() - start
            estimate = ESTIMATES[name] / (10 if args.dry_run else 1)
            if elapsed + estimate > args.budget_seconds:
                report["steps"][name] = {"ok": None, "skipped": f"time budget ({elapsed:.0f} s used of {args.budget_seconds:.0f})"}
                print(f"gpu_check: {name:<12} skipped (time budget: {elapsed:.0f} s of {args.budget_seconds:.0f} used)", flush=True)
                continue
            t = time.perf_counter()
            entry = {}
            try:
                entry["result"] = globals()[f"step_{name}"](p, work, report["steps"])
                entry["ok"] = True
            except StepFailed as exc:
                entry.update(ok=False, error=str(exc)[-4000:])
            except Exception:  # a bug or a device error: record it, go on with the other steps
                entry.update(ok=False, error=traceback.format_exc()[-4000:])
            entry["seconds"] = round(time.perf_counter() - t, 2)
            report["steps"][name] = entry
            status = "ok" if entry["ok"] else "FAILED"
            print(f"gpu_check: {name:<12} {status:<7} {entry['seconds']:7.1f} s", flush=True)
            if not entry["ok"]:
                print("  " + entry["error"].strip().replace("\n", "\n  ")[-1500:], flush=True)
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    report["all_ok"] = all(e.get("ok") is not False for e in report["steps"].values())
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"gpu_check: {'all ok' if report['all_ok'] else 'FAILURES'} in {report['total_seconds']} s; wrote {json_path}")
    return 0 if report["all_ok"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
