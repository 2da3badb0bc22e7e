"""Slow, obvious reference for :func:`kernels.xtalk_fit.fit_crosstalk` (numpy, explicit loops over pairs)."""

from __future__ import annotations

import numpy as np


def naive_fit_crosstalk(
    stacks, bright=20000.0, quiet=400.0, ceiling=np.inf, cell=(32, 32), nsigma=4.0, max_coeff=1e-2, niter=3
):
    """Same algorithm as the kernel: returns ``(coeff, error, npix)``."""
    cy, cx = cell
    prepared = []
    for segs in stacks:
        segs = np.asarray(segs, dtype=np.float64)
        namp, h, w = segs.shape
        with np.errstate(invalid="ignore"):
            count = (segs >= bright).sum(axis=0)
            level = np.array([np.median(a[np.isfinite(a)]) if np.isfinite(a).any() else np.nan for a in segs])
            loud = (segs - level[:, None, None] >= quiet).any(axis=0)
        clean = (count == 0) & ~loud
        bgmap = np.full(segs.shape, np.nan)
        for a in range(namp):
            for y0 in range(0, h, cy):
                for x0 in range(0, w, cx):
                    block = segs[a, y0 : y0 + cy, x0 : x0 + cx]
                    keep = clean[y0 : y0 + cy, x0 : x0 + cx] & np.isfinite(block)
                    if keep.any():
                        bgmap[a, y0 : y0 + cy, x0 : x0 + cx] = np.median(block[keep])
        for a in range(namp):
            res = segs[a] - bgmap[a]
            for x in range(w):
                keep = clean[:, x] & np.isfinite(res[:, x])
                bgmap[a, :, x] += np.median(res[keep, x]) if keep.any() else 0.0
        sigma = np.full(namp, np.nan)
        for a in range(namp):
            dev = np.abs(segs[a] - bgmap[a])
            keep = clean & np.isfinite(dev)
            if keep.any():
                sigma[a] = 1.4826 * np.median(dev[keep])
        prepared.append((segs, count, bgmap, sigma))
    namp = prepared[0][0].shape[0]
    nbins = 4000
    width = 2.0 * max_coeff / nbins
    hist = np.zeros((namp, namp, nbins), np.int64)
    for i in range(namp):
        for j in range(namp):
            if i == j:
                continue
            for segs, count, bgmap, sigma in prepared:
                s = segs[i]
                with np.errstate(invalid="ignore", divide="ignore"):
                    use = (count == 1) & (s >= bright) & (s < ceiling) & np.isfinite(sigma[j])
                    r = (segs[j] - bgmap[j])[use] / s[use]
                    r = r[np.abs(r) <= max_coeff]
                k = np.minimum(np.floor((r + max_coeff) / width).astype(np.int64), nbins - 1)
                np.add.at(hist[i, j], k, 1)
    center = np.full((namp, namp), np.nan)
    for i in range(namp):
        for j in range(namp):
            n = hist[i, j].sum()
            if n:
                k = int(np.nonzero(2 * np.cumsum(hist[i, j]) >= n)[0][0])
                center[i, j] = -max_coeff + (k + 0.5) * width
    for _ in range(niter):
        sums = np.zeros((namp, namp, 4))
        for i in range(namp):
            for j in range(namp):
                if i == j:
                    continue
                for segs, count, bgmap, sigma in prepared:
                    s = segs[i]
                    d = segs[j] - bgmap[j]
                    with np.errstate(invalid="ignore"):
                        use = (count == 1) & (s >= bright) & (s < ceiling) & np.isfinite(sigma[j])
                        use &= np.abs(d - center[i, j] * s) <= nsigma * sigma[j]
                    ss, dd = s[use], d[use]
                    sums[i, j] += (use.sum(), np.sum(ss * ss), np.sum(dd * ss), np.sum(dd * dd))
        n, sss, sds, sdd = (sums[..., k] for k in range(4))
        coeff = np.full((namp, namp), np.nan)
        err = np.full((namp, namp), np.inf)
        for i in range(namp):
            for j in range(namp):
                if n[i, j] >= 3 and sss[i, j] > 0:
                    c = sds[i, j] / sss[i, j]
                    rss = max(sdd[i, j] - 2 * c * sds[i, j] + c * c * sss[i, j], 0.0)
                    coeff[i, j] = c
                    err[i, j] = np.sqrt(rss / max(n[i, j] - 1, 1) / sss[i, j])
        center = coeff
    return coeff, err, n.astype(np.int64)
