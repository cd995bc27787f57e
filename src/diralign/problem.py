"""The training problem as an oracle on a flat parameter vector.

Every dynamics and every probe talks to a :class:`Problem`: given the flat vector
``w`` of all trainable parameters it returns ``log L``, ``grad log L`` and the
per-example margins, from one forward and one backward pass.  Data may be split into
chunks (bounded memory) or shards (``torch.distributed``); the pieces are combined in
log space, ``log L = logsumexp_c log L_c`` and
``grad log L = sum_c exp(log L_c - log L) grad log L_c``, which is exact because
``L = sum_c L_c`` and ``grad L = sum_c grad L_c`` (divide both by ``L``).

Hessian-vector products of ``log L`` (the CVODE flow's exact J*v, :meth:`Problem.curvature`)
combine the same way.  With ``pi_c = exp(log L_c - log L)`` (so ``g = sum_c pi_c g_c``) and
``grad pi_c = pi_c (g_c - g)``, differentiating ``g`` once more gives

    H = sum_c pi_c (H_c + g_c g_c^T) - g g^T = sum_c pi_c (H_c + d_c d_c^T),   d_c = g_c - g,

exact like the gradient: each piece contributes its own ``H_c v`` (by double backward on its
own graph), and the rest needs only the pieces' gradients, already at hand (the centred form
is the one computed: it has no cancellation, see :func:`combine_hvp`).
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


@dataclass
class Curvature:
    """``log L`` and ``g = grad log L`` at ``w``, with exact Hessian-vector products there.

    ``hvp(v)`` returns ``H v`` (``H = grad^2 log L`` over all ``n`` examples: every chunk
    and, under torch.distributed, every process).  A problem in one piece keeps its graph
    between products; a chunked one rebuilds each chunk's graph per product, so that memory
    stays that of one chunk (three gradient-equivalents of work per product instead of two).
    Under torch.distributed every process must call ``hvp`` alike (it is a collective).
    """

    w: torch.Tensor
    log_risk: float
    grad: torch.Tensor
    hvp: Callable[[torch.Tensor], torch.Tensor]


def is_multiclass_output(out: torch.Tensor) -> bool:
    return out.ndim == 2 and out.shape[1] >= 2


class Problem:
    """Model + data + loss, seen through a flat parameter vector.

    The data are evaluated in *pieces* (contiguous example ranges, :meth:`split`), each on
    its own (in chunks of ``chunk_size`` for bounded memory) and combined in log space in
    piece order.  Under torch.distributed (:meth:`sharded`) each process holds a contiguous
    run of pieces and the rows of all pieces are all-gathered and combined in the same order,
    so a run gives the same bits on any number of processes: the pieces are the run's (fixed
    when it starts), the processes only share them out.  Evaluations return the global risk,
    gradient and count of correctly classified examples, and this process's margins
    (``diralign.distributed`` gathers them at log points).
    """

    def __init__(
        self,
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        loss: str,
        degree: Optional[int],
        chunk_size: Optional[int] = None,
        n_total: Optional[int] = None,
        pieces: Optional[list[tuple[int, int]]] = None,
        gather: Optional[Callable] = None,
        piece_counts: Optional[list[int]] = None,
    ):
        self.model = model
        self.X = X
        self.y = y
        self.loss = losses.canonical_loss(loss)
        self.degree = degree
        self.chunk_size = chunk_size
        # The pieces of this process (local example ranges), each evaluated on its own and
        # combined in order; the whole data in one piece unless split (see split, sharded).
        self.pieces = list(pieces) if pieces is not None else [(0, int(X.shape[0]))]
        # gather(tensor, what) -> [W, *tensor.shape], every process's tensor in rank order
        # (the distributed coordinator's all-gather), and the number of pieces of each process.
        self.gather = gather
        self.piece_counts = piece_counts
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

    def split(self, count: int) -> Problem:
        """This problem evaluated in ``count`` contiguous pieces (:func:`piece_bounds`)."""
        return Problem(
            self.model,
            self.X,
            self.y,
            self.loss,
            self.degree,
            self.chunk_size,
            n_total=self.n,
            pieces=piece_bounds(self.X.shape[0], count),
        )

    def sharded(self, pieces: list[tuple[int, int]], gather: Callable, piece_counts: list[int]) -> Problem:
        """This process's share of the data: the contiguous run of ``pieces`` (global example
        ranges), combined with every other process's through ``gather`` (an all-gather in rank
        order); ``piece_counts`` says how many pieces each process holds."""
        start = pieces[0][0] if pieces else 0
        stop = pieces[-1][1] if pieces else 0
        # clone(): keep only the shard alive (the full data may be freed).
        shard = Problem(
            self.model,
            self.X[start:stop].clone(),
            self.y[start:stop].clone(),
            self.loss,
            self.degree,
            self.chunk_size,
            n_total=self.n,
            pieces=[(a - start, b - start) for a, b in pieces],
            gather=gather,
            piece_counts=piece_counts,
        )
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

    def log_risk_fn(self, w: torch.Tensor, X: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None):
        """``log L(w)`` as a differentiable function (for ``torch.func`` transforms)."""
        X = self.X if X is None else X
        y = self.y if y is None else y
        log_losses, _ = self._log_losses_and_margins(self.forward(w, X), y)
        return torch.logsumexp(log_losses, dim=0)

    def _log_losses(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.multiclass:
            return losses.multiclass_log_losses(out, y, self.loss)
        return losses.binary_log_losses(y * out, self.loss)

    def _leaves(self, w: torch.Tensor) -> list:
        """Each parameter tensor as its own autograd leaf, a detached view of ``w``.

        Why not differentiate w.r.t. the flat ``w`` itself: the backward of each slice
        ``w[a:b]`` materialises a zero tensor of all P entries and adds it up, O(#tensors * P)
        per backward pass -- measured 1.45x the whole minibatch gradient on ResNet-18 (62
        tensors, 11M entries; benchmarks/RESULTS.md).  Gradients of leaves come back one per
        tensor and are concatenated once (one copy of P, like an optimizer's update).
        """
        return [
            w[a:b].view(shape).detach().requires_grad_(True)
            for shape, a, b in zip(self.shapes, self.offsets[:-1], self.offsets[1:])
        ]

    def _flat_grad(self, grads, leaves) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, leaves)])

    def _evaluate_chunk(self, w, X, y, need_grad, want_margins: bool = True):
        if need_grad:
            leaves = self._leaves(w)
            with torch.enable_grad():
                out = self._call(dict(zip(self.names, leaves)), X)
                if want_margins:
                    log_losses, margins = self._log_losses_and_margins(out, y)
                else:  # the sgd hot path: a minibatch step uses no margins
                    log_losses, margins = self._log_losses(out, y), None
                lr = torch.logsumexp(log_losses, dim=0)
                grads = torch.autograd.grad(lr, leaves, allow_unused=True)
            return lr.detach(), self._flat_grad(grads, leaves), None if margins is None else margins.detach()
        # (torch.inference_mode() measured no faster than no_grad here: benchmarks/RESULTS.md)
        with torch.no_grad():
            log_losses, margins = self._log_losses_and_margins(self.forward(w, X), y)
            return torch.logsumexp(log_losses, dim=0), None, margins

    def _evaluate_rows(self, w, rows: Optional[torch.Tensor], a: int, b: int, need_grad: bool):
        """One piece: examples ``[a, b)`` (or the local indices ``rows``), in chunks."""
        if rows is None:
            size = self.chunk_size or max(b - a, 1)
            parts = [(self.X[i : min(i + size, b)], self.y[i : min(i + size, b)]) for i in range(a, b, size)]
        else:
            size = self.chunk_size or max(rows.numel(), 1)
            parts = [(self.X[part], self.y[part]) for part in rows.split(size)]
        if not parts:  # no example of the piece (a minibatch may miss it): L_p = 0
            return (w.new_tensor(float("-inf")), w.new_zeros(self.dim) if need_grad else None, w.new_zeros(0))
        return self._fold_chunks(w, parts, need_grad)

    def _fold_chunks(self, w, parts, need_grad: bool, want_margins: bool = True):
        """The chunks ``parts`` evaluated one after the other and folded in log space as they
        come (:class:`LogSpaceSum`, the same operations as :func:`combine_log_space`): at most
        one chunk's activations and two gradient-sized buffers are alive, so peak memory is
        set by ``chunk_size``, not by ``n`` (a list of the chunks' gradients would hold
        ``n / chunk_size`` of them: 2.2 GB for ResNet-18 on 50,000 images)."""
        total = LogSpaceSum()
        for X, y in parts:
            total.add(*self._evaluate_chunk(w, X, y, need_grad, want_margins))
        return total.result()

    def _combine(self, pieces, need_grad: bool) -> Evaluation:
        """The pieces of this process (and, under torch.distributed, of every process) combined
        flat, in global piece order: the same floating-point operations for any process count."""
        margins = torch.cat([p[2] for p in pieces]) if pieces else self.X.new_zeros(0)
        if self.gather is None:
            log_risk, grad, _ = combine_log_space(pieces)
            return Evaluation(log_risk=float(log_risk), grad=grad, margins=margins, correct=int((margins > 0).sum()))
        rows = self._gather_pieces(
            [
                torch.cat(
                    [
                        torch.stack([lr.to(torch.float64), (m > 0).sum().to(torch.float64)]).to(m.device),
                        *([g.to(torch.float64)] if need_grad else []),
                    ]
                )
                for lr, g, m in pieces
            ],
            2 + (self.dim if need_grad else 0),
            margins.device,
        )
        log_risk, grad, _ = combine_log_space([(r[0], r[2:] if need_grad else None, None) for r in rows.unbind(0)])
        if grad is not None:
            grad = grad.to(device=self.device, dtype=self.dtype)
        return Evaluation(log_risk=float(log_risk), grad=grad, margins=margins, correct=int(rows[:, 1].sum().item()))

    def _gather_pieces(self, rows: list, width: int, device) -> torch.Tensor:
        """``[P, width]``: the rows of every piece of every process, in global piece order
        (each process holds a contiguous run of pieces; shorter runs are padded for the gather)."""
        most = max(self.piece_counts)
        packed = torch.zeros((most, width), dtype=torch.float64, device=device)
        for i, row in enumerate(rows):
            packed[i] = row.to(device)
        everyone = self.gather(packed.reshape(-1), "the gradient all-gather").reshape(
            len(self.piece_counts), most, width
        )
        return torch.cat([everyone[r, :count] for r, count in enumerate(self.piece_counts)])

    def evaluate(self, w: torch.Tensor, need_grad: bool = True) -> Evaluation:
        """``log L``, ``grad log L`` (``need_grad``), this process's margins and the global
        count of correctly classified examples, from this process's pieces of the data."""
        return self._combine([self._evaluate_rows(w, None, a, b, need_grad) for a, b in self.pieces], need_grad)

    def evaluate_subset(self, w: torch.Tensor, index: torch.Tensor, need_grad: bool = True) -> Evaluation:
        """The oracle on the examples ``index`` only (an SGD minibatch), chunked.

        ``log_risk`` is ``log L_B = log sum_{i in B} l(p_i)`` (unnormalised, like ``L``) and
        ``grad`` is ``grad log L_B``.  ``index`` numbers examples of the whole data set; each
        piece evaluates the members of ``B`` it holds (in ``B``'s order) and the pieces are
        combined as in :meth:`evaluate`, so that under torch.distributed every process gets
        the whole minibatch's values, the same as one process with the same pieces.
        """
        index = index.to(self.X.device)
        start = self.shard[0] if self.shard is not None else 0
        pieces = []
        for a, b in self.pieces:
            rows = index[(index >= start + a) & (index < start + b)] - start
            pieces.append(self._evaluate_rows(w, rows, a, b, need_grad))
        return self._combine(pieces, need_grad)

    @property
    def _one_piece(self) -> bool:
        """One process, the data in one piece: nothing to combine across pieces."""
        return self.gather is None and self.pieces == [(0, int(self.X.shape[0]))]

    def minibatch(self, w: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log L_B, grad log L_B)`` as tensors on the problem's device: the sgd hot path.

        The same numbers as :meth:`evaluate_subset`, without what a minibatch step does not
        use: no margins, no count of correct examples, no selection of each piece's members
        (a boolean mask has a data-dependent size), and so no host round trip: ``float()``,
        ``int()`` or a mask would make the host wait for the device after every minibatch,
        so it could never queue the next one.  ``index`` should already be on the device.
        Split or distributed problems go through :meth:`evaluate_subset` (their collectives
        synchronise anyway).
        """
        if not self._one_piece:
            ev = self.evaluate_subset(w, index)
            return w.new_tensor(ev.log_risk, dtype=torch.float64), ev.grad
        size = self.chunk_size or max(index.numel(), 1)
        parts = [(self.X[part], self.y[part]) for part in index.split(size)]
        log_risk, grad, _ = self._fold_chunks(w, parts, need_grad=True, want_margins=False)
        return log_risk, grad

    def evaluate_deferred(self, w: torch.Tensor) -> tuple[Evaluation, Callable[[], torch.Tensor]]:
        """:meth:`evaluate` in two halves: the evaluation without its gradient now, and a
        function that returns the gradient (the same numbers as ``evaluate(w).grad``).

        With the data in one chunk of one piece the forward pass keeps its graph, so the
        gradient costs only the backward pass, and nothing if it is never asked for (a
        rejected step).  Otherwise the gradient is computed with the pass.
        """
        if not self._one_piece or (self.chunk_size and self.X.shape[0] > self.chunk_size):
            ev = self.evaluate(w, need_grad=True)
            grad, ev.grad = ev.grad, None
            return ev, lambda: grad
        leaves = self._leaves(w)
        with torch.enable_grad():
            log_losses, margins = self._log_losses_and_margins(
                self._call(dict(zip(self.names, leaves)), self.X), self.y
            )
            lr = torch.logsumexp(log_losses, dim=0)
        margins = margins.detach()
        ev = Evaluation(log_risk=float(lr.detach()), grad=None, margins=margins, correct=int((margins > 0).sum()))

        def gradient() -> torch.Tensor:
            return self._flat_grad(torch.autograd.grad(lr, leaves, allow_unused=True), leaves)

        return ev, gradient

    # -- curvature (exact Hessian-vector products) -------------------------------------
    def _gradient_graph(self, w: torch.Tensor, a: int, b: int):
        """``(leaf, log L_c, g_c)`` on examples ``[a, b)``, ``g_c`` differentiable once more."""
        leaf = w.detach().requires_grad_(True)  # w is curvature()'s own copy: nothing changes it
        with torch.enable_grad():
            log_risk = self.log_risk_fn(leaf, self.X[a:b], self.y[a:b])
            (g,) = torch.autograd.grad(log_risk, leaf, create_graph=True)
        return leaf, log_risk.detach(), g

    def _piece_curvature(self, w: torch.Tensor, a: int, b: int):
        """``(log L_p, g_p, v -> H_p v)`` of the piece ``[a, b)``."""
        size = self.chunk_size or max(b - a, 1)
        chunks = [(i, min(i + size, b)) for i in range(a, b, size)]
        if len(chunks) == 1:
            leaf, log_risk, g = self._gradient_graph(w, a, b)

            def hvp(v):
                (hv,) = torch.autograd.grad(g, leaf, v, retain_graph=True)
                return hv

            return log_risk, g.detach(), hvp
        # Bounded memory: keep each chunk's gradient, rebuild its graph per product.
        graphs = [self._gradient_graph(w, i, j) for i, j in chunks]
        logs = torch.stack([lr for _, lr, _ in graphs])
        grads = [g.detach() for _, _, g in graphs]
        del graphs
        log_risk, grad, _ = combine_log_space([(lr, g, None) for lr, g in zip(logs, grads)])

        def hvp(v):
            products = []
            for i, j in chunks:
                leaf, _, g = self._gradient_graph(w, i, j)
                (hv,) = torch.autograd.grad(g, leaf, v)
                products.append(hv)
            return combine_hvp(logs, grads, products, v, log_risk, grad)

        return log_risk, grad, hvp

    def curvature(self, w: torch.Tensor) -> Curvature:
        """``log L``, ``g`` and exact ``v -> H v`` at ``w`` over all examples: the pieces
        combined as in :meth:`evaluate` (see the module docstring for ``H v``)."""
        # A copy: a caller's buffer (CVODE reuses its vectors) must not change under the graphs.
        w = w.detach().clone()
        local = [self._piece_curvature(w, a, b) for a, b in self.pieces]
        if self.gather is None:
            logs = torch.stack([lr for lr, _, _ in local])
            grads = [g for _, g, _ in local]
            log_total, grad, _ = combine_log_space([(lr, g, None) for lr, g in zip(logs, grads)])

            def hvp(v):
                products = [piece_hvp(v) for _, _, piece_hvp in local]
                return products[0] if len(local) == 1 else combine_hvp(logs, grads, products, v, log_total, grad)

            return Curvature(w, float(log_total), grad, hvp)
        # Processes: [log L_p, g_p] of every piece once, then the H_p v per product.
        device = self.X.device
        rows = self._gather_pieces(
            [torch.cat([lr.to(torch.float64).reshape(1), g.to(torch.float64)]) for lr, g, _ in local],
            1 + self.dim,
            device,
        )
        logs, grads = rows[:, 0], list(rows[:, 1:].unbind(0))
        log_total, grad, _ = combine_log_space([(lr, g, None) for lr, g in zip(logs, grads)])

        def hvp(v):
            mine = [piece_hvp(v).to(torch.float64) for _, _, piece_hvp in local]
            products = self._gather_pieces(mine, self.dim, device)
            v64 = v.to(device=device, dtype=torch.float64)
            out = combine_hvp(logs, grads, list(products.unbind(0)), v64, log_total, grad)
            return out.to(device=self.device, dtype=self.dtype)

        return Curvature(w, float(log_total), grad.to(device=self.device, dtype=self.dtype), hvp)


def piece_bounds(n: int, count: int) -> list[tuple[int, int]]:
    """``count`` contiguous pieces of ``n`` examples: ``[p n // count, (p + 1) n // count)``."""
    return [(p * n // count, (p + 1) * n // count) for p in range(count)]


def combine_hvp(logs: torch.Tensor, grads, products, v: torch.Tensor, log_total, grad: torch.Tensor) -> torch.Tensor:
    """``H v = sum_c pi_c (H_c v + g_c <g_c, v>) - g <g, v>`` from the pieces' ``log L_c``,
    ``g_c`` and ``H_c v`` (``pi_c = exp(log L_c - log L)``, the weights of the gradient).

    Computed centred, ``sum_c pi_c (H_c v + d_c <d_c, v>)`` with ``d_c = g_c - g`` (equal, as
    ``sum_c pi_c = 1`` and ``sum_c pi_c g_c = g``), which subtracts nothing large.  Late in
    training float64 itself limits every form: at ``log L = -8700`` (deep linear) the margins
    carry ~1e-12 absolute rounding, which the softmax weights turn into relative errors, and the
    whole problem's double backward, the centred and the uncentred combination all sit ~2e-11
    from a 45-digit reference (mpmath), 1e-11 from one another."""
    weights = torch.exp(logs - log_total)
    out = 0.0
    for wt, g, hv in zip(weights, grads, products):
        d = g - grad
        out = out + wt * (hv + d * torch.dot(d, v))
    return out


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
    in order by :class:`LogSpaceSum`: the same operations a chunked evaluation performs as its
    chunks come, so pieces combined here and chunks folded on the fly agree bit for bit.
    """
    total = LogSpaceSum()
    for piece in pieces:
        total.add(*piece)
    return total.result()
