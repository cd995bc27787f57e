"""diralign: directional convergence and alignment in deep learning (Ji & Telgarsky 2020).

    python -c "import diralign; print(diralign.__all__)"
"""

from .api import Run, load_run, probe, resume, train
from .errors import UserError
from .losses import (
    cross_entropy_log_risk,
    log_logistic_loss,
    log_risk,
    multiclass_margins,
    smoothed_margin,
)
from .maxmargin import hard_margin_svm, hard_margin_svm_dual, svm_sklearn
from .models import DeepLinear, LinearModel, SquaredReLUNet, SquaredReLUNTK, homogeneity_degree, ntk_linearize
from .problem import Problem
from .runner import resume_run, start_run

__all__ = [
    "DeepLinear",
    "LinearModel",
    "Problem",
    "Run",
    "SquaredReLUNTK",
    "SquaredReLUNet",
    "UserError",
    "cross_entropy_log_risk",
    "hard_margin_svm",
    "hard_margin_svm_dual",
    "homogeneity_degree",
    "log_logistic_loss",
    "load_run",
    "log_risk",
    "multiclass_margins",
    "ntk_linearize",
    "probe",
    "resume",
    "resume_run",
    "smoothed_margin",
    "start_run",
    "svm_sklearn",
    "train",
]
