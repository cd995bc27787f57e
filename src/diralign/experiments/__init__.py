"""Experiment registry: ``diralign run NAME`` looks names up here."""

from __future__ import annotations

from ..errors import UserError
from .base import Experiment, Setup
from .custom import CustomExperiment
from .deep_linear import DeepLinearExperiment
from .fig1 import Fig1Experiment
from .linear import LinearExperiment
from .margins import MarginsExperiment
from .srelu import SReLUExperiment

EXPERIMENTS: dict[str, type[Experiment]] = {
    LinearExperiment.name: LinearExperiment,
    DeepLinearExperiment.name: DeepLinearExperiment,
    CustomExperiment.name: CustomExperiment,
    MarginsExperiment.name: MarginsExperiment,
    SReLUExperiment.name: SReLUExperiment,
    Fig1Experiment.name: Fig1Experiment,
}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose one of {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]()


__all__ = ["EXPERIMENTS", "Experiment", "Setup", "get_experiment"]
