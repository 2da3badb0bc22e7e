"""Process memory settings of a worker rank.

glibc's allocator serves large requests from its heap once its dynamic mmap threshold has grown, and then
keeps freed image planes (tens of MB each) in the heap instead of returning them to the system: a worker's
resident memory stays at its high-water mark from one CCD to the next. :func:`return_large_frees` pins the
threshold so that every allocation of ``threshold`` bytes or more is its own mapping, unmapped when freed
(measured on a full-size CCD: ~100 MB less at rest and at the differencing peak). Call it once at worker
start-up; ``MALLOC_MMAP_THRESHOLD_`` in the environment does the same before the process starts.

Every new mapping costs its page faults, though: the kernel zeroes each page on first touch (on a VM the
host may fault it in too, erratically), and a full-size CCD's chain allocates and frees well over a
gigabyte of image planes, most of them the same size. :func:`planes_reused` serves one CCD's chain from
the heap, where a plane freed by one stage is the memory of the next stage's plane, and gives everything
free back to the system when the chain ends: the worker's memory at rest is what :func:`return_large_frees`
leaves, its peak a little above the chain's own (``benchmarks/ccd_chain.py``).

A worker that runs CCD after CCD can go further: :func:`keep_freed_memory` serves every allocation from the
heap for the rest of the process and keeps what is freed there, so from its second CCD on the whole cycle
(loading the inputs, the chain, writing the outputs) runs in pages it has already touched and none is
faulted in again. On a full-size CCD that takes the page faults out of the chain's first stage, where nearly
all of them were (ISR of two snaps 0.78 → 0.51 s on this project's VMs); the price is memory at rest: the
cycle's high-water mark (~1.2 GB) stays resident between CCDs instead of ~0.5 GB, while the peak stays
where it was. It is the worker's default (``worker.keep_memory``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

__all__ = ["keep_freed_memory", "return_large_frees", "planes_reused", "worker_allocator"]

# glibc's mallopt parameter numbers and defaults (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_NO_TRIM = 2**31 - 1  # the largest value mallopt takes: no free top of the heap is ever that large

_kept = False
"""Whether :func:`keep_freed_memory` is in force (for the rest of the process)."""


@functools.cache
def _libc():
    """glibc's ``mallopt`` and ``malloc_trim``, or None where the C library has them not."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return mallopt, trim


def return_large_frees(threshold: int = 4 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap (returned to the system when freed).

    Returns False where the C library has no ``mallopt`` (not glibc): nothing is changed there.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be a positive number of bytes, got {threshold}")
    libc = _libc()
    return libc is not None and bool(libc[0](_M_MMAP_THRESHOLD, int(threshold)))


def keep_freed_memory() -> bool:
    """From now on, serve every allocation from the heap and keep freed memory there for the next ones.

    For a process that runs one CCD after another (a worker rank): from the second CCD on, its planes,
    its inputs' and its readers' buffers are the memory the previous CCD used and freed, already resident,
    so no page is faulted in and zeroed again. The process's memory at rest stays at the high-water mark
    of its heap. Returns False where the C library has no ``mallopt`` (not glibc): nothing is changed.
    Inside it, :func:`planes_reused` changes nothing.
    """
    global _kept
    libc = _libc()
    if libc is None:
        return False
    mallopt = libc[0]
    _kept = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _NO_TRIM))
    return _kept


def worker_allocator(keep: bool) -> bool:
    """A worker rank's allocator settings (``worker.keep_memory``), set once at its start: freed memory kept
    for the next CCD (:func:`keep_freed_memory`) when ``keep``, else image planes unmapped when freed
    (:func:`return_large_frees`; :func:`planes_reused` around each chain). Returns whether memory is kept."""
    if keep and keep_freed_memory():
        return True
    return_large_frees()
    return False


@contextlib.contextmanager
def planes_reused() -> Iterator[bool]:
    """Within the block, large allocations come from the heap and stay there when freed, for the next ones.

    For one CCD's chain (:func:`lsstpipe.pipelines.ap.process_ccd`): on entry, whatever free memory the
    heap holds goes back to the system and mmap is turned off (every plane from the heap, none trimmed
    when freed); on exit mmap is on again with glibc's default limits and the heap's free memory goes back
    to the system, so nothing outlives the block but what it returned (the result's planes). Yields whether
    the allocator could be set (False where the C library is not glibc: the block runs unchanged).
    Not for blocks that run in parallel threads; the process-wide settings apply to every thread meanwhile.
    """
    libc = _libc()
    if libc is None or _kept:
        yield _kept  # after keep_freed_memory every block is served so: nothing to set or give back
        return
    mallopt, trim = libc
    trim(0)
    ok = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    try:
        yield ok
    finally:
        mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        trim(0)
