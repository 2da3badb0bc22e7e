"""Process memory settings of a worker rank.

glibc's allocator serves large requests from its heap once its dynamic mmap threshold has grown, and then
keeps freed image planes (tens of MB each) in the heap instead of returning them to the system: a worker's
resident memory stays at its high-water mark from one CCD to the next. :func:`return_large_frees` pins the
threshold so that every allocation of ``threshold`` bytes or more is its own mapping, unmapped when freed
(measured on a full-size CCD: ~100 MB less at rest and at the differencing peak). Call it once at worker
start-up; ``MALLOC_MMAP_THRESHOLD_`` in the environment does the same before the process starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["return_large_frees"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_large_frees(threshold: int = 4 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap (returned to the system when freed).

    Returns False where the C library has no ``mallopt`` (not glibc): nothing is changed there.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
