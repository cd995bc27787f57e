"""The one reader of a run directory: everything that reads a run (the Python API, plots,
verify, experiments' summaries, sweeps) goes through :class:`Run`.

    python -c "from diralign.rundir import Run; help(Run)"

Reads are lazy and cached; a damaged file is a one-line :class:`~diralign.errors.UserError`
naming it, never a traceback.  Array logs are memory-mapped and cut to the rows of
``log.csv``, so a run that is still being written reads consistently.
"""

from __future__ import annotations

import io
import json
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserError
from . import schema
from .arraylog import read_array_log
from .checkpoint import load_checkpoint_file
from .integrity import config_checksum


def check_config_checksum(path: Path, meta: dict, experiment: str) -> None:
    """config.json is what the run was created with: a hand edit (another seed builds other
    data, and a resume would overwrite the run's results with a mixture) is refused."""
    recorded = meta.get(schema.META_CHECKSUM)
    if recorded is None:
        return  # written before checksums: readable, and resume refuses it for lack of a run id
    try:
        expected = config_checksum(meta, schema.META_CHECKSUM)
    except (TypeError, ValueError):
        expected = None
    if recorded != expected:
        raise UserError(
            f"{path} was changed after the run was created (its checksum does not match); restore the original, or "
            f"start a new run with the settings you want: diralign run {experiment} --out NEW_DIR --set KEY=VALUE"
        )


