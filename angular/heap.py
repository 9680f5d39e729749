"""Keep freed (B, C) buffers mapped: the CPU heap setting of the training entry points.

glibc serves an allocation above its mmap threshold with a fresh ``mmap`` and unmaps it on
``free``. The threshold adapts upwards but is capped at 32 MiB, exactly one 256 x 32,768 fp32
matrix, so a CPU training step with such a head maps its logits and their gradient afresh every
step and faults every page in again: on a virtual machine those faults cost more than the fused
kernel (BENCHMARKS.md, "The CPU heap"). Raising the mmap threshold and the trim threshold keeps
freed blocks in the heap for the next step, which is what an allocator such as jemalloc or tcmalloc
does by design (PyTorch's CPU tuning guide recommends one for the same reason).

The pipeline stages, ``angular`` (the CLI) and the ``torchrun`` workers call
:func:`keep_freed_buffers_mapped` first thing. A library user does the same in their own process,
or sets ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`` in the
environment before Python starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Allocations up to 1 GiB come from the heap (a (B, C) fp32 buffer of 256 x 1M classes); freed
# memory at the top of the heap is never given back to the system during the run.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1

# Set to 0 to leave the C library's defaults alone (e.g. to measure them).
ENV_SWITCH = "ANGULAR_KEEP_HEAP"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_kept_in_this_process = False


def state() -> str:
    """``"warm"`` when this process keeps freed buffers mapped (this module set it, or the user's
    ``MALLOC_*`` environment did), else ``"cold"``: what a benchmark records."""
    if _kept_in_this_process or any(name in os.environ for name in USER_SETTINGS):
        return "warm"
    return "cold"


def keep_freed_buffers_mapped() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and the processes it forks).

    Returns whether they were set: False where the C library has no ``mallopt`` (musl, macOS),
    where the user already chose them in the environment, or where ``ANGULAR_KEEP_HEAP=0``.
    """
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False  # the user's own setting wins
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    global _kept_in_this_process
    _kept_in_this_process = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _kept_in_this_process
