"""Keep freed tensor memory inside the process (glibc malloc), so that every gradient does not
page-fault its activations back in.

    python -c "from diralign.allocator import keep_freed_memory; print(keep_freed_memory())"

Why: one forward/backward of the Fig. 1 network at width 10,000 allocates ~8 MB activation
blocks.  glibc serves blocks that large with ``mmap`` and returns them to the kernel on
``free``, so the next evaluation touches fresh pages: ~3,500 minor page faults per gradient,
measured, which doubled to tripled its cost on a loaded 2-core machine (benchmarks/RESULTS.md,
"instrument cost").  Raising ``M_MMAP_THRESHOLD`` (to glibc's 64-bit maximum, 32 MiB) and
``M_TRIM_THRESHOLD`` makes such blocks come from, and go back to, the heap, where the next
step reuses them.  The price is that the process keeps its peak heap instead of shrinking.

No effect (returns ``False``) off Linux/glibc, or when ``DIRALIGN_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024

_applied = None


def keep_freed_memory() -> bool:
    """Apply the two ``mallopt`` settings once per process; ``True`` if they took effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DIRALIGN_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc: leave the allocator alone
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _applied = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    return _applied
