"""TensorBoard event files from a run directory: live during a run, or exported after.

    diralign run deep-linear --out runs/dl --set tensorboard=true && tensorboard --logdir runs/dl/tensorboard
    diralign export runs/dl --tensorboard tb/dl

What a stream holds (the same events live and exported, so either can replace the other):

* scalars: every ``log.csv`` column at global step = the row's ``step`` (``ln_n_over_L``
  among them: TensorBoard's x axis is the step, so the paper's clock is a curve of its
  own); per-block columns ``share:NAME`` become tags ``share/NAME`` so TensorBoard groups
  them.  Wall time = the run's creation time + the row's ``wall_seconds``, so the
  "relative" axis is training time, resumes included.
* histograms: ``margins/normalized``, the per-example normalised margins of each log
  point (``margins.bin``): the margin distribution, Fig. 2 seen from the side.
* hparams: the resolved config and the final summary, in the ``hparams/`` sub-run
  (torch's ``add_hparams`` layout; metrics are tagged ``summary/KEY``).

Resumed runs: rows logged after the last checkpoint are cut from ``log.csv`` on resume
and computed again, so events written for them before a kill would come back as
duplicates.  The live writer therefore rebuilds the stream from the durable run
directory (``log.csv`` and ``margins.bin`` as the checkpoint left them) whenever a run
resumes, and appends to it from there: the stream is always exactly the log's rows.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError
from .rundir import Run, schema
from .trainer import Callback

EVENTS_DIR = schema.TENSORBOARD  # inside a run directory
HPARAMS_RUN = "hparams"  # sub-run holding the hparams session and summary metrics
HISTOGRAM_TAG = "margins/normalized"
EVENT_GLOB = "events.out.tfevents.*"


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or the one-line error naming the extra."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs the package itself)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "TensorBoard output needs the tensorboard package: "
            "pip install 'diralign[tensorboard]' (or pip install tensorboard)"
        ) from None
    return SummaryWriter


def tag_of(column: str) -> str:
    """The scalar tag of a ``log.csv`` column (``share:layers.0`` -> ``share/layers.0``)."""
    return column.replace(":", "/")


def _created_epoch(meta: dict) -> float:
    import datetime

    try:
        return datetime.datetime.strptime(str(meta.get(schema.META_CREATED, "")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return 0.0


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class _Stream:
    """One event stream (a SummaryWriter on a directory) in the layout described above."""

    def __init__(self, directory: Path, meta: dict):
        self.directory = Path(directory)
        self.meta = meta
        self.epoch = _created_epoch(meta)
        self.writer = summary_writer_class()(log_dir=str(self.directory), flush_secs=10)

    def add_row(self, row: dict, columns, margins: Optional[np.ndarray]) -> None:
        step = int(row[schema.STEP])
        walltime = self.epoch + _number(row.get(schema.WALL_SECONDS, 0.0))
        for column in columns:
            self.writer.add_scalar(tag_of(column), _number(row.get(column)), step, walltime=walltime)
        if margins is not None and margins.size and np.isfinite(margins).all():
            self.writer.add_histogram(HISTOGRAM_TAG, np.asarray(margins, dtype=np.float32), step, walltime=walltime)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def write_hparams(directory: Path, meta: dict, summary: dict) -> None:
    """The ``hparams`` sub-run: config values as hparams, numeric summary keys as metrics
    (torch's ``add_hparams`` layout, written by a writer of its own)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    hparams_dir = Path(directory) / HPARAMS_RUN
    if hparams_dir.exists():  # a finished run's hparams are rewritten, never doubled
        shutil.rmtree(hparams_dir)
    values = {"experiment": str(meta.get(schema.META_EXPERIMENT))}
    for key, value in _flatten(meta.get(schema.META_CONFIG, {})).items():
        values[key] = value if isinstance(value, (bool, int, float, str)) or value is None else json.dumps(value)
    metrics = {
        f"summary/{key}": float(value)
        for key, value in summary.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }
    step = summary.get("steps") if isinstance(summary.get("steps"), int) else None
    experiment, start, end = hparams_summaries(values, metrics)
    writer = summary_writer_class()(log_dir=str(hparams_dir))
    try:
        for record in (experiment, start, end):
            writer.file_writer.add_summary(record, step)
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)
    finally:
        writer.close()


