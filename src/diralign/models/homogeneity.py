"""Numerical check of positive homogeneity: ``f(x; cW) = c^k f(x; W)`` for ``c > 0``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

SCALES = (0.5, 2.0, 3.0)


@dataclass
class HomogeneityReport:
    fitted_degree: float  # least-squares k from log|f(cW)|/|f(W)| against log c
    degree: Optional[int]  # the integer degree when homogeneous, else None
    violation: float  # worst max|f(cW) - c^k f(W)| / (c^k max|f(W)|) over the scales
    homogeneous: bool
    declared: Optional[int]  # what the model says about itself (attribute), if anything

    def as_dict(self) -> dict:
        return asdict(self)

    def verdict(self) -> str:
        if self.homogeneous:
            return f"homogeneous of degree {self.degree} (relative violation {self.violation:.1e})"
        return f"not homogeneous (best-fit degree {self.fitted_degree:.3f}, relative violation {self.violation:.1e})"


def declared_degree(model: nn.Module) -> Optional[int]:
    k = getattr(model, "homogeneity_degree", None)
    return int(k) if isinstance(k, (int, float)) and not isinstance(k, bool) else None


def homogeneity_degree(
    model: nn.Module, x: torch.Tensor, scales: Sequence[float] = SCALES, tol: Optional[float] = None
) -> HomogeneityReport:
    """Fit ``k`` from the outputs at several parameter scales and report the violation.

    Only trainable parameters are scaled (fixed buffers such as the Fig. 1 signs are part
    of the architecture).  The tolerance scales with the dtype's epsilon because ``c^k``
    amplifies rounding: ``1e4 * eps`` is ~2e-12 in float64 and ~1e-3 in float32.
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name: b for name, b in model.named_buffers()}
    dtype = next(iter(params.values())).dtype if params else x.dtype
    tol = tol if tol is not None else 1e4 * torch.finfo(dtype).eps

    def out(c: float) -> torch.Tensor:
        scaled = {name: c * p for name, p in params.items()}
        scaled.update(buffers)
        with torch.no_grad():
            return functional_call(model, scaled, (x,)).reshape(-1).to(torch.float64)

    base = out(1.0)
    scale_base = base.abs().max()
    if not torch.isfinite(base).all() or scale_base == 0:
        return HomogeneityReport(float("nan"), None, float("inf"), False, declared_degree(model))
    mask = base.abs() > 1e-6 * scale_base
    logs_c, logs_ratio = [], []
    outs = {}
    for c in scales:
        oc = out(c)
        outs[c] = oc
        ratio = (oc[mask] / base[mask]).abs().clamp(min=1e-300)
        logs_c.append(math.log(c))
        logs_ratio.append(torch.log(ratio).median().item())
    lc = torch.tensor(logs_c, dtype=torch.float64)
    lr = torch.tensor(logs_ratio, dtype=torch.float64)
    fitted = float((lc * lr).sum() / (lc * lc).sum())
    if not math.isfinite(fitted):
        # The scaled outputs overflowed (DenseNet-121 in float32 grows like c^100): certainly
        # not homogeneous of any usable degree.
        return HomogeneityReport(fitted, None, float("inf"), False, declared_degree(model))
    k = round(fitted)
    violation = max(float((outs[c] - c**k * base).abs().max() / (c**k * scale_base)) for c in scales)
    homogeneous = k >= 1 and violation <= tol
    return HomogeneityReport(fitted, k if homogeneous else None, violation, homogeneous, declared_degree(model))
