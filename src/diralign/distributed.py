"""Data-parallel runs on ``torch.distributed``: one process per device, launched by torchrun.

    torchrun --nproc_per_node=2 -m diralign run deep-linear --set distributed=true --out runs/dl2
    torchrun --nproc_per_node=3 -m diralign resume runs/dl2     # any number of ranks ...
    diralign resume runs/dl2                                     # ... or a single process

Backends: gloo when ``device=cpu``, NCCL when ``device=cuda`` (rank r on ``cuda:LOCAL_RANK``).
torchrun supplies the rendezvous (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...); nothing here
speaks a protocol of its own.

**Pieces and sharding.** A run evaluates its data in ``pieces`` contiguous blocks
``[p*n//P, (p+1)*n//P)``, fixed when it starts (``pieces=0``: one per process of the
launch that starts it; config.json records the number).  After the experiment's ``setup``
has built the full data (identically on every rank: checked by hash), rank ``r`` of ``W``
keeps the contiguous run of pieces ``[r*P//W, (r+1)*P//W)`` (one each when ``W = P``,
several when a run resumes on fewer processes, none on a rank beyond ``P``) and drops the
other examples from its :class:`~diralign.problem.Problem`.  Contiguous blocks make the
gathered margins come back in the original example order.

**Reduction (exact).** Each rank evaluates ``log L_p`` and ``grad log L_p`` on each piece
it holds.  Because the risk is a sum over examples, ``L = sum_p L_p`` and
``grad L = sum_p grad L_p``; dividing by ``L`` gives ``log L = logsumexp_p log L_p`` and
``grad log L = sum_p exp(log L_p - log L) grad log L_p``.  No approximation is made: the
weights ``exp(log L_p - log L)`` lie in ``(0, 1]`` and sum to one, so nothing overflows
and ``L`` itself (far below the smallest float64 late in training) is never formed.  The
flow's exact Hessian-vector products combine the same way
(:meth:`~diralign.problem.Problem.curvature`: one gather of the pieces' gradients per
Jacobian, one of their ``H_p v`` per product).

**Determinism.** The rows ``[log L_p, correct_p, grad log L_p]`` of all pieces are
*all-gathered* (not all-reduced) in float64 and combined on every rank in piece order by
``combine_log_space``: every rank executes the same floating-point operations on the same
bytes, so all ranks hold bit-identical ``log L``, gradients and therefore parameters and
step-size decisions; and since the pieces are the run's, not the launch's, a run gives the
same bits on any number of processes: a ``W``-rank run equals a single-process run with
``pieces = W``, and a resume on another number of processes continues it exactly.  Against
a run in *one* piece the summation order differs, so results agree to rounding (measured,
deep-linear to ``ln(n/L) = 1000``: gd, sgd, loss-based and dopri5 to 2e-12; CVODE, whose
Newton and GMRES iterations amplify last bits, to 1.2e-8 at rtol 1e-6).  The price of
all-gather over all-reduce is ``P`` gradient copies per rank per evaluation.

**Margins.** Between log points each rank keeps only its shard's margins; the count of
correctly classified examples is in the same gather (one collective per evaluation).  At
log points, checkpoints and the end, all ``n`` margins are gathered onto every rank (so
callbacks see the same row everywhere; rank 0 writes them).

**Decisions.** Stopping, checkpoint timing and signals are taken from rank 0's clock and
any rank's signal or stall verdict (:meth:`DataParallel.agree`, one tiny collective per
step).  Inside a step every all-gather carries each rank's reason to abandon the step (a
signal, its time budget, a stall), and if any rank has one all raise the same
``StepAborted`` after the same gather: long steps stop within one evaluation, as in a
single process.  At every
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
import sys
from datetime import timedelta
from typing import Optional

import torch

from .dynamics import StepAborted
from .errors import UserError
from .problem import Evaluation, piece_bounds
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

    # Codes of the reasons to abandon a step, exchanged at every all-gather inside a step:
    # the largest any rank sent wins, on every rank alike.
    ABORTS = (None, "stalled", "max_wall_seconds", "signal")

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
        self._abort = None  # inside a step: the trainer's wanted(), asked at each all-gather
        if device.startswith("cuda") and torch.cuda.is_available() and local_rank < torch.cuda.device_count():
            # Before the experiment builds its tensors, so that device=cuda means this rank's GPU.
            torch.cuda.set_device(local_rank)

    @classmethod
    def from_env(cls, run_dir: Optional[str] = None, device: str = "cpu") -> DataParallel:
        rank, world, local = (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
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
                raise DistributedError(
                    f"rank {self.rank}: could not join the process group ({_first_line(exc)}); launch with torchrun"
                ) from None
            atexit.register(self.close)
        n = problem.X.shape[0]
        count = int(config.pieces) or self.world_size
        if n < count:
            raise UserError(f"{n} examples cannot be split into {count} pieces (one per process); use fewer processes")
        self._check_same(
            [_digest(problem.X), _digest(problem.y), _digest(setup.w0)],
            "data and initial parameters (different seeds, files or library versions on the ranks?)",
        )
        # Rank r holds the contiguous run of pieces [r*P//W, (r+1)*P//W): all of them when the
        # run started on W processes (P = W), several each when it resumes on fewer.
        everything = piece_bounds(n, count)
        runs = [
            everything[r * count // self.world_size : (r + 1) * count // self.world_size]
            for r in range(self.world_size)
        ]
        edges = [0]
        for held in runs:
            edges.append(held[-1][1] if held else edges[-1])
        self.bounds = list(zip(edges[:-1], edges[1:]))
        self._sizes = [b - a for a, b in self.bounds]
        self._max_size = max(self._sizes)
        self.problem = problem.sharded(runs[self.rank], self._evaluation_gather, [len(held) for held in runs])
        if count < self.world_size and self.rank == 0:
            print(
                f"diralign: note: this run evaluates its data in {count} pieces (fixed when it started, so that its "
                f"results do not depend on the process count); {self.world_size - count} of {self.world_size} "
                "processes hold none",
                file=sys.stderr,
                flush=True,
            )
        setup = dataclasses.replace(setup, problem=self.problem)
        setup.info["distributed"] = {
            "world_size": self.world_size,
            "backend": self.backend,
            "pieces": count,
            "sharding": "contiguous pieces [p*n//P, (p+1)*n//P); rank r holds pieces [r*P//W, (r+1)*P//W)",
            "reduction": "all_gather float64, log-space combine in piece order",
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

    def _evaluation_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """The problem's all-gather.  Inside a step each rank adds why it wants to abandon the
        step (a signal, its budget, a stall; 0: it does not); if any rank does, every rank
        raises the same :class:`StepAborted` after the same gather, so that all leave the step
        at the same evaluation and branch alike (a signal to one rank stops them all)."""
        if self._abort is None:
            return self._all_gather(tensor, what)
        code = float(self.ABORTS.index(self._abort()))
        flagged = torch.cat([tensor.reshape(-1).to(torch.float64), tensor.new_tensor([code], dtype=torch.float64)])
        rows = self._all_gather(flagged, what)
        worst = int(rows[:, -1].max().item())
        if worst:
            raise StepAborted(self.ABORTS[worst])
        return rows[:, :-1].reshape(self.world_size, *tensor.shape)

    def begin_step(self, dynamics, wanted) -> None:
        dynamics.abort_requested = None  # asked at the all-gathers instead (see _evaluation_gather)
        self._abort = wanted

    def end_step(self, dynamics) -> None:
        self._abort = None

    def _check_same(self, digests: list[bytes], what: str) -> None:
        mine = torch.tensor(list(b"".join(digests)), dtype=torch.float64)
        everyone = self._all_gather(mine, f"comparing {what}")
        differ = [r for r in range(self.world_size) if not torch.equal(everyone[r].cpu(), everyone[0].cpu())]
        if differ:
            raise DistributedError(f"ranks {differ} differ from rank 0 in {what}; the ranks must not drift apart")

    def complete(self, ev: Evaluation) -> Evaluation:
        """The same evaluation with all ``n`` margins, in example order, on every rank."""
        if ev.margins.numel() == self.problem.n:  # already complete (log point, checkpoint, resume)
            return ev
        padded = ev.margins.new_zeros(self._max_size, dtype=torch.float64)
        padded[: ev.margins.numel()] = ev.margins.to(torch.float64)
        rows = self._all_gather(padded, "gathering margins")
        margins = torch.cat([rows[r, :size] for r, size in enumerate(self._sizes)]).to(
            ev.margins.device, ev.margins.dtype
        )
        return Evaluation(log_risk=ev.log_risk, grad=ev.grad, margins=margins, correct=ev.correct)

    def check_in_sync(self, state) -> None:
        """Before each checkpoint: complete margins in the state, equal parameters everywhere."""
        state.ev = self.complete(state.ev)
        self._check_same([_digest(state.w), _digest(state.ev.margins)], f"parameters at step {state.steps}")

    def agree(self, wall: float, due: bool, stop: bool, stalled: bool = False) -> tuple[float, bool, bool, bool]:
        """Rank 0's wall clock and checkpoint decision; stop if any rank was signalled, and
        stalled if any rank's stall goal says so."""
        mine = torch.tensor([wall, float(due), float(stop), float(stalled)], dtype=torch.float64)
        rows = self._all_gather(mine, "agreeing on the next step").cpu()
        return float(rows[0, 0]), bool(rows[0, 1] > 0), bool((rows[:, 2] > 0).any()), bool((rows[:, 3] > 0).any())

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
