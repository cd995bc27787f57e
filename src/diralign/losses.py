"""Risks in log space: the late phase drives L far below float64's smallest number.

Nothing here ever materialises ``L``; every function works with ``log L`` and with
per-example ``log l(z)``.  Example::

    python -c "import torch; from diralign.losses import log_risk; print(log_risk(torch.full((10,), 1e5, dtype=torch.float64), 'logistic'))"

prints ``ln(10) - 1e5`` to full precision, with a finite gradient.
"""

from __future__ import annotations

import math

import torch

from .errors import UserError

LOSSES = ("exp", "logistic", "cross-entropy")
_ALIASES = {"exponential": "exp", "log": "logistic", "ce": "cross-entropy", "xent": "cross-entropy"}

# ln(e - 1), the root of log l_log: split into a head and a tail so that t - c is exact
# to ~1e-33 near the root (Sterbenz makes t - c_hi exact there; c_lo restores the rest).
_ROOT_HI = 0.5413248546129181
_ROOT_LO = -1.8138570925507326e-17
_ONE_MINUS_INV_E = 0.6321205588285577


def canonical_loss(loss: str) -> str:
    name = _ALIASES.get(loss, loss)
    if name not in LOSSES:
        raise UserError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return name


def log_logistic_loss(z: torch.Tensor) -> torch.Tensor:
    """``log ln(1 + e^{-z})``, accurate to a few ulps for every finite ``z``, finite gradient.

    Three branches, each fed a masked copy of ``z`` so that the branches ``torch.where``
    does not select stay finite (an unused ``inf`` would still turn gradients into NaN):

    * ``z > 0``: with ``u = e^{-z}``, ``log l = -z + log(log1p(u)/u)``; the ratio lies in
      ``[ln 2, 1)``.  Once ``u < eps`` the log of the ratio is ``-u/2`` to within
      ``u^2/5`` (far below an ulp of ``z``), which also keeps ``1/u`` out of the gradient.
    * ``-2 <= z <= 0``: ``log l`` crosses zero at ``z = -ln(e-1)``, where ``log(softplus)``
      would lose all relative precision.  Exactly,
      ``log l = log1p(log1p((1 - 1/e) expm1(-z - ln(e-1))))``, which is well conditioned
      around the root.
    * ``z < -2``: ``softplus(-z) = t + log1p(e^{-t})`` with ``t = -z >= 2`` is at least
      2.1, so its log is well conditioned.  (torch's softplus switches to ``t`` at
      ``t > 20``, which is off by ``e^{-20}`` relative, far more than an ulp in float64.)
    """
    if z.dtype != torch.float64:
        # The split constant ln(e-1) = c_hi + c_lo cannot be represented in float32, so
        # the band branch would be off by ~1e7 ulps at the root.  This is elementwise
        # work on n numbers (not the network), so doing it in float64 costs nothing.
        return log_logistic_loss(z.double()).to(z.dtype)
    eps = torch.finfo(z.dtype).eps
    positive = z > 0
    negative = z < -2

    # Safe inputs by torch.where, not clamp: clamp's gradient vanishes *at* the bound,
    # which would zero the derivative at exactly z = 0 or z = -2.
    z_pos = torch.where(positive, z, torch.ones_like(z))
    u = torch.exp(-z_pos)
    tiny = u < eps
    u_safe = torch.where(tiny, torch.full_like(u, 0.5), u)
    log_ratio = torch.where(tiny, -0.5 * u, torch.log(torch.log1p(u_safe) / u_safe))
    pos_branch = -z_pos + log_ratio

    t_band = -torch.where(positive | negative, -torch.ones_like(z), z)
    shifted = (t_band - _ROOT_HI) - _ROOT_LO
    band_branch = torch.log1p(torch.log1p(_ONE_MINUS_INV_E * torch.expm1(shifted)))

    t_neg = -torch.where(negative, z, torch.full_like(z, -3.0))
    neg_branch = torch.log(t_neg + torch.log1p(torch.exp(-t_neg)))

    return torch.where(positive, pos_branch, torch.where(negative, neg_branch, band_branch))


def binary_log_losses(margins: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example ``log l(p_i)`` for binary margins ``p_i = y_i f(x_i)``."""
    loss = canonical_loss(loss)
    if loss == "exp":
        return -margins
    return log_logistic_loss(margins)


def multiclass_soft_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_i = -logsumexp_{j != y_i}(f_j - f_{y_i})``: cross-entropy is ``l_log(z_i)``.

    The true class is masked with ``-inf`` (a constant, so no gradient flows through it).
    """
    true = logits.gather(1, labels[:, None])
    diffs = logits - true
    mask = torch.nn.functional.one_hot(labels, logits.shape[1]).bool()
    diffs = diffs.masked_fill(mask, float("-inf"))
    return -torch.logsumexp(diffs, dim=1)


def multiclass_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The hard multi-class margin ``f_y(x) - max_{j != y} f_j(x)``."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    mask = torch.nn.functional.one_hot(labels, logits.shape[1]).bool()
    others = logits.masked_fill(mask, float("-inf"))
    return true - others.max(dim=1).values


def multiclass_log_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-example log loss for multi-class outputs: cross-entropy (logistic) or exp."""
    loss = canonical_loss(loss)
    z = multiclass_soft_margins(logits, labels)
    if loss == "exp":
        return -z
    return log_logistic_loss(z)


def log_risk(margins: torch.Tensor, loss: str) -> torch.Tensor:
    """``log L = log sum_i l(p_i)`` for binary margins, never forming ``L``."""
    return torch.logsumexp(binary_log_losses(margins, loss), dim=0)


def cross_entropy_log_risk(logits: torch.Tensor, labels: torch.Tensor, loss: str = "cross-entropy") -> torch.Tensor:
    """``log`` of the summed multi-class cross-entropy, from logits, in log space."""
    return torch.logsumexp(multiclass_log_losses(logits, labels, loss), dim=0)


def log_loss_at_zero(loss: str) -> float:
    """``log l(0)``: Assumption 2.3 holds once ``log L < log l(0)``."""
    return 0.0 if canonical_loss(loss) == "exp" else math.log(math.log(2.0))


def smoothed_margin(log_risk_value: float, loss: str) -> float:
    """``alpha = l^{-1}(L)`` from ``log L``.

    exp: ``-log L``.  logistic: ``-ln(expm1(L)) = -log L - ln(expm1(L)/L)``; for tiny
    ``L`` the correction is ``L/2`` to within ``L^2/24``, so it never needs ``L`` itself
    once ``L`` is below ``1e-9``.
    """
    lam = float(log_risk_value)
    if canonical_loss(loss) == "exp":
        return -lam
    if lam < -20.0:
        return -lam - 0.5 * math.exp(lam)
    L = math.exp(min(lam, 700.0))
    if L > 1.0:
        # expm1(L) = e^L (1 - e^{-L}); stays finite for large L.
        return -L - math.log1p(-math.exp(-L))
    return -math.log(math.expm1(L))


def smoothed_margin_slope(log_risk_value: float, loss: str) -> float:
    """``d alpha / d(-log L)``, so that ``grad alpha = -slope * grad log L``.

    exp: 1.  logistic: ``L e^L / expm1(L)``, which tends to 1 as ``L -> 0``.
    """
    lam = float(log_risk_value)
    if canonical_loss(loss) == "exp" or lam < -35.0:
        return 1.0
    L = math.exp(min(lam, 700.0))
    if L > 30.0:
        return L / (-math.expm1(-L))
    return L * math.exp(L) / math.expm1(L)
