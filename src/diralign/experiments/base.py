"""What an experiment is: a typed config, a ``setup`` that builds the problem, optional
callbacks, and ``finish`` / ``plot`` hooks that read the state and the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..config import TrainConfig
from ..problem import Problem


@dataclass
class Setup:
    problem: Problem
    w0: torch.Tensor
    info: dict = field(default_factory=dict)  # data description etc., saved in config.json
    extras: dict = field(default_factory=dict)  # in-memory objects for finish()


class Experiment:
    name = "base"
    Config = TrainConfig
    description = ""

    def default_config(self):
        return self.Config()

    def setup(self, config, dtype: torch.dtype, device: torch.device) -> Setup:
        raise NotImplementedError

    def callbacks(self, setup: Setup, config) -> list:
        return []

    def finish(self, setup: Setup, state, run_dir: Optional[Any], config) -> dict:
        """Experiment-specific summary keys (computed from the final state)."""
        return {}

    def plot(self, run_dir, out_dir) -> list:
        """Experiment-specific figures from the run directory (beyond the common ones)."""
        return []
