"""The training problem as an oracle on a flat parameter vector.

Every dynamics and every probe talks to a :class:`Problem`: given the flat vector
``w`` of all trainable parameters it returns ``log L``, ``grad log L`` and the
per-example margins, from one forward and one backward pass.  Data may be split into
chunks (bounded memory) or shards (``torch.distributed``); the pieces are combined in
log space, ``log L = logsumexp_c log L_c`` and
``grad log L = sum_c exp(log L_c - log L) grad log L_c``, which is exact because
``L = sum_c L_c`` and ``grad L = sum_c grad L_c`` (divide both by ``L``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from . import losses


@dataclass
class Evaluation:
    """One oracle call at ``w``: what a training step computes anyway."""

    log_risk: float
    grad: Optional[torch.Tensor]  # flat grad log L, or None
    margins: torch.Tensor  # p_i: y_i f(x_i) (binary) or f_y - max_{j!=y} f_j
    correct: int  # number of examples with p_i > 0


def is_multiclass_output(out: torch.Tensor) -> bool:
    return out.ndim == 2 and out.shape[1] >= 2


class Problem:
    """Model + data + loss, seen through a flat parameter vector.

    ``reducer`` (optional, see :meth:`sharded`) combines the per-shard
    ``(log_risk, grad, margins)`` across processes into ``(log_risk, grad, margins,
    correct)``: the global risk and gradient, this process's margins, and the global count
    of correctly classified examples (``diralign.distributed``; margins are gathered at log
    points).
    """

    def __init__(
        self,
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        loss: str,
        degree: Optional[int],
        chunk_size: Optional[int] = None,
        reducer: Optional[Callable] = None,
        n_total: Optional[int] = None,
    ):
        self.model = model
        self.X = X
        self.y = y
        self.loss = losses.canonical_loss(loss)
        self.degree = degree
        self.chunk_size = chunk_size
        self.reducer = reducer
        self.shard: Optional[tuple[int, int]] = None  # (start, stop) of X within all n examples (distributed)
        self.n = int(n_total if n_total is not None else X.shape[0])
        self.named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in self.named]
        self.shapes = [p.shape for _, p in self.named]
        self.sizes = [p.numel() for _, p in self.named]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.dim = self.offsets[-1]
        first = self.named[0][1] if self.named else torch.zeros(())
        self.dtype = first.dtype
        self.device = first.device
        self.buffers = {name: b for name, b in model.named_buffers()}
        self.multiclass = y.dtype in (torch.int64, torch.int32)

    def sharded(self, start: int, stop: int, reducer: Callable) -> Problem:
        """This problem on examples ``[start, stop)`` only, its oracle combined by ``reducer``."""
        # clone(): keep only the shard alive (the full data may be freed).
        shard = Problem(self.model, self.X[start:stop].clone(), self.y[start:stop].clone(), self.loss, self.degree,
                        self.chunk_size, reducer=reducer, n_total=self.n)
        shard.shard = (start, stop)
        return shard

    # -- parameters ---------------------------------------------------------------
    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for _, p in self.named]).clone()

    def unflatten(self, w: torch.Tensor) -> dict:
        return {
            name: w[a:b].view(shape)
            for name, shape, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])
        }

    def blocks(self, w: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [(name, w[a:b]) for name, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:])]

    def load_into_model(self, w: torch.Tensor) -> nn.Module:
        with torch.no_grad():
            for (_, p), view in zip(self.named, self.unflatten(w).values()):
                p.copy_(view)
        return self.model

    # -- the oracle ---------------------------------------------------------------
    def forward(self, w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        params = self.unflatten(w)
        params.update(self.buffers)
        out = functional_call(self.model, params, (X,))
        if out.ndim == 2 and out.shape[1] == 1:
            out = out[:, 0]
        return out

    def _log_losses_and_margins(self, out: torch.Tensor, y: torch.Tensor):
        if self.multiclass:
            return losses.multiclass_log_losses(out, y, self.loss), losses.multiclass_margins(out, y)
        margins = y * out
        return losses.binary_log_losses(margins, self.loss), margins

    def log_risk_fn(self, w: torch.Tensor, X: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None):
        """``log L(w)`` as a differentiable function (for ``torch.func`` transforms)."""
        X = self.X if X is None else X
        y = self.y if y is None else y
        log_losses, _ = self._log_losses_and_margins(self.forward(w, X), y)
        return torch.logsumexp(log_losses, dim=0)

    def _evaluate_chunk(self, w, X, y, need_grad):
        if need_grad:
            w = w.detach().requires_grad_(True)
            with torch.enable_grad():
                log_losses, margins = self._log_losses_and_margins(self.forward(w, X), y)
                lr = torch.logsumexp(log_losses, dim=0)
                (grad,) = torch.autograd.grad(lr, w)
            return lr.detach(), grad, margins.detach()
        with torch.no_grad():
            log_losses, margins = self._log_losses_and_margins(self.forward(w, X), y)
            return torch.logsumexp(log_losses, dim=0), None, margins

    def evaluate(self, w: torch.Tensor, need_grad: bool = True) -> Evaluation:
        n_local = self.X.shape[0]
        size = self.chunk_size or n_local
        pieces = [
            self._evaluate_chunk(w, self.X[a : a + size], self.y[a : a + size], need_grad)
            for a in range(0, n_local, size)
        ]
        log_risk, grad, margins = combine_log_space(pieces)
        if self.reducer is not None:
            # A distributed reducer keeps this shard's margins and returns the global count.
            log_risk, grad, margins, correct = self.reducer(log_risk, grad, margins)
        else:
            correct = int((margins > 0).sum())
        return Evaluation(log_risk=float(log_risk), grad=grad, margins=margins, correct=int(correct))

    def evaluate_subset(self, w: torch.Tensor, index: torch.Tensor, need_grad: bool = True) -> Evaluation:
        """The oracle on the examples ``index`` only (an SGD minibatch), chunked.

        ``log_risk`` is ``log L_B = log sum_{i in B} l(p_i)`` (unnormalised, like ``L``) and
        ``grad`` is ``grad log L_B``.  ``index`` numbers examples of the whole data set: under
        torch.distributed (``shard`` set) each process evaluates the members of ``B`` it holds
        and the reducer combines them, so every process gets the whole minibatch's values.
        """
        index = index.to(self.X.device)
        if self.shard is not None:
            start, stop = self.shard
            index = index[(index >= start) & (index < stop)] - start
        size = self.chunk_size or max(index.numel(), 1)
        pieces = [
            self._evaluate_chunk(w, self.X[part], self.y[part], need_grad) for part in index.split(size)
        ]
        if not pieces:  # no member of B on this process: L_r = 0
            pieces = [(w.new_tensor(float("-inf")), w.new_zeros(self.dim) if need_grad else None, w.new_zeros(0))]
        log_risk, grad, margins = combine_log_space(pieces)
        if self.reducer is not None:
            log_risk, grad, margins, correct = self.reducer(log_risk, grad, margins)
        else:
            correct = int((margins > 0).sum())
        return Evaluation(log_risk=float(log_risk), grad=grad, margins=margins, correct=int(correct))


def combine_log_space(pieces):
    """Combine ``(log L_c, grad log L_c, margins_c)`` of disjoint pieces exactly.

    ``log L = logsumexp_c log L_c`` and ``grad log L = sum_c softmax_c(log L) grad_c``:
    the weights are at most 1, so nothing underflows that matters and nothing overflows.
    """
    if len(pieces) == 1:
        return pieces[0]
    logs = torch.stack([p[0] for p in pieces])
    total = torch.logsumexp(logs, dim=0)
    grad = None
    if pieces[0][1] is not None:
        weights = torch.exp(logs - total)
        grad = sum(wt * p[1] for wt, p in zip(weights, pieces))
    margins = torch.cat([p[2] for p in pieces])
    return total, grad, margins
