"""Experiment registry: ``diralign run NAME`` looks names up here."""

from __future__ import annotations

from ..errors import UserError
from .base import Experiment, Setup
from .deep_linear import DeepLinearExperiment
from .linear import LinearExperiment

EXPERIMENTS: dict[str, type[Experiment]] = {
    LinearExperiment.name: LinearExperiment,
    DeepLinearExperiment.name: DeepLinearExperiment,
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]()


__all__ = ["EXPERIMENTS", "Experiment", "Setup", "get_experiment"]
