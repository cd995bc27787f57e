"""W data-parallel ranks as threads of one process: the real :class:`DataParallel` code
(sharding, gathers, agreement, in-step aborts), its all-gather done through shared memory.
Cheaper than torchrun (no process start-up), so every dynamics can be compared.

The threads take turns: each holds a token while it computes and gives it up only while it
waits in an all-gather, so that code which is not thread-safe (torch.fx tracing patches
torch globally, lazy imports) runs as if each rank had its own process."""

from __future__ import annotations

import threading

import scipy.optimize  # noqa: F401  (imported once here: lazy imports race in threads)
import scipy.sparse  # noqa: F401
import sksundae.cvode  # noqa: F401
import torch

from diralign import distributed as dd


class SharedGather:
    """An all-gather among W threads (what gloo does among W processes)."""

    def __init__(self, world: int, timeout: float = 60.0):
        self.barrier = threading.Barrier(world, timeout=timeout)
        self.slots = [None] * world
        self.token = threading.Lock()

    def __call__(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor.detach().clone()
        self.token.release()
        try:
            self.barrier.wait()
            out = torch.stack(self.slots)
            try:
                self.barrier.wait()
            except threading.BrokenBarrierError:
                # Every rank had passed the first wait, so the exchange is complete.  A rank
                # that got through the second wait and then failed aborts the barrier (to
                # unblock the others) and can do so before this thread wakes from that same
                # wait: the rank that would have stopped at its own next checkpoint then saw
                # a BrokenBarrierError instead (1 run in 3 of the cross-process resume test).
                pass
        finally:
            self.token.acquire()
        return out


def on_ranks(world: int, work, timeout: float = 60.0):
    """``work(rank, coordinator)`` on ``world`` simulated ranks; returns ``(results, errors)``
    (``errors``: ``(rank, exception)`` pairs)."""
    gather = SharedGather(world, timeout)
    results, errors = [None] * world, []

    def body(rank):
        gather.token.acquire()
        try:
            dp = dd.DataParallel(rank, world, 0)
            dp._all_gather = lambda tensor, what, rank=rank: gather(rank, tensor)
            results[rank] = work(rank, dp)
        except BaseException as exc:  # reported to the caller, per rank
            errors.append((rank, exc))
            gather.barrier.abort()  # unblock the other ranks
        finally:
            gather.token.release()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    real = torch.distributed.is_initialized
    torch.distributed.is_initialized = lambda: True  # prepare() must not open a real group
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        torch.distributed.is_initialized = real
    return results, errors
