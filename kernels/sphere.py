"""Small spherical-geometry helpers shared by the kernels that work on the sky (association, linking)."""

from __future__ import annotations

import numpy as np

from kernels.config import njit

__all__ = ["unit_vectors"]


@njit
def unit_vectors(ra_deg, dec_deg, out):
    """Write the unit vectors of (ra, dec) in degrees into ``out`` ``(n, 3)``."""
    for i in range(ra_deg.size):
        a = np.deg2rad(ra_deg[i])
        d = np.deg2rad(dec_deg[i])
        out[i, 0] = np.cos(d) * np.cos(a)
        out[i, 1] = np.cos(d) * np.sin(a)
        out[i, 2] = np.sin(d)
