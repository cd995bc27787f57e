"""The run directory's schema: every file, log column and summary key, named once.

    python -c "from diralign.rundir import schema; print(schema.FILES); print(schema.SUMMARY_KEYS)"

Everything that writes or reads a run directory takes its names from here; the writer
refuses a summary key or a log column this module does not declare, so a new number has
to be named (and documented) in one place before any run can carry it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# -- files ------------------------------------------------------------------------------
CONFIG = "config.json"  # {"experiment", "config", "seed", "data", "parameters", "versions", "created"}
SUMMARY = "summary.json"  # final numbers (SUMMARY_KEYS + the experiment's own keys)
ASSUMPTIONS = "assumptions.json"  # which of the paper's assumptions hold for the model
LOG = "log.csv"  # one row per log point, LOG_COLUMNS (+ per-block columns)
CHECKPOINT = "checkpoint.pt"  # everything needed to continue bit for bit
FINAL_MARGINS = "final_margins.npy"  # per-example normalised margins at the end
ANGLE_TO_FINAL = "angle_to_final.npy"  # angle of W/||W|| at each log point to the final direction
TENSORBOARD = "tensorboard"  # folder of TensorBoard event files (--set tensorboard=true)
LOCK = ".diralign.lock"  # flock'ed by the one writer (run, resume); holds its PID (rundir.lock)

# Array logs: fixed-width float rows [T, width] appended at log points, stored as NAME.bin
# with NAME.json holding {"width", "dtype"}.
MARGINS = "margins"  # per-example normalised margins, float32
DIRECTIONS = "directions"  # W/||W|| (models with at most store_directions_max_params)
SURFACES = "surfaces"  # fig1: the normalised prediction surface on a coarse grid
ARRAY_LOGS = (MARGINS, DIRECTIONS, SURFACES)

# fig1's contour snapshots: (a) NTK max-margin, (b) first perfect classification, (c) end.
FIG1_SNAPSHOTS = {"a": "fig1_a.npz", "b": "fig1_b.npz", "c": "fig1_c.npz"}

FILES = (
    CONFIG,
    SUMMARY,
    ASSUMPTIONS,
    LOG,
    CHECKPOINT,
    FINAL_MARGINS,
    ANGLE_TO_FINAL,
    TENSORBOARD,
    LOCK,
    *(f"{name}.bin" for name in ARRAY_LOGS),
    *(f"{name}.json" for name in ARRAY_LOGS),
    *FIG1_SNAPSHOTS.values(),
)

# -- config.json ------------------------------------------------------------------------
META_EXPERIMENT = "experiment"
META_CONFIG = "config"
META_SEED = "seed"
META_DATA = "data"
META_PARAMETERS = "parameters"
META_VERSIONS = "versions"
META_CREATED = "created"
# Identity (rundir.integrity): which run this is, and what it was built from.  A checkpoint
# carries the run id; resume rebuilds the data and initial weights and compares hashes.
META_RUN_ID = "run_id"  # uuid4 hex, made when the run is created
META_DATA_SHA256 = "data_sha256"  # of X and y as the experiment built them (before sharding)
META_INITIAL_WEIGHTS_SHA256 = "initial_weights_sha256"  # of W0 (null: not reproducible, e.g. an in-memory model)
META_CHECKSUM = "checksum"  # sha256 of the canonical JSON of every other entry
META_IDENTITY = (META_RUN_ID, META_DATA_SHA256, META_INITIAL_WEIGHTS_SHA256)

# -- checkpoint.pt ----------------------------------------------------------------------
CKPT_FORMAT = "format"  # "diralign-checkpoint"
CKPT_VERSION = "version"
CKPT_RUN_ID = "run_id"  # = config.json's run_id
CKPT_STATE = "state"  # TrainState.to_payload()
CKPT_DYNAMICS = "dynamics"  # the dynamics' state_dict()
CKPT_POSITIONS = "positions"  # {"log_bytes", "array_rows": {name: rows}} of the append-only files
CKPT_INSTRUMENTS = "instruments"  # the instruments' warm starts ({"sharpness": vector}); absent in older checkpoints
CKPT_CHECKSUM = "checksum"  # sha256 of every other entry (tensors' bytes included)

# -- log.csv ------------------------------------------------------------------------------
STEP = "step"
GRAD_EVALS = "grad_evals"
REJECTED_STEPS = "rejected_steps"
WALL_SECONDS = "wall_seconds"
LN_N_OVER_L = "ln_n_over_L"
LOG_RISK = "log_risk"
SMOOTHED_MARGIN = "smoothed_margin"
NORMALIZED_SMOOTHED_MARGIN = "normalized_smoothed_margin"
BETA = "beta"
MIN_MARGIN = "min_margin"
MIN_NORMALIZED_MARGIN = "min_normalized_margin"
PARAM_NORM = "param_norm"
GRAD_NORM = "grad_norm"
ALIGNMENT_COS = "alignment_cos"
PATH_LENGTH = "path_length"
TRAIN_ACCURACY = "train_accuracy"
BELOW_LOSS_AT_ZERO = "below_loss_at_zero"

LOG_COLUMNS = (
    STEP,
    GRAD_EVALS,
    REJECTED_STEPS,
    WALL_SECONDS,
    LN_N_OVER_L,
    LOG_RISK,
    SMOOTHED_MARGIN,
    NORMALIZED_SMOOTHED_MARGIN,
    BETA,
    MIN_MARGIN,
    MIN_NORMALIZED_MARGIN,
    PARAM_NORM,
    GRAD_NORM,
    ALIGNMENT_COS,
    PATH_LENGTH,
    TRAIN_ACCURACY,
    BELOW_LOSS_AT_ZERO,
)
# Optional columns a run adds when the matching instrument is on.
SHARPNESS = "sharpness"  # top eigenvalue of the Hessian of log L (Lanczos)
# gd, loss-based: the last accepted step eta on log L (W <- W - eta grad log L); with
# sharpness, eta * sharpness > 2 is the edge of stability their iterates oscillate at.
STEP_SIZE = "step_size"
OPTIONAL_LOG_COLUMNS = (SHARPNESS, STEP_SIZE)

# Per-block columns (Lemma E.1): a block is a layer or a parameter tensor.
SHARE_PREFIX = "share:"  # ||U_j||^2 / ||W||^2
BLOCK_ALIGNMENT_PREFIX = "alignment_cos:"  # cos(U_j, -grad_{U_j} L)


def share_column(block: str) -> str:
    return SHARE_PREFIX + block


def block_alignment_column(block: str) -> str:
    return BLOCK_ALIGNMENT_PREFIX + block


def is_log_column(name: str) -> bool:
    return (
        name in LOG_COLUMNS or name in OPTIONAL_LOG_COLUMNS or name.startswith((SHARE_PREFIX, BLOCK_ALIGNMENT_PREFIX))
    )


def block_columns(columns) -> list[str]:
    return [c for c in columns if c.startswith(SHARE_PREFIX)]


# -- summary.json -------------------------------------------------------------------------
# DESIGN section 4's minimum (numbers, null where undefined) ...
DESIGN_SUMMARY_KEYS = (
    LN_N_OVER_L,
    LOG_RISK,
    SMOOTHED_MARGIN,
    MIN_NORMALIZED_MARGIN,
    ALIGNMENT_COS,
    PATH_LENGTH,
    PARAM_NORM,
    "homogeneity_degree",
    TRAIN_ACCURACY,
    "steps",
    GRAD_EVALS,
    REJECTED_STEPS,
    WALL_SECONDS,
)
# ... then what every run adds.
SUMMARY_KEYS = DESIGN_SUMMARY_KEYS + (
    NORMALIZED_SMOOTHED_MARGIN,
    BETA,
    "dynamics",  # which dynamics produced the numbers ("flow/cvode", "gd", ...)
    "faithful_to_flow",  # true when they are the error-controlled flow's, not a discrete method's iterates
    "stop_reason",  # target_ln_n_over_L | max_steps | max_wall_seconds | stalled | ...
    "stop_message",  # the reason in words where it needs them (stalled: by how little the risk fell), else null
    "first_separable_step",
    "first_separable_ln_n_over_L",  # first perfect classification
    "assumption_2_3_step",  # first step with L(W) < l(0)
    "alignment_cos_at_ln10",
    "alignment_cos_at_ln30",
    "alignment_cos_at_ln100",  # measured at the milestone
    "kink_events",  # sliding flow: {captured, released, crossed, dropped (normal vanished)} kinks (absent for other dynamics)
    "sliding_kinks",  # sliding flow: kinks held on their switching surfaces at the end (absent for other dynamics)
    "sliding_steps",  # sliding flow on CVODE: {cvode_segments, cvode_internal_steps, explicit_steps} (else absent)
    "faithful_from_ln_n_over_L",  # flow_from_ln set: where the flow took over from gd (absent otherwise)
)
# Milestones of ln(n/L) at which alignment is measured exactly (the flow lands there).
ALIGNMENT_MILESTONES = (10.0, 30.0, 100.0)


def milestone_key(milestone: float) -> str:
    return f"alignment_cos_at_ln{milestone:g}"


# Keys whose values are wall-clock measurements: they differ between otherwise identical runs.
TIMING_KEYS = (WALL_SECONDS, "ntk_seconds", "seconds_per_step")

# Each experiment's own keys (Experiment.finish), declared here like the common ones.
EXPERIMENT_SUMMARY_KEYS = {
    "linear": ("svm_cos", "svm_margin"),
    "deep-linear": (
        "svm_cos",
        "svm_margin",
        "layer_rank_one_ratios",
        "layer_alignment",
        "layer_norm_shares",
        "margin_ratio",
    ),
    "custom": ("homogeneity_at_end", "homogeneity_violation_at_end"),
    "fig1": (
        "ntk_svm_margin",
        "ntk_svm_cos",
        "ntk_svm_support",
        "ntk_dynamics",
        "ntk_min_normalized_margin",
        "ntk_ln_n_over_L",
        "ntk_stop_reason",
        "ntk_steps",
        "ntk_grad_evals",
        "ntk_seconds",
        "ntk_train_accuracy",
        "ntk_homogeneity_degree_v",
        "ntk_homogeneity_degree_joint",
        "ntk_homogeneity_violation_joint",
        "homogeneity_degree_measured",
        "homogeneity_violation",
        "surface_distance_ntk_to_final",
        "surface_distance_ntk_to_first_separable",
        "surface_distance_first_separable_to_final",
    ),
    "srelu": (
        "neuron_share_max",
        "neuron_alignment_weighted",
        "trained_margin_from_shares",
        "local_lp_margin",
        "local_lp_share_distance",
        "infinite_width_margin_lower",
        "infinite_width_margin_upper",
        "covering_epsilon",
        "covering_ln_n_over_L",
    ),
    "margins": (
        "model",
        "data",
        "n",
        "parameters",
        "epochs",
        "seconds_per_step",
        "target_ln_n_over_L",
        "target_reached",
        "margin_change_last_quarter",
        "margin_change_last_quarter_relative",
        "margin_change_last_quarter_from_ln_n_over_L",
        "margin_rank_correlation_last_quarter",
    ),
}


def summary_keys(experiment: str) -> tuple[str, ...]:
    return SUMMARY_KEYS + EXPERIMENT_SUMMARY_KEYS.get(experiment, ())


def check_summary(experiment: str, summary: dict) -> None:
    """A summary key nobody declared is a programming error, caught before it is written."""
    known = set(summary_keys(experiment))
    unknown = [k for k in summary if k not in known]
    if unknown:
        raise KeyError(
            f"summary keys {unknown} of experiment {experiment!r} are not declared in diralign.rundir.schema"
        )


# -- JSON -------------------------------------------------------------------------------
def json_safe(value: Any, strict: bool = False, _where: str = ""):
    """The one JSON sanitiser: numpy scalars and arrays to Python, non-finite floats to ``null``
    (JSON has no NaN), tuples to lists, dict keys to strings.

    ``strict`` (config.json: a file read back to rebuild the run): a non-finite float is
    ``ValueError(where, value)``, since ``null`` would resume as another setting."""
    if isinstance(value, dict):
        return {str(k): json_safe(v, strict, f"{_where}.{k}" if _where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, strict, f"{_where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist(), strict, _where)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value):
            return float(value)
        if strict:
            raise ValueError(_where, float(value))
        return None
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:  # a 0-d tensor
        return json_safe(value.item(), strict, _where)
    return value
