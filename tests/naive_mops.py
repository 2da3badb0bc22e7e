"""Slow, obvious reference for :mod:`kernels.mops_link`: every pair of detections, haversine separations."""

from __future__ import annotations

import math

import numpy as np


def separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle separation by the haversine formula, in degrees."""
    p1, p2 = math.radians(dec1), math.radians(dec2)
    dp, dl = p2 - p1, math.radians(ra2 - ra1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h))))


def naive_tracklets(ra, dec, mjd, night, *, min_dt, max_dt, min_rate, max_rate):
    """Same contract as :func:`kernels.mops_link.find_tracklets`, by an O(N²) double loop."""
    pairs = []
    n = len(ra)
    for i in range(n):
        for j in range(i + 1, n):
            if night[i] != night[j]:
                continue
            dt = abs(mjd[j] - mjd[i])
            if not (min_dt <= dt <= max_dt):
                continue
            rate = separation_deg(ra[i], dec[i], ra[j], dec[j]) / dt
            if min_rate <= rate <= max_rate:
                pairs.append((i, j) if mjd[j] > mjd[i] else (j, i))
    pairs.sort()
    arr = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]
