"""What an experiment is: a typed config, a ``setup`` that builds the problem, optional
callbacks, and a ``finish`` hook that adds the experiment's own summary keys (declared in
:mod:`diralign.rundir.schema`).  Figures live in :mod:`diralign.figures`, which reads run
directories and never imports an experiment.

    python -c "from diralign.experiments import EXPERIMENTS; print(sorted(EXPERIMENTS))"
"""

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

    def initial_weights_reproducible(self, config) -> bool:
        """Whether ``setup`` makes the same initial weights from the config alone (a resume
        then checks them against the run's recorded hash)."""
        return True

    def finish(self, setup: Setup, state, run_dir: Optional[Any], config) -> dict:
        """Experiment-specific summary keys (computed from the final state); ``run_dir`` is
        the run's :class:`~diralign.rundir.RunWriter` (``None`` on ranks that do not write)."""
        return {}
