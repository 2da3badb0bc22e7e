"""Slow, obvious reference for :mod:`kernels.associate`: every pair, haversine separations, a sorted list."""

from __future__ import annotations

import math

import numpy as np


def separation_arcsec(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    """Great-circle separation by the haversine formula, in arcseconds."""
    p1, p2 = math.radians(dec1), math.radians(dec2)
    dp, dl = p2 - p1, math.radians(ra2 - ra1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return math.degrees(2 * math.asin(min(1.0, math.sqrt(h)))) * 3600.0


def naive_associate(src_ra, src_dec, src_snr, tgt_ra, tgt_dec, radius_arcsec):
    """Same contract as :func:`kernels.associate.associate`."""
    n, m = len(src_ra), len(tgt_ra)
    radius = np.broadcast_to(np.asarray(radius_arcsec, float), (m,))
    pairs = []
    for i in range(n):
        snr = float(src_snr[i]) if not math.isnan(src_snr[i]) else -math.inf
        for j in range(m):
            s = separation_arcsec(src_ra[i], src_dec[i], tgt_ra[j], tgt_dec[j])
            if s <= radius[j]:
                pairs.append((s, -snr, i, j))
    pairs.sort()
    match = np.full(n, -1, np.int64)
    sep = np.full(n, np.nan)
    used = set()
    for s, _, i, j in pairs:
        if match[i] < 0 and j not in used:
            match[i], sep[i] = j, s
            used.add(j)
    return match, sep
