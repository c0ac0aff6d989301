"""CPU memory-allocator tuning for large tensors (glibc only; a no-op elsewhere).

glibc's malloc serves large blocks (a 3D activation, a gradient) with fresh ``mmap`` calls and returns them to
the system when freed, so every training iteration page-faults its whole working set back in: on this
project's 2-core machine that was about 40% of the time of an nnU-Net 3d_fullres iteration (BENCHMARKS.md).
Keeping freed memory in the process for reuse — what PyTorch's CPU performance guide gets from jemalloc or
tcmalloc — removes that cost. The resident size then stays at the peak, which training reaches anyway.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_INT_MAX = 2 ** 31 - 1
_done = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (idempotent). Returns whether the settings were applied."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    ok = all(mallopt(option, ctypes.c_int(value)) == 1 for option, value in (
        (_M_MMAP_THRESHOLD, _INT_MAX),  # large blocks from the heap, reusable after free ...
        (_M_TRIM_THRESHOLD, _INT_MAX),  # ... and the heap is not handed back to the system
        (_M_TOP_PAD, 1 << 28),          # grow the heap in big steps
    ))
    _done = ok
    return ok
