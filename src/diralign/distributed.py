"""Data-parallel runs on ``torch.distributed``: one process per device, launched by torchrun.

    torchrun --nproc_per_node=2 -m diralign run deep-linear --set distributed=true --out runs/dl2
    torchrun --nproc_per_node=3 -m diralign resume runs/dl2     # any number of ranks ...
    diralign resume runs/dl2                                     # ... or a single process

Backends: gloo when ``device=cpu``, NCCL when ``device=cuda`` (rank r on ``cuda:LOCAL_RANK``).
torchrun supplies the rendezvous (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...); nothing here
speaks a protocol of its own.

**Sharding.** After the experiment's ``setup`` has built the full data (identically on
every rank: checked by hash), rank ``r`` of ``W`` keeps the contiguous block of examples
``[r*n//W, (r+1)*n//W)``; the others are dropped from its :class:`~diralign.problem.Problem`.
Contiguous blocks make the gathered margins come back in the original example order.

**Reduction (exact).** Each rank evaluates ``log L_r`` and ``grad log L_r`` on its shard.
Because the risk is a sum over examples, ``L = sum_r L_r`` and ``grad L = sum_r grad L_r``;
dividing by ``L`` gives ``log L = logsumexp_r log L_r`` and
``grad log L = sum_r exp(log L_r - log L) grad log L_r``.  No approximation is made: the
weights ``exp(log L_r - log L)`` lie in ``(0, 1]`` and sum to one, so nothing overflows
and ``L`` itself (far below the smallest float64 late in training) is never formed.  This
is the same combination :func:`~diralign.problem.combine_log_space` applies to chunks.

**Determinism.** The per-rank ``[log L_r, correct_r, grad log L_r]`` are *all-gathered*
(not all-reduced) in float64 and combined on every rank in rank order by
``combine_log_space``: every rank executes the same floating-point operations on the same
bytes, so all ranks hold bit-identical ``log L``, gradients and therefore parameters and
step-size decisions.  A ``W``-rank float64 run is bit-identical to a single-process run
with ``chunk_size = n/W`` (``n`` divisible by ``W``).  What remains: against a run
*without* chunks the summation order differs, so results agree to rounding (~1e-16 per
evaluation); an error-controlled integrator can then, rarely, flip an accept/reject
decision that sat on the edge, after which the paths differ by the integrator's tolerance.
The price of all-gather over all-reduce is ``W`` gradient copies per rank per evaluation.

**Margins.** Between log points each rank keeps only its shard's margins; the count of
correctly classified examples is in the same gather (one collective per evaluation).  At
log points, checkpoints and the end, all ``n`` margins are gathered onto every rank (so
callbacks see the same row everywhere; rank 0 writes them).

**Decisions.** Stopping, checkpoint timing and signals are taken from rank 0's clock and
any rank's signal (:meth:`DataParallel.agree`, one tiny collective per step).  At every
checkpoint the parameter hash of each rank is compared; a mismatch is an error.

**Failure.** Every collective has a timeout (``distributed_timeout_seconds``); if a rank
dies or hangs, the others stop with a one-line :class:`DistributedError`.  Only rank 0
writes the run directory, and its checkpoints are atomic and written only after the hash
check passed, so the last checkpoint is always valid and ``resume`` continues from it.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import re
from datetime import timedelta
from typing import Optional

import torch

from .errors import UserError
from .problem import Evaluation, combine_log_space
from .runtime import RuntimeOptions
from .trainer import Coordinator


class DistributedError(UserError):
    """A collective failed or the ranks disagree: one line, no traceback."""


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def coordinator_for(command: str, wanted: bool, device: str, run_dir: Optional[str]) -> Optional[DataParallel]:
    """A :class:`DataParallel` coordinator for a torchrun launch, else ``None`` (single process).

    ``run`` needs ``--set distributed=true`` under torchrun (and torchrun for it);
    ``resume`` is distributed exactly when launched by torchrun, whatever the run used before.
    """
    launched = launched_by_torchrun()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if command == "run":
        if wanted and not launched:
            raise UserError(
                "distributed=true needs a torchrun launch: torchrun --nproc_per_node=N -m diralign run ... --set distributed=true"
            )
        if launched and not wanted:
            if world > 1:
                raise UserError(
                    f"launched by torchrun with {world} processes but distributed is off; add --set distributed=true "
                    "(otherwise every process would train the whole problem into the same directory)"
                )
            return None
        return DataParallel.from_env(run_dir, device) if wanted else None
    if command == "resume" and launched:
        return DataParallel.from_env(run_dir, device)
    return None


class DataParallel(Coordinator):
    """The distributed coordinator of one rank; see the module docstring for the design."""

    # A signal or budget inside a step would stop one rank at one evaluation and the others
    # at another; ranks stop between steps only (agree()).
    aborts_inside_steps = False

    def __init__(self, rank: int, world_size: int, local_rank: int, device: str = "cpu"):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.backend: Optional[str] = None
        self.timeout = 300.0
        self.comm_device = torch.device("cpu")
        self.problem = None
        self.run_dir: Optional[str] = None  # for messages only
        self.bounds: list[tuple[int, int]] = []
        self._sizes: list[int] = []
        self._max_size = 0
        if device.startswith("cuda") and torch.cuda.is_available() and local_rank < torch.cuda.device_count():
            # Before the experiment builds its tensors, so that device=cuda means this rank's GPU.
            torch.cuda.set_device(local_rank)

    @classmethod
    def from_env(cls, run_dir: Optional[str] = None, device: str = "cpu") -> DataParallel:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
        context = cls(rank, world, local, device)
        context.run_dir = None if run_dir is None else str(run_dir)
        return context

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    # -- setup ----------------------------------------------------------------------
    def prepare(self, setup, config):
        """Join the process group, check every rank built the same problem, shard it."""
        import torch.distributed as dist

        problem = setup.problem
        self.timeout = RuntimeOptions.from_config(config).distributed_timeout_seconds
        device = problem.X.device
        if device.type == "cuda":
            if device.index != self.local_rank:
                raise UserError(
                    f"rank {self.rank} put its data on {device} but its GPU is cuda:{self.local_rank}; "
                    "use --set device=cuda (each rank takes cuda:LOCAL_RANK)"
                )
            self.backend, self.comm_device = "nccl", device
        elif device.type == "cpu":
            self.backend, self.comm_device = "gloo", torch.device("cpu")
        else:
            raise UserError(f"distributed runs support device=cpu (gloo) and device=cuda (nccl), not {device.type}")
        if not dist.is_initialized():
            try:
                dist.init_process_group(self.backend, timeout=timedelta(seconds=self.timeout))
            except Exception as exc:
                raise DistributedError(f"rank {self.rank}: could not join the process group ({_first_line(exc)}); launch with torchrun") from None
            atexit.register(self.close)
        n = problem.X.shape[0]
        if n < self.world_size:
            raise UserError(f"{n} examples cannot be split over {self.world_size} ranks; use fewer processes")
        self._check_same(
            [_digest(problem.X), _digest(problem.y), _digest(setup.w0)],
            "data and initial parameters (different seeds, files or library versions on the ranks?)",
        )
        self.bounds = [(r * n // self.world_size, (r + 1) * n // self.world_size) for r in range(self.world_size)]
        self._sizes = [b - a for a, b in self.bounds]
        self._max_size = max(self._sizes)
        start, stop = self.bounds[self.rank]
        self.problem = problem.sharded(start, stop, self.reduce)
        setup = dataclasses.replace(setup, problem=self.problem)
        setup.info["distributed"] = {
            "world_size": self.world_size,
            "backend": self.backend,
            "sharding": "contiguous blocks [r*n//W, (r+1)*n//W)",
            "reduction": "all_gather float64, log-space combine in rank order",
        }
        return setup

    def adopt(self, state) -> None:
        """A resumed state (from any number of ranks): check it is complete and shared."""
        if state.ev.margins.numel() != self.problem.n:
            raise UserError(
                f"the checkpoint holds {state.ev.margins.numel()} margins for {self.problem.n} examples; it belongs to another run"
            )
        self._check_same([_digest(state.w)], "the resumed parameters")

    # -- collectives ------------------------------------------------------------------
    def _all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """``[W, *tensor.shape]``: every rank's tensor, in rank order, on every rank."""
        import torch.distributed as dist

        tensor = tensor.to(self.comm_device).contiguous()
        out = torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype, device=self.comm_device)
        try:
            dist.all_gather(list(out.unbind(0)), tensor)
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses on timeouts and lost peers
            where = self.run_dir or "DIR"
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {what} failed ({_first_line(exc)}); another rank died or hung "
                f"(timeout {self.timeout:g} s). The last checkpoint is valid: continue with diralign resume {where} "
                f"(or torchrun --nproc_per_node=N -m diralign resume {where})"
            ) from None
        return out

    def _check_same(self, digests: list[bytes], what: str) -> None:
        mine = torch.tensor(list(b"".join(digests)), dtype=torch.float64)
        everyone = self._all_gather(mine, f"comparing {what}")
        differ = [r for r in range(self.world_size) if not torch.equal(everyone[r].cpu(), everyone[0].cpu())]
        if differ:
            raise DistributedError(f"ranks {differ} differ from rank 0 in {what}; the ranks must not drift apart")

    def reduce(self, log_risk, grad, margins):
        """Problem reducer: global ``log L``, ``grad log L`` and correct count; local margins."""
        log_risk = torch.as_tensor(log_risk, dtype=torch.float64, device=margins.device).reshape(1)
        header = torch.cat([log_risk, (margins > 0).sum().to(torch.float64).reshape(1)])
        packed = header if grad is None else torch.cat([header, grad.to(torch.float64)])
        rows = self._all_gather(packed, "the gradient all-gather")
        empty = rows.new_zeros(0)
        pieces = [(row[0], None if grad is None else row[2:], empty) for row in rows]
        total, reduced, _ = combine_log_space(pieces)
        correct = int(rows[:, 1].sum().item())
        if reduced is not None:
            reduced = reduced.to(device=grad.device, dtype=grad.dtype)
        return total.to(margins.device), reduced, margins, correct

    def complete(self, ev: Evaluation) -> Evaluation:
        """The same evaluation with all ``n`` margins, in example order, on every rank."""
        if ev.margins.numel() == self.problem.n:  # already complete (log point, checkpoint, resume)
            return ev
        padded = ev.margins.new_zeros(self._max_size, dtype=torch.float64)
        padded[: ev.margins.numel()] = ev.margins.to(torch.float64)
        rows = self._all_gather(padded, "gathering margins")
        margins = torch.cat([rows[r, :size] for r, size in enumerate(self._sizes)]).to(ev.margins.device, ev.margins.dtype)
        return Evaluation(log_risk=ev.log_risk, grad=ev.grad, margins=margins, correct=ev.correct)

    def check_in_sync(self, state) -> None:
        """Before each checkpoint: complete margins in the state, equal parameters everywhere."""
        state.ev = self.complete(state.ev)
        self._check_same([_digest(state.w), _digest(state.ev.margins)], f"parameters at step {state.steps}")

    def agree(self, wall: float, due: bool, stop: bool) -> tuple[float, bool, bool]:
        """Rank 0's wall clock and checkpoint decision; stop if any rank was signalled."""
        mine = torch.tensor([wall, float(due), float(stop)], dtype=torch.float64)
        rows = self._all_gather(mine, "agreeing on the next step").cpu()
        return float(rows[0, 0]), bool(rows[0, 1] > 0), bool((rows[:, 2] > 0).any())

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # a dead peer must not turn a clean exit into a traceback
                pass


def _digest(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data.tobytes()).digest()


def _first_line(exc: Exception) -> str:
    """The gist of a backend error: first line, without gloo's ``[source.cc:NN]`` prefix."""
    text = str(exc).strip().splitlines()
    gist = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else ""
    return f"{type(exc).__name__}: {gist[:160]}" if gist else type(exc).__name__


__all__ = ["DataParallel", "DistributedError", "coordinator_for", "launched_by_torchrun"]
