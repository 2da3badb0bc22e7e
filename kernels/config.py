"""Numba compilation flags for every kernel, in one place.

``fastmath`` stays off: kernels are compared bit-for-bit or to tight tolerances with their references, and
the simulator must be byte-reproducible. Caching is opt-in and node-local: set ``NUMBA_CACHE_DIR`` to a
local disk and ``LSSTPIPE_NUMBA_CACHE=1`` (caching on a shared file system races under MPI).
"""

from __future__ import annotations

import os

import numba

#: Flags shared by every serial kernel.
NJIT_FLAGS: dict = {
    "nogil": True,
    "fastmath": False,
    "cache": os.environ.get("LSSTPIPE_NUMBA_CACHE", "") == "1" and bool(os.environ.get("NUMBA_CACHE_DIR")),
}


def njit(fn=None, **overrides):
    """``numba.njit`` with the project's flags (overridable per kernel)."""
    flags = {**NJIT_FLAGS, **overrides}
    if fn is None:
        return lambda f: numba.njit(**flags)(f)
    return numba.njit(**flags)(fn)
