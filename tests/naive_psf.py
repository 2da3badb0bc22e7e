"""Slow, obvious references for kernels/psf.py and kernels/astrometry.py (loops and plain numpy)."""

import math

import numpy as np


def moffat_stamp(size, dx, dy, fwhm, beta, e1=0.0, e2=0.0, sub=3):
    """Unnormalised pixel-integrated elliptical Moffat (peak ≈ 1), pixel by pixel."""
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    det = math.sqrt(1 - e1 * e1 - e2 * e2)
    qxx, qxy, qyy = (1 - e1) / det, -e2 / det, (1 + e1) / det
    c = size // 2
    out = np.zeros((size, size))
    for j in range(size):
        for i in range(size):
            xx, yy = i - c - dx, j - c - dy
            if sub > 1 and xx * xx + yy * yy < (2 * alpha + 1.5) ** 2:
                pts = [
                    (xx + (si + 0.5) / sub - 0.5, yy + (sj + 0.5) / sub - 0.5) for sj in range(sub) for si in range(sub)
                ]
            else:
                pts = [(xx, yy)]
            out[j, i] = np.mean(
                [(1 + (qxx * x * x + 2 * qxy * x * y + qyy * y * y) / alpha**2) ** -beta for x, y in pts]
            )
    return out


def poly_eval(coeffs, order, u, v):
    """Σ c_k u^p v^q over the terms of increasing degree, highest power of u first within a degree."""
    terms = [(p, d - p) for d in range(order + 1) for p in range(d, -1, -1)]
    return sum(c * u**p * v**q for c, (p, q) in zip(coeffs, terms))


def offset_histogram(sx, sy, rx, ry, max_shift, bin_size):
    """Every (source, reference) pair, one at a time."""
    half = int(math.ceil(max_shift / bin_size))
    h = np.zeros((2 * half + 1, 2 * half + 1), np.int64)
    for a, b in zip(sx, sy):
        for c, d in zip(rx, ry):
            if not all(np.isfinite([a, b, c, d])):
                continue
            dx, dy = a - c, b - d
            if abs(dx) > max_shift or abs(dy) > max_shift:
                continue
            bx, by = math.floor(dx / bin_size + 0.5) + half, math.floor(dy / bin_size + 0.5) + half
            if 0 <= bx <= 2 * half and 0 <= by <= 2 * half:
                h[by, bx] += 1
    return h


def match_sources(sx, sy, rx, ry, radius):
    """Brute force: each reference's nearest source within radius; a source keeps its closest reference."""
    best = {}
    for j, (c, d) in enumerate(zip(rx, ry)):
        dist = np.hypot(np.asarray(sx) - c, np.asarray(sy) - d)
        dist = np.where(np.isfinite(dist), dist, np.inf)
        if dist.size == 0 or not np.isfinite(c) or not np.isfinite(d):
            continue
        i = int(np.argmin(dist))
        if dist[i] <= radius and (i not in best or dist[i] < best[i][1]):
            best[i] = (j, dist[i])
    pairs = sorted((j, i, dd) for i, (j, dd) in best.items())
    return (np.array([p[1] for p in pairs], np.int64), np.array([p[0] for p in pairs], np.int64),
            np.array([p[2] for p in pairs]))  # fmt: skip
