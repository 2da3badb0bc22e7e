"""Slow, obvious references of the ISR and cosmic-ray kernels (plain numpy, scipy and loops)."""

import numpy as np
from scipy import ndimage


def overscan_levels(raw, rows, cols, nsigma=3.0, smooth=0):
    """Amplifier MAD around row medians (every h // 64-th row), clipped mean of each row around the
    previous row's level (around its median for the first row and rows keeping < half), running mean."""
    out = []
    for seg in raw:
        o = seg[rows, cols].astype(np.float64)
        med = np.median(o, axis=1)
        step = max(1, o.shape[0] // 64)
        cut = nsigma * 1.482602218505602 * np.median(np.abs(o[::step] - med[::step, None]))
        lev = np.empty(o.shape[0])
        center = med[0]
        for y, row in enumerate(o):
            keep = np.abs(row - center) <= cut
            if 2 * keep.sum() < row.size:
                center = med[y]
                keep = np.abs(row - center) <= cut
            lev[y] = row[keep].mean() if keep.any() else center
            center = lev[y]
        if smooth > 0:
            lev = np.array([lev[max(0, y - smooth) : y + smooth + 1].mean() for y in range(len(lev))])
        out.append(lev)
    return np.array(out)


def isr(raw, data_rows, data_cols, origins, flip_x, flip_y, shape, oscan, gains, rn_e, sat, bias, dark, flat, xt,
        dark_time, sat_bit=1, nodata_bit=2, oscan_noise_rows=0.0):  # fmt: skip
    """Amplifier by amplifier in float64: overscan, crosstalk, assembly, bias, gain, dark, flat, variance, mask."""
    namp = raw.shape[0]
    s = raw[:, data_rows, data_cols].astype(np.float64) - oscan[:, :, None]
    if xt is not None:
        c = np.array(xt, np.float64)
        np.fill_diagonal(c, 0.0)
        s = s - np.einsum("ij,iyx->jyx", c, s)
    image = np.full(shape, np.nan)
    variance = np.full(shape, np.nan)
    mask = np.full(shape, nodata_bit, np.int32)
    h, w = s.shape[1:]
    for a in range(namp):
        y0, x0 = origins[a]
        blk = s[a][:: 1 if flip_y[a] else -1, :: -1 if flip_x[a] else 1]
        rblk = raw[a, data_rows, data_cols][:: 1 if flip_y[a] else -1, :: -1 if flip_x[a] else 1]
        sl = (slice(y0, y0 + h), slice(x0, x0 + w))
        v = blk - (bias[sl] if bias is not None else 0.0)
        e = v * gains[a]
        r2 = rn_e[a] ** 2 + gains[a] ** 2 / 12.0 + (rn_e[a] ** 2 / oscan_noise_rows if oscan_noise_rows else 0.0)
        ve = np.maximum(e, 0.0) + r2
        if dark is not None:
            e = e - dark[sl] * dark_time
        if flat is not None:
            f = flat[sl].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                f = np.where(f > 0, f, np.nan)
                e = e / f
                ve = ve / f**2
        ok = np.isfinite(e) & np.isfinite(ve)
        image[sl] = np.where(ok, e, np.nan)
        variance[sl] = np.where(ok, ve, np.nan)
        mask[sl] = np.where(rblk >= sat[a], sat_bit, 0) | np.where(ok, 0, nodata_bit)
    return image, variance, mask


def crosstalk_tolerant(raw, data_rows, data_cols, oscan, xt, tol):
    """The crosstalk correction of ``isr_ccd(..., crosstalk_tolerance=tol)`` in float64, row by row: each source
    row split into its mid-range and the rest; for each victim row the rest of the couplings with the largest
    bounds ``|c| * half`` applied, one by one, until the bounds of the others add up to ``tol`` at most.
    Returns the corrected segments ``(namp, h, w)`` and the number of strong sources per (victim, row)."""
    d = raw[:, data_rows, data_cols].astype(np.float64)
    s = d - oscan[:, :, None]
    mid = 0.5 * (d.min(axis=2) + d.max(axis=2)) - oscan
    half = 0.5 * (d.max(axis=2) - d.min(axis=2))
    namp, h = s.shape[:2]
    c32 = np.asarray(xt, np.float32)  # the kernel bounds in float32: the same products at the threshold
    c = c32.astype(np.float64)
    half32 = half.astype(np.float32)
    t = s.copy()
    nstrong = np.zeros((namp, h), int)
    for j in range(namp):
        for y in range(h):
            bound = {i: float(np.abs(c32[i, j]) * half32[i, y]) for i in range(namp) if i != j}
            rest = sum(bound.values())
            strong = set()
            for i in sorted(bound, key=lambda i: (-bound[i], i)):  # largest first, the lower index on ties
                if rest <= tol or bound[i] <= 0:
                    break
                strong.add(i)
                rest -= bound[i]
            nstrong[j, y] = len(strong)
            for i in range(namp):
                if i != j and c[i, j] != 0:
                    t[j, y] -= c[i, j] * (s[i, y] if i in strong else mid[i, y])
    return t, nstrong


def snap_cosmic_rays(im0, var0, im1, var1, t0, t1, mask0=None, mask1=None, bad_bits=0, nsigma=5.0,
                     grow_nsigma=2.5, contrast=0.1, dilate=1):  # fmt: skip
    """Seeds, connected components of the growth mask that hold a seed, binary dilation (scipy.ndimage)."""
    r = t0 / t1
    im0, var0, im1, var1 = (np.asarray(a, np.float64) for a in (im0, var0, im1, var1))
    v = var0 + r * r * var1
    d = im0 - r * im1
    with np.errstate(invalid="ignore", divide="ignore"):
        z = d / np.sqrt(v)
    usable = np.isfinite(im0) & np.isfinite(im1) & np.isfinite(v) & (v > 0)
    if mask0 is not None:
        usable &= ((mask0 | mask1) & bad_bits) == 0
    z = np.where(usable, z, np.nan)
    out = []
    for sign, other in ((1, r * im1), (-1, im0)):
        with np.errstate(invalid="ignore"):
            seed = (sign * z > nsigma) & (sign * d > contrast * np.maximum(other, 0.0))
            grow = (sign * z > grow_nsigma) | seed
        lab, _ = ndimage.label(grow, structure=np.ones((3, 3)))
        keep = np.unique(lab[seed])
        cr = np.isin(lab, keep[keep > 0])
        if dilate:
            cr = ndimage.binary_dilation(cr, structure=np.ones((3, 3)), iterations=dilate)
        out.append(cr)
    # A pixel reached from a snap-0 seed is not also grown from a snap-1 seed in the kernel: they are
    # different signs of z, so the two growth masks are disjoint anyway.
    return out[0], out[1]


def combine_snaps(im0, var0, m0, im1, var1, m1, cr0, cr1, t0, t1, cr_bit, intrp_bit):
    r = t0 / t1
    a, va, b, vb = (np.asarray(x, np.float64).copy() for x in (im0, var0, im1, var1))
    ok0 = np.isfinite(a) & np.isfinite(va)
    ok1 = np.isfinite(b) & np.isfinite(vb)
    m = (m0 | m1).astype(np.int32)
    m[cr0 | cr1] |= cr_bit
    fix0 = (cr0 | ~ok0) & ~cr1 & ok1
    fix1 = (cr1 | ~ok1) & ~cr0 & ok0 & ~fix0
    a[fix0], va[fix0] = r * b[fix0], r * r * vb[fix0]
    b[fix1], vb[fix1] = a[fix1] / r, va[fix1] / r**2
    m[fix0 | fix1] |= intrp_bit
    return a + b, va + vb, m
