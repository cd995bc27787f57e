"""Time per full-data gradient with 1 and 2 processes (issue 7, benchmarks/RESULTS.md).

    python benchmarks/distributed_scaling.py --repeats 5 --json benchmarks/distributed_scaling.json

For each case it launches itself three times on the same problem: a plain process with 1
intra-op thread, a plain process with 2 threads, and ``torchrun --nproc_per_node=2`` with 1
thread per process (gloo).  Each launch builds the experiment exactly as ``diralign run``
does (under torchrun: sharded, with the all-gather reducer), evaluates the full-data
``log L`` and ``grad log L`` once to warm up, then ``--repeats`` times, and reports the
median (and minimum) seconds per evaluation; in the 2-process launch it also times the local shard
alone (``Problem.gather`` off) so the cost of the reduction shows.  Parallel efficiency is
``t(1 process, 1 thread) / (2 * t(2 processes))``.

Cases (``--cases``): ``fig1`` (width 10,000, float64) and ``h-alexnet`` (all 1,797 sklearn
digits at 32x32x3, float32); a case whose experiment is not registered is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "fig1": ("fig1", ["width=10000"]),
    "h-alexnet": ("margins", ["model=h-alexnet", "data=digits", "subset=0"]),
}


def worker(case: str, repeats: int) -> dict:

    from diralign import distributed
    from diralign.config import apply_overrides
    from diralign.experiments import get_experiment
    from diralign.runner import build

    experiment_name, overrides = CASES[case]
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    config = apply_overrides(get_experiment(experiment_name).default_config(), [*overrides, f"threads={threads}"])
    from diralign.trainer import Coordinator

    context = distributed.DataParallel.from_env() if distributed.launched_by_torchrun() else None
    setup = build(get_experiment(experiment_name), config, context or Coordinator())
    problem, w = setup.problem, setup.w0

    def timed(fn) -> tuple[float, float]:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if context is not None:
                context.agree(0.0, False, False)  # line the ranks up before each timing
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), min(times)

    result = {
        "case": case,
        "processes": 1 if context is None else context.world_size,
        "threads_per_process": threads,
        "n": problem.n,
        "parameters": problem.dim,
        "dtype": str(problem.dtype).replace("torch.", ""),
    }
    result["seconds_per_gradient"], result["min_seconds_per_gradient"] = timed(lambda: problem.evaluate(w))
    if context is not None:
        # This process's pieces alone (no all-gather): the cost of the reduction shows.
        gather, problem.gather = problem.gather, None
        result["local_shard_seconds"], _ = timed(lambda: problem.evaluate(w))
        problem.gather = gather
        result["reduction_seconds"] = result["seconds_per_gradient"] - result["local_shard_seconds"]
    if context is None or context.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    return result


def launch(case: str, repeats: int, processes: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    me = [os.path.abspath(__file__), "--worker", case, "--repeats", str(repeats)]
    if processes == 1:
        command = [sys.executable, *me]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *me]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return

    from diralign.experiments import EXPERIMENTS

    rows = []
    for case in args.cases.split(","):
        if CASES[case][0] not in EXPERIMENTS:
            print(f"{case}: experiment {CASES[case][0]!r} is not registered; skipped", flush=True)
            continue
        one = launch(case, args.repeats, 1, 1)
        one_two_threads = launch(case, args.repeats, 1, 2)
        two = launch(case, args.repeats, 2, 1)
        row = {
            "case": case,
            "n": one["n"],
            "parameters": one["parameters"],
            "dtype": one["dtype"],
            "seconds_1proc_1thread": one["seconds_per_gradient"],
            "seconds_1proc_2threads": one_two_threads["seconds_per_gradient"],
            "seconds_2procs_1thread": two["seconds_per_gradient"],
            "seconds_2procs_local_shard": two["local_shard_seconds"],
            "seconds_2procs_reduction": two["reduction_seconds"],
            "min_seconds_1proc_1thread": one["min_seconds_per_gradient"],
            "min_seconds_2procs_1thread": two["min_seconds_per_gradient"],
            "parallel_efficiency": one["seconds_per_gradient"] / (2 * two["seconds_per_gradient"]),
            "parallel_efficiency_of_minima": one["min_seconds_per_gradient"] / (2 * two["min_seconds_per_gradient"]),
            "speedup_over_1proc_2threads": one_two_threads["seconds_per_gradient"] / two["seconds_per_gradient"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "repeats": args.repeats, "rows": rows}, f, indent=2)


def machine() -> dict:
    import platform

    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "load_average": load}


if __name__ == "__main__":
    main()
