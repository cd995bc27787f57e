"""``diralign run custom``: your own network on your own (or the built-in) data.

    diralign run custom --set model=mypkg.nets:make --set data=my.npz --out runs/mine

``model`` is ``package.module:factory`` (or a registered name); the factory is called
with whichever of ``in_features``, ``in_shape``, ``num_classes``, ``out_features`` and
``generator`` it accepts.  ``data`` is ``separable`` (the seeded binary set of
``diralign run linear``) or an ``.npz`` file with ``X [n, d]`` or ``X [n, C, H, W]`` and
``y [n]``.  Binary or multi-class follows from the model's output shape
(:mod:`diralign.data.labels`).  From Python, :func:`diralign.train` runs this same
experiment on an in-memory model and tensors.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..config import TrainConfig
from ..data import load_npz, separable_gaussian
from ..data.labels import check_features, model_outputs, resolve_labels
from ..errors import UserError
from ..models import build_model, homogeneity_degree
from ..options import inherit, option
from ..problem import Problem
from .base import Experiment, Setup

IN_MEMORY = "in-memory"  # model/data of a run started from Python (diralign.train)
RESUME_HINT = "a run started from Python with in-memory data resumes with diralign.resume(DIR, model, X, y)"


@dataclass
class CustomConfig(TrainConfig):
    model: str = option("", 'package.module:factory or a registered name ("in-memory": Python API)')
    data: str = option("separable", '"separable" or an .npz file with X [n, d] / [n, C, H, W] and y [n]')
    n: int = option(60, "separable data only")
    d: int = option(6, "input dimension")
    data_margin: float = option(
        0.1, "delete points closer to the separator than this (teacher standard deviations for planar data)"
    )
    num_classes: int = option(0, "passed to the factory; 0: from the labels (2 for -1/+1 labels)")
    target_ln_n_over_L: float = inherit(TrainConfig, "target_ln_n_over_L", 100.0)


def label_classes(y: np.ndarray) -> tuple[int, int]:
    """``(num_classes, out_features)`` a factory should build for these labels."""
    values = set(np.unique(y.astype(np.float64)).tolist())
    if values <= {-1.0, 1.0}:
        return 2, 1
    if all(float(v).is_integer() and v >= 0 for v in values):
        k = int(max(values)) + 1
        return k, k
    raise UserError(f"labels must be -1/+1 or class indices 0..K-1, found {sorted(values)[:5]}")


def prepare_model(model: nn.Module, dtype, device) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("the model has no trainable parameters")
    # A copy: the caller's model keeps its weights; the run's model is returned trained.
    return copy.deepcopy(model).to(dtype=dtype, device=device)


class CustomExperiment(Experiment):
    name = "custom"
    Config = CustomConfig
    description = "your own model (model=package.module:factory) on separable data or an .npz file"

    def __init__(
        self, model: Optional[nn.Module] = None, X=None, y=None, config: Optional[CustomConfig] = None, info=None
    ):
        self.model, self.X, self.y = model, X, y
        self.config = config
        self.info = dict(info or {})

    def default_config(self):
        return self.config if self.config is not None else self.Config()

    def _data(self, config, dtype):
        if self.X is not None:
            return torch.as_tensor(check_features(self.X)).to(dtype), self.y, {"data": IN_MEMORY}
        if config.data == IN_MEMORY:
            raise UserError(f"this run's data were in memory; {RESUME_HINT}")
        if config.data == "separable":
            if config.n < 2 or config.d < 1:
                raise UserError(f"need n >= 2 and d >= 1 (got n={config.n}, d={config.d})")
            X, y = separable_gaussian(config.n, config.d, config.data_margin, config.seed, dtype=dtype)
            return X, y.numpy(), {"data": "separable", "d": config.d, "data_margin": config.data_margin}
        X, y = load_npz(config.data, dtype=dtype, feature_ndim=(2, 4))
        return X, y, {"data": str(config.data)}

    def initial_weights_reproducible(self, config) -> bool:
        # A model handed over in memory starts from whatever weights it has then.
        return self.model is None and config.model != IN_MEMORY

    def setup(self, config, dtype, device) -> Setup:
        X, y_raw, info = self._data(config, dtype)
        if self.model is not None:
            model = prepare_model(self.model, dtype, device)
            info["model"] = type(self.model).__name__
        else:
            if config.model == IN_MEMORY:
                raise UserError(f"this run's model was in memory; {RESUME_HINT}")
            if not config.model:
                raise UserError("diralign run custom needs a model: --set model=package.module:factory")
            num_classes, out_features = label_classes(np.asarray(y_raw))
            if config.num_classes:
                num_classes = out_features = int(config.num_classes)
            shape = tuple(int(s) for s in X.shape[1:])
            model = build_model(
                config.model,
                in_features=int(np.prod(shape)),
                in_shape=shape,
                num_classes=num_classes,
                out_features=out_features,
                generator=torch.Generator().manual_seed(config.seed + 1),
            ).to(dtype=dtype, device=device)
            info["model"] = config.model
        X = X.to(device)
        y, labels = resolve_labels(y_raw, model_outputs(model, X))
        y = y.to(device) if y.dtype == torch.int64 else y.to(device=device, dtype=dtype)
        if y.shape[0] != X.shape[0]:
            raise UserError(f"X has {X.shape[0]} examples but y has {y.shape[0]} labels; they must match")
        # The degree is measured, not taken on trust: a declared attribute that the
        # numbers contradict would normalise every margin by the wrong power.
        report = homogeneity_degree(model, X[: min(64, X.shape[0])])
        problem = Problem(model, X, y, config.loss, degree=report.degree, chunk_size=config.chunk_size or None)
        info.update(self.info)
        info.update(n=int(X.shape[0]), x_shape=list(X.shape[1:]), labels=labels, parameters=problem.dim)
        return Setup(problem, problem.flat_params(), info, {"homogeneity_at_start": report})

    def finish(self, setup, state, run_dir, config) -> dict:
        problem = setup.problem
        problem.load_into_model(state.w)
        # Biases or skip connections can look homogeneous at initialisation (zero biases)
        # and stop being so as they train: measure again at the final weights.
        final = homogeneity_degree(problem.model, problem.X[: min(64, problem.X.shape[0])])
        return {"homogeneity_at_end": final.verdict(), "homogeneity_violation_at_end": final.violation}
