"""Small array helpers shared by the kernels' public functions."""

from __future__ import annotations

import numpy as np

__all__ = ["readonly"]


def readonly(a: np.ndarray | None) -> np.ndarray | None:
    """A read-only view of ``a`` (None stays None): kernels never write their inputs, and one array type
    for writeable and read-only callers alike means one numba compilation instead of two."""
    if a is None:
        return None
    v = a.view()
    v.flags.writeable = False
    return v
