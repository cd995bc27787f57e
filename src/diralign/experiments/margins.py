"""``diralign run margins``: per-example margin trajectories (paper Figures 2 and 3).

    diralign run margins --set model=h-alexnet --set data=digits --set subset=512 --out runs/margins
    diralign run margins --set model=densenet121 --set data=cifar10 --set data_root=~/data --set device=cuda
    diralign plot runs/margins

Trains an image classifier with the paper's SGD (``dynamics=sgd``: minibatch 512, step
scaled by 1/L) on cross-entropy in log space until the risk is ``target_risk`` (1e-8, the
paper's goal), i.e. ``ln(n/L) >= ln n + 18.42``, logging every example's multi-class margin
``f_y - max_{j != y} f_j`` at points evenly spaced in ``ln(n/L)``.  Margins are divided by
``||W||^k`` for k-homogeneous models (H-AlexNet, k = 5) and by the median nonnegative
margin otherwise (DenseNet-121, ResNet-18), as in the paper's Appendix A.

``model`` is a registered name (``h-alexnet``, ``resnet18``, ``densenet121``, ...) or a
user's ``package.module:factory``; ``data`` is ``cifar10``, ``digits``,
``synthetic-images`` or an ``.npz`` file (see :mod:`diralign.data.images`).

Choices that differ from a literal reading of the paper, and why:

* ``accept_window=10``: an epoch is rejected when its risk exceeds the highest risk of
  the last 10 accepted epochs (a non-monotone safeguard, Grippo et al. 1986), not any
  increase.  Strictly monotone steps (``accept_window=1``) keep the step below the edge
  of stability, which shrinks as the network sharpens: on digits (n = 512) they needed
  958 epochs to reach ``ln(n/L) = 3.2``, against 207 epochs to 17.7 with the window.
* ``batch_norm=batch`` for DenseNet/ResNet (see :func:`set_batch_norm`): the usual
  training-mode normalisation, without running statistics, so ``L(W)`` is still a
  deterministic function of the parameters (for the data in their chunks).
* ``log_step_growth=1e9``: log points are spaced evenly in ``ln(n/L)`` only.

``finish`` adds ``margin_change_last_quarter`` (largest change of a normalised margin
over the last quarter of the ``ln(n/L)`` range, also relative to the largest final
margin) and the rank correlation of the margins across that quarter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..config import TrainConfig
from ..data.images import load_images
from ..data.labels import model_outputs, resolve_labels
from ..errors import UserError
from ..models import build_model, homogeneity_degree
from ..options import inherit, option
from ..problem import Problem
from ..rundir import Run
from .base import Experiment, Setup

MODEL_SEED_OFFSET = 1  # the model is initialised from seed + 1 (data subsets use seed)


@dataclass
class MarginsConfig(TrainConfig):
    model: str = option("h-alexnet", "registered name or package.module:factory")
    data: str = option("digits", "cifar10 | digits | synthetic-images | PATH.npz")
    data_root: str = option("data", "cifar10: folder holding cifar-10-batches-py/")
    download: bool = option(False, "cifar10: fetch it if missing (set by --download)")
    subset: int = option(0, "class-balanced seeded subset of this many examples; 0 keeps all")
    init_scale: float = option(1.0, "multiplies every initial weight (1: PyTorch's default init, the paper's)")
    batch_norm: str = option(
        "batch",
        'batch norm layers (DenseNet/ResNet): "batch" = normalise by the statistics of each forward batch (the sgd minibatch; in risk evaluations the chunk of chunk_size examples, i.e. the whole data when n <= chunk_size), keeping no running statistics; "frozen" = fixed affine maps (running statistics at their initial 0/1)',
    )
    n: int = option(1000, "synthetic-images: number of images")
    loss: str = inherit(TrainConfig, "loss", "cross-entropy")
    dynamics: str = inherit(TrainConfig, "dynamics", "sgd")
    dtype: str = inherit(TrainConfig, "dtype", "float32")
    chunk_size: int = inherit(TrainConfig, "chunk_size", 1000)
    accept_window: int = inherit(TrainConfig, "accept_window", 10)
    target_risk: float = option(1e-8, "the paper's goal L <= 1e-8 ...")
    target_ln_n_over_L: Optional[float] = option(None, "... i.e. ln n - ln(target_risk); set to override")
    store_directions_max_params: int = inherit(TrainConfig, "store_directions_max_params", 200_000)
    log_step_growth: float = inherit(TrainConfig, "log_step_growth", 1e9)


def resolve_target(config, n: int) -> float:
    """``ln(n/L)`` at which the risk is ``target_risk``, unless the user fixed it."""
    if config.target_ln_n_over_L is None:
        if not (0 < config.target_risk < math.inf):
            raise UserError(f"target_risk must be a positive number, got {config.target_risk}")
        config.target_ln_n_over_L = math.log(n) - math.log(config.target_risk)
    return float(config.target_ln_n_over_L)


def margin_change_last_quarter(run_dir) -> dict:
    """Largest change of any normalised margin over the last quarter of ``ln(n/L)``.

    Compares the stored margins at the first log point past
    ``s_first + 0.75 (s_last - s_first)`` with the last one; also relative to
    ``max_i |q_i|`` at the end, so the number is comparable across models.
    """
    run = Run(run_dir)
    margins = run.margins
    if len(margins) < 2:
        return {"margin_change_last_quarter": None, "margin_change_last_quarter_relative": None}
    rows = len(margins)
    s = run.ln_n_over_L[:rows]
    start = s[0] + 0.75 * (s[-1] - s[0])
    r0 = int(np.argmax(s >= start))
    final = np.asarray(margins[rows - 1], dtype=np.float64)
    earlier = np.asarray(margins[r0], dtype=np.float64)
    change = float(np.max(np.abs(final - earlier)))
    scale = float(np.max(np.abs(final)))
    ranks = [np.argsort(np.argsort(v, kind="stable")) for v in (earlier, final)]
    rank_corr = float(np.corrcoef(*ranks)[0, 1]) if len(final) > 1 else None
    return {
        "margin_change_last_quarter": change,
        "margin_change_last_quarter_relative": change / scale if scale > 0 else None,
        "margin_change_last_quarter_from_ln_n_over_L": float(s[r0]),
        "margin_rank_correlation_last_quarter": rank_corr,
    }


class MarginsExperiment(Experiment):
    name = "margins"
    Config = MarginsConfig
    description = "per-example margin trajectories of image classifiers (paper Fig. 2/3)"

    def setup(self, config, dtype, device) -> Setup:
        data = load_images(
            config.data,
            data_root=config.data_root,
            download=config.download,
            subset=config.subset,
            n=config.n,
            seed=config.seed,
            dtype=dtype,
        )
        X = data.X
        shape = tuple(int(s) for s in X.shape[1:])
        # Seed the global RNG too: registered and user factories initialise with it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + MODEL_SEED_OFFSET)
            model = build_model(
                config.model,
                num_classes=data.num_classes,
                in_shape=shape,
                in_features=int(np.prod(shape)),
                generator=torch.Generator().manual_seed(config.seed + MODEL_SEED_OFFSET),
            )
        set_batch_norm(model, config.batch_norm)
        if config.init_scale != 1.0:
            if not config.init_scale > 0:
                raise UserError(f"init_scale must be positive, got {config.init_scale}")
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(config.init_scale)
        model = model.to(dtype=dtype, device=device)
        X = X.to(device)
        y, labels = resolve_labels(data.y, model_outputs(model, X))
        y = y.to(device) if y.dtype == torch.int64 else y.to(device=device, dtype=dtype)
        degree, homogeneity = model_degree(model, X)
        n = int(X.shape[0])
        target = resolve_target(config, n)
        chunk = config.chunk_size or None
        if chunk and n > chunk and n % chunk == 1:
            chunk += 1  # no chunk of one example: batch norm cannot normalise a single one
        problem = Problem(model, X, y, config.loss, degree=degree, chunk_size=chunk)
        info = dict(data.info)
        info.update(
            n=n,
            x_shape=list(shape),
            labels=labels,
            model=config.model,
            parameters=problem.dim,
            homogeneity=homogeneity,
            target_ln_n_over_L=target,
        )
        return Setup(problem, problem.flat_params(), info, {})

    def finish(self, setup, state, run_dir, config) -> dict:
        out = {
            "model": config.model,
            "data": config.data,
            "n": setup.problem.n,
            "parameters": setup.problem.dim,
            "epochs": state.steps if config.dynamics == "sgd" else None,
            "seconds_per_step": state.wall_seconds / state.steps if state.steps else None,
            "target_ln_n_over_L": float(config.target_ln_n_over_L),
            "target_reached": state.stop_reason == "target_ln_n_over_L",
        }
        if run_dir is not None:
            out.update(margin_change_last_quarter(run_dir.path))
        return out


def model_degree(model, X) -> tuple[Optional[int], str]:
    """The degree used to normalise margins: ``None`` when the model declares it is not
    homogeneous (torchvision nets), else the measured one (a declared degree the numbers
    contradict would normalise every margin by the wrong power)."""
    if hasattr(model, "homogeneity_degree") and model.homogeneity_degree is None:
        return None, "declared not homogeneous"
    report = homogeneity_degree(model, X[: min(64, X.shape[0])])
    return report.degree, report.verdict()


def set_batch_norm(model: torch.nn.Module, mode: str) -> None:
    """``frozen``: eval mode, running statistics never updated.  ``batch``: every forward
    pass normalises by its own batch statistics and keeps no running statistics (buffers
    that would change outside the checkpointed parameters)."""
    if mode not in ("frozen", "batch"):
        raise UserError(f"batch_norm must be 'frozen' or 'batch', got {mode!r}")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            if mode == "frozen":
                module.eval()
            else:
                module.track_running_stats = False
                module.running_mean = None
                module.running_var = None
                module.num_batches_tracked = None
