"""Small array helpers shared by the kernels' public functions."""

from __future__ import annotations

import numpy as np

__all__ = ["float_plane", "readonly"]


def readonly(a: np.ndarray | None) -> np.ndarray | None:
    """A read-only view of ``a`` (None stays None): kernels never write their inputs, and one array type
    for writeable and read-only callers alike means one numba compilation instead of two."""
    if a is None:
        return None
    v = a.view()
    v.flags.writeable = False
    return v


def float_plane(a, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``a`` as a non-empty 2-D float32 or float64 array (numbers of another type converted: float64 for
    integers wider than 4 bytes, else float32); a clear ValueError naming ``name`` otherwise, or when its shape
    is not ``shape``."""
    a = np.asarray(a)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {a.shape}")
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}; the image is {tuple(shape)}")
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got {a.dtype}")
    if a.dtype not in (np.float32, np.float64) or not a.dtype.isnative:
        a = a.astype(np.float64 if a.dtype.itemsize > 4 else np.float32)
    return a
