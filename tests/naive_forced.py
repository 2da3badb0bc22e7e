"""Slow, obvious reference for :mod:`kernels.forced` (plain loops over numpy)."""

import numpy as np


def forced_psf_flux(data, variance, x, y, stamps, mask=None, min_fraction=0.5):
    ny, nx = data.shape
    mask = np.zeros(data.shape, bool) if mask is None else np.asarray(mask) != 0
    n, s, _ = stamps.shape
    h = s // 2
    flux, err, flags = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, np.int64)
    for k in range(n):
        cx, cy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
        ys, xs = np.mgrid[cy - h : cy + h + 1, cx - h : cx + h + 1]
        inside = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
        p = stamps[k]
        if np.any(~inside & (p != 0)):
            flags[k] |= 1
        yc, xc = np.clip(ys, 0, ny - 1), np.clip(xs, 0, nx - 1)
        d, v, m = data[yc, xc].astype(float), variance[yc, xc].astype(float), mask[yc, xc]
        with np.errstate(invalid="ignore"):
            good = inside & ~m & np.isfinite(d) & np.isfinite(v) & (v > 0)
        if np.any(inside & ~good & (p != 0)):
            flags[k] |= 2
        spp = np.sum(p[good] ** 2 / v[good])
        if p.sum() > 0 and p[good].sum() >= min_fraction * p.sum() and spp > 0:
            flux[k] = np.sum(p[good] * d[good] / v[good]) / spp
            err[k] = 1 / np.sqrt(spp)
        else:
            flags[k] |= 4
    return flux, err, flags
