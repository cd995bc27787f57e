"""Typed run configuration: one dataclass per experiment, overridden by ``--set key=value``.

The fields below are shared by every experiment (dynamics, goals, logging, storage);
experiments subclass :class:`TrainConfig` and add their own data/model fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional

from .errors import UserError


@dataclass
class TrainConfig:
    seed: int = 0
    dtype: str = "float64"
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    loss: str = "logistic"
    # dynamics: flow (error-controlled gradient flow), gd (normalised GD), sgd, loss-based
    # (Lyu & Li's lr = alpha / L), constant-gd (plain W -= eta grad L, the common baseline)
    dynamics: str = "flow"
    integrator: str = "cvode"  # flow integrator: cvode (BDF, stiff-aware) or dopri5 (explicit reference)
    rtol: float = 1e-6
    atol: float = 1e-10
    cvode_segment: float = 4.0  # cvode: segment length as a multiple of s (restart cost vs. replay on resume)
    cvode_jacobian: str = "auto"  # cvode: J*v by Hessian-vector products (hvp), difference quotients (dq), or dq early then hvp (auto)
    cvode_krylov_dim: int = 20  # cvode: GMRES Krylov dimension
    eta: float = 1.0  # gd/sgd: initial step on log L (i.e. eta / L on L); loss-based: initial alpha; constant-gd: the step on L
    eta_growth: float = 1.2  # gd: step growth after an accepted step (1 keeps it fixed)
    max_update_ratio: float = 0.1  # gd/sgd: reject steps with ||dW|| > ratio * ||W||
    batch_size: int = 512  # sgd
    chunk_size: int = 0  # examples per forward/backward chunk (0: all at once)
    # goals
    target_ln_n_over_L: float = 1000.0
    max_steps: int = 10_000_000
    max_wall_seconds: Optional[float] = None  # per invocation: `diralign resume` gets as long again
    # logging and storage
    log_every_ln: float = 0.0  # spacing of log points in ln(n/L); 0: target / 200
    log_step_growth: float = 1.25  # also log at geometrically growing step counts
    store_directions_max_params: int = 2_000_000  # keep W/||W|| at log points if P <= this
    checkpoint_every_seconds: float = 30.0
    checkpoint_every_steps: int = 0  # 0: time-based only
    tensorboard: bool = False  # also write TensorBoard events to DIR/tensorboard/ as the run goes (extra: tensorboard)
    distributed: bool = False  # data-parallel under torchrun (see diralign.distributed)
    distributed_timeout_seconds: float = 300.0  # a collective waiting longer means a rank died or hung


def field_names(config_cls) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def _convert(raw: str, annotation: Any, key: str):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _convert(raw, inner, key)
    if origin in (tuple, list):
        inner = args[0] if args else str
        parts = [p for p in raw.replace("x", ",").split(",") if p.strip()] if raw else []
        return tuple(_convert(p.strip(), inner, key) for p in parts)
    try:
        if annotation is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if annotation is int:
            value = float(raw)
            if not value.is_integer():
                raise ValueError(raw)
            return int(value)
        if annotation is float:
            value = float(raw)
            if math.isnan(value):
                raise ValueError(raw)
            return value
    except ValueError:
        raise UserError(f"--set {key}={raw}: expected {getattr(annotation, '__name__', annotation)}") from None
    return raw


def apply_overrides(config, pairs: list[str]):
    """Return a copy of ``config`` with ``key=value`` overrides applied, types checked."""
    hints = typing.get_type_hints(type(config))
    valid = field_names(type(config))
    changes = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in valid:
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(valid))}")
        changes[key] = _convert(raw.strip(), hints[key], key)
    return dataclasses.replace(config, **changes)


def config_to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(config_cls, data: dict):
    hints = typing.get_type_hints(config_cls)
    valid = set(field_names(config_cls))
    kwargs = {}
    for key, value in data.items():
        if key not in valid:
            raise UserError(f"config.json has unknown key {key!r} for this experiment")
        origin = typing.get_origin(hints[key])
        if origin in (tuple, list) and value is not None:
            value = tuple(value)
        kwargs[key] = value
    return config_cls(**kwargs)
