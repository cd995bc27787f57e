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
        return self._call(self.unflatten(w), X)

    def _call(self, params: dict, X: torch.Tensor) -> torch.Tensor:
        params = dict(params)
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

    def _log_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multiclass:
            return losses.multiclass_log_losses(out, y, self.loss)
        return losses.binary_log_losses(y * out, self.loss)

    def log_risk_fn(self, w: torch.Tensor, X: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None):
        """``log L(w)`` as a differentiable function (for ``torch.func`` transforms)."""
        X = self.X if X is None else X
        y = self.y if y is None else y
        log_losses, _ = self._log_losses_and_margins(self.forward(w, X), y)
        return torch.logsumexp(log_losses, dim=0)

    def _leaves(self, w: torch.Tensor) -> list:
        """Each parameter tensor as its own autograd leaf, a detached view of ``w``.

        Why not differentiate w.r.t. the flat ``w`` itself: the backward of each slice
        ``w[a:b]`` materialises a zero tensor of all P entries and adds it up, O(#tensors * P)
        per backward pass -- measured 1-3 s per minibatch on ResNet-18 (62 tensors, 11M
        entries), more than its forward and backward together.  Gradients of leaves come back
        one per tensor and are concatenated once (one copy of P, like an optimizer's update).
        """
        return [w[a:b].view(shape).detach().requires_grad_(True)
                for shape, a, b in zip(self.shapes, self.offsets[:-1], self.offsets[1:])]

    def _flat_grad(self, grads, leaves) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, leaves)])

    def _evaluate_chunk(self, w, X, y, need_grad, want_margins=True):
        if need_grad:
            leaves = self._leaves(w)
            with torch.enable_grad():
                out = self._call(dict(zip(self.names, leaves)), X)
                if want_margins:
                    log_losses, margins = self._log_losses_and_margins(out, y)
                else:
                    log_losses, margins = self._log_losses(out, y), None
                lr = torch.logsumexp(log_losses, dim=0)
                grads = torch.autograd.grad(lr, leaves, allow_unused=True)
            return lr.detach(), self._flat_grad(grads, leaves), None if margins is None else margins.detach()
        # (torch.inference_mode() measured no faster than no_grad here: benchmarks/RESULTS.md)
        with torch.no_grad():
            log_losses, margins = self._log_losses_and_margins(self.forward(w, X), y)
            return torch.logsumexp(log_losses, dim=0), None, margins

    def _accumulate(self, w, parts, need_grad, want_margins=True):
        """Evaluate the chunks ``parts`` (``(X_c, y_c)`` pairs) one after the other and fold
        them in log space as they come, so at most one chunk's activations and two
        gradient-sized buffers are alive: peak memory is set by ``chunk_size``, not ``n``."""
        total = LogSpaceSum()
        for X, y in parts:
            total.add(*self._evaluate_chunk(w, X, y, need_grad, want_margins))
        return total.result()

    def evaluate(self, w: torch.Tensor, need_grad: bool = True) -> Evaluation:
        n_local = self.X.shape[0]
        size = self.chunk_size or n_local
        parts = ((self.X[a : a + size], self.y[a : a + size]) for a in range(0, n_local, size))
        log_risk, grad, margins = self._accumulate(w, parts, need_grad)
        if self.reducer is not None:
            # A distributed reducer keeps this shard's margins and returns the global count.
            log_risk, grad, margins, correct = self.reducer(log_risk, grad, margins)
        else:
            correct = int((margins > 0).sum())
        return Evaluation(log_risk=float(log_risk), grad=grad, margins=margins, correct=int(correct))

    def evaluate_deferred(self, w: torch.Tensor) -> tuple[Evaluation, Callable[[], torch.Tensor]]:
        """:meth:`evaluate` in two halves: the evaluation without its gradient now, and a
        function that returns the gradient (the same numbers as ``evaluate(w).grad``).

        With the data in one chunk the forward pass keeps its graph, so the gradient costs
        only the backward pass, and nothing if it is never asked for (a rejected step).
        Otherwise (several chunks, or distributed) the gradient is computed with the pass.
        """
        if self.reducer is not None or (self.chunk_size and self.X.shape[0] > self.chunk_size):
            ev = self.evaluate(w, need_grad=True)
            grad, ev.grad = ev.grad, None
            return ev, lambda: grad
        leaves = self._leaves(w)
        with torch.enable_grad():
            log_losses, margins = self._log_losses_and_margins(self._call(dict(zip(self.names, leaves)), self.X), self.y)
            lr = torch.logsumexp(log_losses, dim=0)
        margins = margins.detach()
        ev = Evaluation(log_risk=float(lr.detach()), grad=None, margins=margins, correct=int((margins > 0).sum()))

        def gradient() -> torch.Tensor:
            return self._flat_grad(torch.autograd.grad(lr, leaves, allow_unused=True), leaves)

        return ev, gradient

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
        parts = [(self.X[part], self.y[part]) for part in index.split(size)]
        if parts:
            log_risk, grad, margins = self._accumulate(w, parts, need_grad)
        else:  # no member of B on this process: L_r = 0
            log_risk, grad, margins = w.new_tensor(float("-inf")), w.new_zeros(self.dim) if need_grad else None, w.new_zeros(0)
        if self.reducer is not None:
            log_risk, grad, margins, correct = self.reducer(log_risk, grad, margins)
        else:
            correct = int((margins > 0).sum())
        return Evaluation(log_risk=float(log_risk), grad=grad, margins=margins, correct=int(correct))

    def minibatch(self, w: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log L_B, grad log L_B)`` as tensors on the problem's device: the sgd hot path.

        The same numbers as :meth:`evaluate_subset`, without what a minibatch step does not
        use: no margins, no count of correct examples, and no host round trip (``float()``,
        ``int()`` would make the host wait for the device after every minibatch, so it
        could never queue the next one).  ``index`` should already be on the device.
        Under torch.distributed the reducer's collectives synchronise anyway, so that case
        goes through :meth:`evaluate_subset`.
        """
        if self.reducer is not None or self.shard is not None:
            ev = self.evaluate_subset(w, index)
            return w.new_tensor(ev.log_risk, dtype=torch.float64), ev.grad
        size = self.chunk_size or max(index.numel(), 1)
        parts = [(self.X[part], self.y[part]) for part in index.split(size)]
        log_risk, grad, _ = self._accumulate(w, parts, need_grad=True, want_margins=False)
        return log_risk, grad


class LogSpaceSum:
    """Running ``log sum_c L_c`` and ``grad log sum_c L_c`` of pieces added one at a time.

    Keeps ``top = max_c log L_c``, ``scaled = sum_c exp(log L_c - top)`` and
    ``grad = sum_c exp(log L_c - top) grad log L_c``; a new maximum rescales both by
    ``exp(top_old - top_new) <= 1``.  Every weight is at most 1, so nothing overflows, and
    ``L`` itself (far below float64's range late in training) is never formed.  One piece is
    returned bit for bit as it came.
    """

    def __init__(self):
        self.top = self.scaled = self.grad = None
        self.margins = []
        self.count = 0

    def add(self, log_risk, grad, margins) -> None:
        self.count += 1
        if margins is not None:
            self.margins.append(margins)
        if self.top is None:
            self.top, self.grad = log_risk, grad
            self.scaled = torch.ones_like(log_risk)
            return
        top = torch.maximum(self.top, log_risk)
        # exp(-inf - -inf) is NaN: a piece with L_c = 0 (-inf) against an all-zero sum.
        empty = torch.isneginf(top)
        old = torch.where(empty, torch.ones_like(top), torch.exp(self.top - top))
        new = torch.where(empty, torch.zeros_like(top), torch.exp(log_risk - top))
        self.scaled = self.scaled * old + new
        if self.grad is not None:
            if self.count == 2:
                self.grad = self.grad.clone()  # the first piece's tensor may belong to the caller
            self.grad.mul_(old.to(self.grad.dtype)).add_(grad * new.to(grad.dtype))
        self.top = top

    def result(self):
        margins = self.margins[0] if len(self.margins) == 1 else (torch.cat(self.margins) if self.margins else None)
        if self.count == 1:
            return self.top, self.grad, margins
        total = self.top + torch.log(self.scaled)
        grad = None if self.grad is None else self.grad / self.scaled.to(self.grad.dtype)
        return total, grad, margins


def combine_log_space(pieces):
    """Combine ``(log L_c, grad log L_c, margins_c)`` of disjoint pieces exactly.

    ``log L = logsumexp_c log L_c`` and ``grad log L = sum_c softmax_c(log L) grad_c``, folded
    in order by :class:`LogSpaceSum` -- the same operations a chunked evaluation performs, so
    a distributed reduction in rank order is bit-identical to chunks of the same sizes.
    """
    total = LogSpaceSum()
    for piece in pieces:
        total.add(*piece)
    return total.result()