def read_json(path: Path, required: bool = False) -> Optional[dict]:
    """A JSON object file, ``None`` if absent (or an error if ``required``); damage is an error."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise UserError(f"{path} is missing; is {path.parent} a diralign run directory?")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({type(exc).__name__}); the run directory is damaged") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a JSON object; the run directory is damaged")
    return data


class Run:
    """A run directory seen from Python: config, summary, log, margin trajectories, arrays."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / schema.CONFIG).is_file():
            raise UserError(f"{self.path} is not a diralign run directory (no {schema.CONFIG})")
        self.meta = read_json(self.path / schema.CONFIG, required=True)
        config = self.meta.get(schema.META_CONFIG)
        experiment = self.meta.get(schema.META_EXPERIMENT)
        if not isinstance(config, dict) or not isinstance(experiment, str):
            raise UserError(
                f"{self.path / schema.CONFIG} lacks its 'experiment' or 'config' entry; the run directory is damaged"
            )
        check_config_checksum(self.path / schema.CONFIG, self.meta, experiment)
        self.config: dict = config
        self.experiment: str = experiment

    @property
    def run_id(self) -> Optional[str]:
        """The id the run was created with (``None``: a run from before run ids)."""
        value = self.meta.get(schema.META_RUN_ID)
        return value if isinstance(value, str) else None

    def identity(self) -> dict:
        """Run id and the hashes of data and initial weights, as recorded at creation;
        a run without them (an older diralign made it) cannot be resumed safely."""
        values = {key: self.meta.get(key) for key in schema.META_IDENTITY}
        if not isinstance(values[schema.META_RUN_ID], str) or not isinstance(values[schema.META_DATA_SHA256], str):
            raise UserError(
                f"{self.path / schema.CONFIG} has no run id or data hash (an older diralign made it); "
                "finish it with that version, or start it again with diralign run"
            )
        return values

    # -- JSON files -------------------------------------------------------------------
    @cached_property
    def summary(self) -> dict:
        """Final numbers; ``{}`` while the run is unfinished."""
        summary = read_json(self.path / schema.SUMMARY) or {}
        for key in schema.DESIGN_SUMMARY_KEYS:  # numbers or null, by contract
            value = summary.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UserError(
                    f"{self.path / schema.SUMMARY}: {key} = {value!r} is not a number; "
                    "the run directory is damaged (diralign resume rewrites it)"
                )
        return summary

    @property
    def finished(self) -> bool:
        return bool(self.summary)

    @cached_property
    def assumptions(self) -> dict:
        report = dict(read_json(self.path / schema.ASSUMPTIONS) or {})
        if "assumption_2_3_step" in self.summary:
            report.setdefault("assumption_2_3_step", self.summary["assumption_2_3_step"])
        return report

    @property
    def data_info(self) -> dict:
        info = self.meta.get(schema.META_DATA)
        return info if isinstance(info, dict) else {}

    @property
    def degree(self) -> Optional[int]:
        """The homogeneity degree margins were normalised by (``None``: median-normalised)."""
        return self.summary.get("homogeneity_degree")

    # -- log.csv ------------------------------------------------------------------------
    @cached_property
    def log(self):
        """The scalar log as a pandas DataFrame, one row per log point."""
        import pandas as pd

        path = self.path / schema.LOG
        if not path.is_file():
            raise UserError(f"{self.path} has no {schema.LOG}; the run wrote no log point yet")
        try:
            data = path.read_bytes()
            # A row a live run is still writing is not a row yet: complete lines only.
            frame = pd.read_csv(io.BytesIO(data[: data.rfind(b"\n") + 1]))
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is unreadable ({type(exc).__name__}); the run directory is damaged") from None
        missing = [c for c in (schema.STEP, schema.LN_N_OVER_L) if c not in frame.columns]
        if missing:
            raise UserError(f"{path} has no column {missing[0]!r} (a damaged header?); the run directory is damaged")
        # Every column the writer makes is a number (or a bool); text in one is damage.
        damaged = [
            c
            for c in frame.columns
            if len(frame) and schema.is_log_column(c) and not pd.api.types.is_numeric_dtype(frame[c])
        ]
        if damaged:
            raise UserError(
                f"{path}: column {damaged[0]!r} holds something that is not a number; the run directory is damaged"
            )
        return frame

    def column(self, name: str) -> np.ndarray:
        """One log column as float64 (NaN-filled if the run does not log it)."""
        if name not in self.log.columns:
            return np.full(len(self.log), np.nan)
        return self.log[name].to_numpy(dtype=np.float64)

    @property
    def ln_n_over_L(self) -> np.ndarray:  # noqa: N802 - the paper's symbol
        return self.column(schema.LN_N_OVER_L)

    # -- arrays ----------------------------------------------------------------------------
    def array(self, name: str) -> Optional[np.ndarray]:
        """An array log ``[T, width]`` (memory-mapped), cut to the rows of ``log.csv``."""
        rows = len(self.log) if (self.path / schema.LOG).is_file() else 0
        return read_array_log(self.path, name, rows=rows)

    @property
    def margins(self) -> np.ndarray:
        """Per-example normalised margins at every log point, ``[T, n]``."""
        traj = self.array(schema.MARGINS)
        return np.zeros((0, 0), dtype=np.float32) if traj is None else traj

    @property
    def directions(self) -> Optional[np.ndarray]:
        """``W/||W||`` at every log point (small models only), else ``None``."""
        return self.array(schema.DIRECTIONS)

    def npy(self, name: str) -> Optional[np.ndarray]:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is unreadable ({type(exc).__name__}); the run directory is damaged") from None

    def npz(self, name: str) -> Optional[dict]:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is unreadable ({type(exc).__name__}); the run directory is damaged") from None

    @property
    def final_margins(self) -> Optional[np.ndarray]:
        return self.npy(schema.FINAL_MARGINS)

    @property
    def angle_to_final(self) -> Optional[np.ndarray]:
        return self.npy(schema.ANGLE_TO_FINAL)

    def checkpoint(self) -> dict:
        return load_checkpoint_file(self.path / schema.CHECKPOINT)

    def final_weights(self):
        """The flat parameter vector of the last checkpoint."""
        return self.checkpoint()["state"]["w"]

    def check(self) -> Run:
        """Read every file a figure or a report reads, so that damage is one error before any
        output is written (a plot that failed half-way would leave half its figures new)."""
        self.summary, self.assumptions  # noqa: B018 - reading is the check
        if (self.path / schema.LOG).is_file():
            self.log  # noqa: B018
            for name in schema.ARRAY_LOGS:
                self.array(name)
        for name in (schema.FINAL_MARGINS, schema.ANGLE_TO_FINAL):
            self.npy(name)
        return self

    def __repr__(self) -> str:
        state = "finished" if self.finished else "unfinished"
        return f"Run({str(self.path)!r}, {self.experiment}, {state})"
