"""Where and how a run computes: seed, dtype, device, threads, data parallelism, loss.

python -c "from diralign.runtime import RuntimeOptions; print(RuntimeOptions())"
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError
from .losses import canonical_loss
from .options import Options, option

DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class RuntimeOptions(Options):
    SECTION = "runtime"
    seed: int = option(0, "seeds the data, the initial weights and every shuffle")
    dtype: str = option("float64", "float64 or float32 (all parameters and data)")
    device: str = option("cpu", "cpu, cuda or cuda:N")
    threads: int = option(0, "torch intra-op threads; 0: torch's default (one for tiny problems)")
    distributed: bool = option(False, "data-parallel under torchrun (see diralign.distributed)")
    distributed_timeout_seconds: float = option(300.0, "a collective waiting longer means a rank died or hung")

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise UserError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if self.threads < 0:
            raise UserError(f"threads must be >= 0 (0: torch's default), got {self.threads}")
        if not self.distributed_timeout_seconds > 0:
            raise UserError(f"distributed_timeout_seconds must be positive, got {self.distributed_timeout_seconds}")


@dataclass
class ProblemOptions(Options):
    SECTION = "problem"
    loss: str = option("logistic", "logistic, exp (binary) or cross-entropy (multi-class)")
    chunk_size: int = option(0, "examples per forward/backward chunk, for bounded memory (0: all at once)")
    pieces: int = option(
        0,
        "evaluate the data in this many contiguous pieces combined in order (the run's arithmetic, fixed when it "
        "starts: 0 means one per process of that launch), so that any number of processes gives the same bits",
    )

    def validate(self) -> None:
        canonical_loss(self.loss)  # aliases (exponential, log, ce) are accepted
        if self.chunk_size < 0:
            raise UserError(f"chunk_size must be >= 0 (0: all at once), got {self.chunk_size}")
        if self.pieces < 0:
            raise UserError(f"pieces must be >= 0 (0: one per process), got {self.pieces}")


def resolve_dtype_device(options: RuntimeOptions) -> tuple[torch.dtype, torch.device]:
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda requested but no CUDA device is available; use --set device=cpu")
    return DTYPES[options.dtype], device


def apply_runtime_settings(options: RuntimeOptions) -> None:
    from .allocator import keep_freed_memory

    if options.threads > 0:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    keep_freed_memory()  # big activations are reused, not page-faulted back every step


def finite_number(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number, got {value}")
