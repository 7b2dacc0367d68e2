"""glibc's malloc kept from handing large freed blocks back to the OS between kernel calls.

Why (measured on the 2-core dev VM, float32): glibc serves blocks from 128 KiB up (a threshold that slides
up to the largest block freed) with fresh ``mmap`` pages, and gives the heap's free top back to the OS above
twice that threshold. A U-Net pass allocates its activations and the kernels' scratch (0.2-1.5 MB a call at
batch 1, 28x28) and frees them all at its end, so every pass faulted its pages in anew: the batch-1 frozen
forward at 28x28 took 3.0 ms where the same kernels on pages already mapped took 2.4 ms, and DDIM-50 ran at
6.3 instead of 7.9-8.1 img/s. With blocks up to 32 MiB (glibc's largest threshold on 64-bit) taken from the
heap and up to 1 GiB of its free top kept, a pass reuses the pages of the last one.

The threads that run a batch share (:func:`._threads.run_shares`) allocate their pass's activations too,
and glibc gives each thread its own arena: heaps of at most 64 MiB that are unmapped once empty, whatever
the trim threshold. A 28x28 training step at batch 128 (two shares of 64) then faulted in 1 to 4618 pages,
varying from run to run. So the arenas are limited to one (:data:`ARENA_MAX`): every thread takes from the
main heap (a pass of 40 blocks of 4 MiB freed together in a pool thread: 5131 faults a pass -> 0). The
threads' allocations are few and large (the kernels' work is in between), so they hardly meet on its lock.

Costs: the process keeps up to :data:`TRIM_THRESHOLD` bytes it freed (memory it needed before) instead of
returning them; the setting is process-wide, so other libraries in the process (PyTorch's CPU tensors
included: its training step ran 7-10 % faster with it) get it too. It is made once, when the ``"cpu"``
backend is first imported, and only on glibc; it is skipped when ``DIFNUMPY_TUNE_MALLOC=0`` or when the
environment already sets glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (and the
arenas are left alone when it sets ``MALLOC_ARENA_MAX``).
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  #: blocks below this come from the heap (glibc's maximum on 64-bit)
TRIM_THRESHOLD = 1 << 30  #: free heap top kept up to this many bytes
ARENA_MAX = 1  #: malloc arenas (every thread allocates from the main heap)
_ENV_OFF = "DIFNUMPY_TUNE_MALLOC"
_state = {"tuned": None, "arenas": False}


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring) once; True if they were set."""
    if _state["tuned"] is not None:
        return _state["tuned"]
    _state["tuned"] = False
    if os.environ.get(_ENV_OFF, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False  # the user's own glibc settings stand
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl's mallopt is a no-op stub)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _state["tuned"] = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                       and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    if _state["tuned"] and "MALLOC_ARENA_MAX" not in os.environ:
        # threads that allocate later share the main heap (ones that already have an arena keep it)
        _state["arenas"] = mallopt(M_ARENA_MAX, ARENA_MAX) == 1
    return _state["tuned"]