def _flatten(config: dict) -> dict:
    """Leaf keys of a (possibly sectioned) config dict."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value))
        else:
            out[key] = value
    return out


def _durable_rows(run_dir: Path):
    """``(log, margins)`` of a run directory: complete log rows only (a run killed
    mid-write leaves a partial last line), margin rows aligned to them."""
    import pandas as pd

    run = Run(run_dir)
    path = run.path / schema.LOG
    if not path.is_file() or path.stat().st_size == 0:
        return run, pd.DataFrame(), np.zeros((0, 0), dtype=np.float32)
    log = run.log
    with open(path, "rb") as f:
        f.seek(-1, 2)
        if f.read(1) != b"\n" and len(log):
            log = log.iloc[:-1]
    margins = run.margins
    return run, log, margins


def write_rows(stream: _Stream, log, margins) -> None:
    columns = list(log.columns)
    for i, row in enumerate(log.to_dict("records")):
        stream.add_row(row, columns, np.asarray(margins[i]) if i < len(margins) else None)


def clear_events(directory: Path) -> None:
    """Remove the event files this module writes in ``directory`` (nothing else)."""
    directory = Path(directory)
    for path in directory.glob(EVENT_GLOB):
        path.unlink()
    if (directory / HPARAMS_RUN).is_dir():
        shutil.rmtree(directory / HPARAMS_RUN)


def export(run_dir, out, force: bool = False) -> Path:
    """Write the event stream of a finished or interrupted run into ``out``; returns ``out``.

    diralign export runs/dl --tensorboard tb/dl
    """
    summary_writer_class()  # a missing package is reported before anything is written
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / schema.CONFIG).is_file():
        raise UserError(
            f"{run_dir} is not a diralign run directory (no {schema.CONFIG}); give the --out folder of a run"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--tensorboard {out} exists and is not a directory; choose another path")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(
                f"--tensorboard {out} is not empty; pass --force to replace its event files, "
                "or choose another directory"
            )
        clear_events(out)
    run, log, margins = _durable_rows(run_dir)
    stream = _Stream(out, run.meta)
    try:
        write_rows(stream, log, margins)
    finally:
        stream.close()
    if run.summary:
        write_hparams(out, run.meta, run.summary)
    return out


def export_many(path, out, force: bool = False) -> list[Path]:
    """A run directory into ``out``, or each run of a sweep directory into ``out/POINT``."""
    from .sweep import sweep_runs

    path, out = Path(path), Path(out)
    runs = sweep_runs(path)
    if runs is None:
        return [export(path, out, force)]
    if not runs:
        raise UserError(f"{path} is a sweep with no run directories yet; run the sweep first")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(
            f"--tensorboard {out} is not empty; pass --force to replace its event files, or choose another directory"
        )
    return [export(run, out / run.name, force) for run in runs]


class LiveWriter(Callback):
    """The ``tensorboard=true`` callback: one event row per log point, flushed as written.

    Made by :meth:`open` after the run directory has been cut back to its checkpoint, so
    the rebuilt stream holds exactly the durable rows and nothing is written twice.
    """

    key = "tensorboard"

    def __init__(self, stream: _Stream, degree):
        self.stream = stream
        self.degree = degree

    @classmethod
    def open(cls, run_dir, degree, resumed: bool) -> LiveWriter:
        run_dir = Path(run_dir)
        directory = run_dir / EVENTS_DIR
        directory.mkdir(exist_ok=True)
        clear_events(directory)  # events past the checkpoint may be in there: rebuild
        meta = Run(run_dir).meta
        stream = _Stream(directory, meta)
        if resumed:
            _, log, margins = _durable_rows(run_dir)
            write_rows(stream, log, margins)
            stream.flush()
        return cls(stream, degree)

    def on_log(self, trainer, state, row: dict) -> None:
        from . import probes

        margins = probes.normalized_margins(state.ev.margins, row[schema.PARAM_NORM], self.degree)
        # float32 as in margins.bin, so a live stream equals an exported one
        self.stream.add_row(row, trainer.columns, margins.detach().cpu().numpy().astype(np.float32))
        self.stream.flush()

    def finish(self, summary: dict) -> None:
        """After the summary is written (the stream itself may be closed by then)."""
        write_hparams(self.stream.directory, self.stream.meta, summary)

    def close(self) -> None:
        self.stream.close()


def read_scalars(directory) -> dict:
    """``{tag: [(step, value), ...]}`` of every scalar in ``directory``'s event files, in
    file order, duplicates kept (TensorBoard's own loader, no purging): for tests and checks."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict = {}
    for path in sorted(Path(directory).glob(EVENT_GLOB)):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number = value.simple_value
                elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(tensor_util.make_ndarray(value.tensor))
                else:
                    continue
                out.setdefault(value.tag, []).append((event.step, number))
    return out
