"""What the options cost: one minibatch gradient (and one forward-only risk pass) done several ways.

    python benchmarks/epoch_variants.py --model resnet18 --batch-size 512 --repeats 5

Variants of the minibatch gradient ``grad log L_B`` (the sgd hot path), all from the same flat
``w`` and batch, timed interleaved (A B C A B C ...) in one process:

* ``flat-slices``: differentiate w.r.t. the flat ``w`` whose slices are the parameters (the
  code before issue 13): each slice's backward materialises a zero tensor of all P entries.
* ``leaves``: each parameter a detached leaf view of ``w``, gradients concatenated once (now).
* ``plain``: ``model(X).backward()`` on the module's own parameters (no flat vector at all).
* ``channels-last``: ``leaves`` with the images in ``torch.channels_last`` layout.
* ``compiled``: ``leaves`` through ``torch.compile`` of the module (compile time reported apart).

and of the forward-only full-data risk check: ``no_grad`` against ``inference_mode``.
The relative difference of each variant's gradient from ``leaves`` is printed too (a layout
or a compiler may change the summation order, and with it the low bits), and with
``--float64-reference`` each one's error against the same gradient in float64.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call


def setup(model: str, n: int, device: str, dtype: str = "float32"):
    from diralign.config import apply_overrides
    from diralign.experiments.margins import MarginsExperiment

    experiment = MarginsExperiment()
    config = apply_overrides(experiment.default_config(),
                             [f"model={model}", "data=synthetic-images", f"n={n}", f"device={device}", f"dtype={dtype}"])
    return experiment.setup(config, getattr(torch, dtype), torch.device(device))


def variants(problem, w, index, compile_model: bool):
    X, y = problem.X[index], problem.y[index]

    def log_risk(out, yb):
        return problem._log_losses(out, yb).logsumexp(0)

    def flat_slices():
        wr = w.detach().requires_grad_(True)
        params = dict(problem.unflatten(wr))
        params.update(problem.buffers)
        return torch.autograd.grad(log_risk(functional_call(problem.model, params, (X,)), y), wr)[0]

    def leaves(images=X, module=problem.model):
        ls = problem._leaves(w)
        params = dict(zip(problem.names, ls))
        params.update(problem.buffers)
        grads = torch.autograd.grad(log_risk(functional_call(module, params, (images,)), y), ls)
        return torch.cat([g.reshape(-1) for g in grads])

    model = problem.load_into_model(w)
    model_params = [p for p in model.parameters() if p.requires_grad]

    def plain():
        for p in model_params:
            p.grad = None
        loss = F.cross_entropy(model(X), y, reduction="sum")
        loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in model_params]) / loss.detach()  # grad log L_B, to compare

    X_cl = X.contiguous(memory_format=torch.channels_last)
    out = {"flat-slices": flat_slices, "leaves": leaves, "plain": plain, "channels-last": lambda: leaves(X_cl)}
    if compile_model:
        compiled = torch.compile(problem.model)
        t = time.perf_counter()
        leaves(X, compiled)  # first call compiles forward and backward
        out["compiled"] = lambda: leaves(X, compiled)
        out["_compile_seconds"] = time.perf_counter() - t
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--n", type=int, default=1000, help="images for the forward-only pass (one chunk)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compiling on a CPU)")
    parser.add_argument("--float64-reference", action="store_true", help="also each gradient's error against float64")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = setup(args.model, max(args.n, args.batch_size), args.device)
    problem, w = s.problem, s.w0
    index = torch.arange(args.batch_size, device=problem.X.device)
    fns = variants(problem, w, index, args.compile)
    compile_seconds = fns.pop("_compile_seconds", None)
    reference = fns["leaves"]()
    differences = {name: float((fn() - reference).norm() / reference.norm()) for name, fn in fns.items()}
    errors = {}
    if args.float64_reference and problem.dtype != torch.float64:
        # The same weights (float32 values, exactly representable) and images in float64:
        # how far each float32 variant is from the gradient it approximates.
        s64 = setup(args.model, max(args.n, args.batch_size), args.device, "float64")
        s64.problem.X = problem.X.to(torch.float64)  # the float32 images themselves, exactly
        exact = variants(s64.problem, w.to(torch.float64), index, False)["leaves"]().double()
        errors = {name: float((fn().double() - exact).norm() / exact.norm()) for name, fn in fns.items()}

    def no_grad():
        with torch.no_grad():
            problem.forward(w, problem.X[: args.n])

    def inference():
        with torch.inference_mode():
            problem.forward(w, problem.X[: args.n])

    fns.update({"forward no_grad": no_grad, "forward inference_mode": inference})
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if problem.device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            fn()
            if problem.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            cpu_times[name].append(time.process_time() - c)
        load.append(os.getloadavg()[0])
    # With one thread, CPU time is what the call would take on an idle core: on a shared
    # machine it is the steadier clock (wall time includes the other jobs' turns).
    clock = cpu_times if torch.get_num_threads() == 1 and problem.device.type == "cpu" else times
    base = statistics.median(clock["leaves"])
    fwd = statistics.median(clock["forward no_grad"])
    rows = {}
    for name in fns:
        med, cmed = statistics.median(times[name]), statistics.median(cpu_times[name])
        rel = statistics.median(clock[name]) / (fwd if name.startswith("forward") else base)
        rows[name] = {"median_seconds": med, "min_seconds": min(times[name]), "median_cpu_seconds": cmed, "relative": rel,
                      "gradient_difference": differences.get(name), "error_vs_float64": errors.get(name)}
        diff = f"  grad differs from leaves by {differences[name]:.1e}" if name in differences else ""
        diff += f", from float64 by {errors[name]:.1e}" if name in errors else ""
        print(f"{args.model:>12} {name:<24} wall {med:7.3f} s  cpu {cmed:7.3f} s  x{rel:.3f}{diff}", flush=True)
    print(f"ratios ('x') from {'CPU' if clock is cpu_times else 'wall'} time")
    if compile_seconds is not None:
        print(f"{args.model:>12} torch.compile took {compile_seconds:.1f} s (first call)")
    print(f"threads {torch.get_num_threads()}, load average {min(load):.1f}-{max(load):.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "model": args.model, "batch_size": args.batch_size,
                                               "threads": torch.get_num_threads(), "load_average": load,
                                               "compile_seconds": compile_seconds, "variants": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
