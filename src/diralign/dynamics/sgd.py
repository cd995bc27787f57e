"""The paper's SGD for Figures 2 and 3 (Appendix A): minibatches, step scaled by 1/L.

    diralign run margins --set dynamics=sgd --set batch_size=512 --set eta=1

One ``step`` is one epoch: a seeded shuffle of all n examples, then for each minibatch
``B`` of ``batch_size`` examples

    W <- W - eta * exp(log L_B - log L_full) * grad log L_B   (= eta * grad L_B / L_full),

where ``L_full`` is the full-data risk at the start of the epoch (the "last full-data risk
estimate"); no momentum, no weight decay, no augmentation.  Over an epoch the updates add
up to about ``eta * grad log L_full``, so ``eta`` means what it means for ``gd``.  Why an
epoch: the trainer's clock ``ln(n/L)``, its goals and its log points need the full-data
risk, which costs a pass over the data; taking it once per epoch keeps that overhead at one
forward pass (the full gradient, needed only for alignment, is added at log points).

Safeguards, as in the paper: an update longer than ``max_update_ratio * ||W||`` shrinks
``eta`` until it fits; an epoch whose minibatch risk is non-finite, or whose full-data risk
at the end is non-finite or higher than at the start, is rejected: ``W`` is restored, ``eta``
(as capped at the epoch's starting point, not by the caps of points it overshot to) halved
and the epoch redone with the next shuffle.  Accepted epochs grow ``eta`` by
``eta_growth``.  Rejected epochs are counted and never logged as progress.  With
``accept_window = m > 1`` (default 1; ``margins`` uses 10) "higher than at the start" becomes
"higher than the highest risk of the last ``m`` accepted epochs": the non-monotone
safeguard of Grippo, Lampariello & Lucidi (1986), which lets the step ride the edge of
stability instead of shrinking with the network's sharpness.

Deterministic and resumable: the shuffles come from a private seeded generator whose state
is in ``state_dict`` (checkpoints are taken between epochs).  With ``batch_size >= n`` each
epoch is one full-batch step, so the full gradient is kept and reused by the next epoch.
``grad_evals`` counts full-data gradient equivalents (a forward-only risk check counts 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from ..options import Options, option
from ..runtime import RuntimeOptions
from .base import Dynamics, StepResult, finite
from .gd import StepOptions


@dataclass
class SGDOptions(Options):
    SECTION = "dynamics: sgd"
    batch_size: int = option(512, "minibatch size (the paper's 512); one step is one epoch")
    accept_window: int = option(
        1, "an epoch is accepted if its risk is at most the highest of the last this-many accepted epochs (1: monotone)"
    )

    def validate(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.accept_window < 1:
            raise UserError(
                f"accept_window must be >= 1 (1: every epoch must lower the risk), got {self.accept_window}"
            )


class MinibatchSGD(Dynamics):
    name = "sgd"

    def __init__(self, problem, config):
        super().__init__(problem, config)
        step, options = StepOptions.from_config(config), SGDOptions.from_config(config)
        self.eta = step.eta
        self.batch_size = options.batch_size
        self.growth = step.eta_growth
        self.max_update_ratio = step.max_update_ratio
        self.window = options.accept_window
        self.generator = torch.Generator().manual_seed(RuntimeOptions.from_config(config).seed + 20_200_612)
        self.capped_updates = 0  # minibatch updates that hit the norm cap
        self.recent: list[float] = []  # log L after the last `window` accepted epochs

    def state_dict(self) -> dict:
        return {
            "eta": self.eta,
            "generator": self.generator.get_state(),
            "capped_updates": self.capped_updates,
            "recent": list(self.recent),
        }

    def load_state_dict(self, state: dict) -> None:
        self.eta = float(state["eta"])
        self.generator.set_state(state["generator"])
        self.capped_updates = int(state.get("capped_updates", 0))
        self.recent = [float(v) for v in state.get("recent", [])]

    def _minibatch(self, w, batch):
        self.check_abort()
        return self.problem.minibatch(w, batch)

    @property
    def full_batch(self) -> bool:
        return self.batch_size >= self.problem.n

    def _epoch(self, w: torch.Tensor, ev, order: torch.Tensor):
        """One pass over ``order`` in minibatches; ``None`` if a minibatch went non-finite.

        The controller (``eta``, the norm cap, the finiteness check) runs on the device as
        0-dim float64 tensors, and the host reads it back once, at the end of the epoch: a
        ``float()`` per minibatch would make the host wait for the device after every
        update instead of queueing the next minibatch (on a GPU the epoch would be bounded
        by launch latency).  The arithmetic is the same as on the host: float64 scalars,
        ``eta *= 0.99 * cap / length`` when an update is longer than the cap.  A non-finite
        minibatch is noticed at the end of the epoch rather than at once; the epoch is
        rejected either way.
        """
        log_full = ev.log_risk
        batches = list(order.to(w.device).split(self.batch_size))
        if len(batches) > 1 and batches[-1].numel() == 1:
            # A last minibatch of one example: batch norm cannot normalise it, merge it.
            batches[-2:] = [torch.cat(batches[-2:])]
        f64 = dict(dtype=torch.float64, device=w.device)
        eta = torch.tensor(self.eta, **f64)
        capped = torch.zeros((), dtype=torch.int64, device=w.device)
        ok = torch.ones((), dtype=torch.bool, device=w.device)
        eta_at_start_point = None
        for batch in batches:
            if self.full_batch and ev.grad is not None:
                # the whole data at the epoch's start
                log_batch, grad = torch.tensor(ev.log_risk, **f64), ev.grad
            else:
                log_batch, grad = self._minibatch(w, batch)
                self._spent += batch.numel() / self.problem.n
            scale = torch.exp(torch.clamp(log_batch.to(torch.float64) - log_full, max=700.0))
            length = eta * scale * grad.norm().to(torch.float64)
            cap = self.max_update_ratio * w.norm().to(torch.float64)
            over = (length > cap) & (cap > 0)
            eta = torch.where(over, eta * (0.99 * cap / length), eta)
            capped += over
            # ||grad|| is finite iff every entry is, and scale iff log L_B is (or -inf: L_B = 0).
            ok &= torch.isfinite(length)
            w = w - (eta * scale).to(w.dtype) * grad
            if eta_at_start_point is None:
                eta_at_start_point = eta
        self.capped_updates += int(capped)
        # Which caps outlive the epoch (``step``): all of them if it is accepted; if it is
        # rejected, only a cap of its first minibatch, taken at the epoch's starting point (the
        # only one in a full-batch epoch), not those taken at points the epoch overshot to.
        self._eta_after_epoch = float(eta) if math.isfinite(float(eta)) else self.eta
        first = float(eta_at_start_point) if eta_at_start_point is not None else self.eta
        self._eta_if_rejected = first if math.isfinite(first) else self.eta
        return w if bool(ok) else None

    def _check(self, w_new, with_grad: bool):
        """The end-of-epoch risk at ``w_new`` (``None`` if non-finite); with its gradient when
        the next epoch (full batch) or a log point wants it.

        The gradient is taken only once the risk has passed the test: where the data fit in
        one chunk, the forward pass keeps its graph and the backward pass runs on acceptance
        (a rejected epoch costs a forward pass, not a forward and a backward pass); with more
        chunks, keeping every chunk's graph would give up the memory bound, so the gradient
        comes with the pass.
        """
        self.check_abort()
        if not with_grad:
            new = self.observed(self.problem.evaluate(w_new, need_grad=False))
            return new if finite(new) else None
        new, gradient = self.problem.evaluate_deferred(w_new)
        self.observed(new)  # the full-data risk, for the trainer's stall goal
        if not math.isfinite(new.log_risk):
            return None
        new.grad = gradient()
        self._spent += 1.0
        return new if finite(new) else None

    def step(self, w, ev, target: Optional[float] = None) -> StepResult:
        # Shuffle all n examples (identically on every rank under torch.distributed, where
        # evaluate_subset lets each rank evaluate its part of B and reduces the parts).
        n_total = self.problem.n
        rejected = 0
        self._spent = 0.0
        self.recent = (self.recent + [ev.log_risk])[-self.window :]
        bound = max(self.recent)
        while True:
            order = torch.randperm(n_total, generator=self.generator)
            w_new = self._epoch(w, ev, order)
            if w_new is not None:
                new = self._check(w_new, with_grad=self.full_batch or self.gradient_wanted)
                if new is not None and new.log_risk <= bound:
                    self.eta = self._eta_after_epoch * self.growth
                    return StepResult(w_new, new, round(self._spent), rejected)
            rejected += 1
            # Halve the step as capped at the epoch's starting point, not as the later caps left
            # it.  An epoch that overshoots makes a later minibatch's risk exceed the epoch's
            # starting risk by e^k, and the norm cap then cuts eta by e^k; keeping that cut after
            # the epoch is rejected collapsed eta from 2e-4 to 1e-9 in one epoch on H-AlexNet with
            # all digits (ln(n/L) = 16.7), after which each epoch gained ~1e-4 in ln(n/L).  The
            # first minibatch's cap is kept: in a full-batch epoch it is the only one, and
            # forgetting it doubled the epochs to ln(n/L) = 25 on 512 digits.
            self.eta = 0.5 * self._eta_if_rejected
            if self.eta < 1e-300:
                raise FloatingPointError("sgd: step size underflowed; no epoch lowers the risk")
