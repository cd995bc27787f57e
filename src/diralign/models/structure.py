"""What a model is built from, as far as the paper's assumptions care: non-smooth pieces.

    python -c "import torch; from diralign.models.structure import nonsmooth_operations; print(nonsmooth_operations(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())))"

Theorem 4.1 (alignment) asks for margins with locally Lipschitz gradients; ReLU, max-pool,
abs and clamps have kinks.  Kinks matter in practice too: where an example's
pre-activation sits on a kink the gradient flow slides along it, and an error-controlled
explicit integrator then crawls (measured: a bias-free 3-layer ReLU MLP, n = 40, gained
0.06 in ln(n/L) over 1,300 dopri5 steps with 2,140 rejections, while normalised GD
reached ln(n/L) = 100 in 3,000 steps).

Found from module types, plus functional calls seen by a ``torch.fx`` trace where the
model traces.  A kink followed by a square (``relu(x)**2``) is smooth enough (C^1 with a
Lipschitz gradient) and is not reported.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

NONSMOOTH_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.Hardtanh,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Threshold,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# Names of traced functions / methods (trailing "_" of in-place variants stripped).
NONSMOOTH_NAMES = {
    "relu",
    "relu6",
    "leaky_relu",
    "prelu",
    "rrelu",
    "hardtanh",
    "hardswish",
    "hardsigmoid",
    "threshold",
    "hardshrink",
    "softshrink",
    "clamp",
    "clamp_min",
    "clamp_max",
    "clip",
    "abs",
    "maximum",
    "minimum",
    "amax",
    "amin",
    "max",
    "min",
}


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_nonsmooth_name(name: str) -> bool:
    name = name.lower().strip("_")
    return name in NONSMOOTH_NAMES or "max_pool" in name


def _squared_after(node) -> bool:
    """All users raise the value to a power >= 2 (or square it): smooth enough."""
    if not node.users:
        return False
    for user in node.users:
        name = _name(user.target)
        if name in ("pow", "pow_", "square") or user.target is operator.pow:
            exponent = user.args[1] if len(user.args) > 1 else user.kwargs.get("exponent")
            if name == "square" or (isinstance(exponent, (int, float)) and exponent >= 2):
                continue
        if user.target is operator.mul and len(user.args) == 2 and user.args[0] is user.args[1]:
            continue
        return False
    return True


def nonsmooth_operations(model: nn.Module) -> list[str]:
    """Names of the kinked operations in ``model`` (empty when none were found)."""
    found = []
    kinked_modules = {name for name, m in model.named_modules() if isinstance(m, NONSMOOTH_MODULES)}
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow etc.: module types are all we know
        return sorted({type(m).__name__ for name, m in model.named_modules() if name in kinked_modules})
    for node in graph.nodes:
        if node.op == "call_module" and node.target in kinked_modules:
            label = type(model.get_submodule(node.target)).__name__
        elif node.op in ("call_function", "call_method") and _is_nonsmooth_name(_name(node.target)):
            label = _name(node.target)
        else:
            continue
        if not _squared_after(node):
            found.append(label)
    return sorted(set(found))
