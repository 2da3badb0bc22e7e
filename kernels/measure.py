"""Measurement of detected footprints: centroid, PSF flux, aperture flux, shape, trail, flags.

For each footprint (see :mod:`kernels.detect`), on a background-subtracted image ``D`` with variance ``V``:

- **centroid**: Gaussian-windowed first moments iterated to convergence (SExtractor's XWIN/YWIN), window
  σ = the PSF's σ, starting at the footprint's peak; unbiased for any symmetric profile. If it diverges
  (moves more than 2 σ from the peak, or the windowed flux is not positive) the footprint's barycentre is
  used and ``CENTROID_FAILED`` is set.
- **PSF flux**: least-squares amplitude of a pixel-integrated Gaussian PSF of the given FWHM at the
  centroid, weights uniform: ``Σ P D / Σ P²`` with variance ``Σ P² V / (Σ P²)²``.
- **aperture flux**: ``Σ A D`` with ``A`` the exact area of each pixel inside a circle of radius ``r``
  (as SEP's ``sum_circle(subpix=0)``); variance ``Σ A V``, SEP's convention.
- **shape**: second moments of the footprint's pixels weighted by ``max(±D, 0)`` about their barycentre,
  ``a``, ``b`` (rms along the major/minor axes) and ``theta`` (radians, counter-clockwise from +x), with
  SEP's ``1/12`` regularisation of singular moments. A trail of length ``L`` convolved with the PSF has
  ``a² − b² = L²/12``, so ``trail_length = sqrt(12 (a² − b²))`` and ``trail_angle = theta``.

Pixels that are masked (mask ≠ 0) or NaN/inf in ``D`` or ``V`` never enter a sum; their presence sets flags.
Fluxes carry the sign of the data (negative sources on difference images have negative fluxes).
"""

from __future__ import annotations

import math

import numpy as np

from kernels.config import njit

#: Flag bits of the ``flags`` column.
EDGE = 1  #: the footprint touches the image border
APERTURE_TRUNCATED = 2  #: the aperture or the PSF stamp extends beyond the image
BAD_PIXELS = 4  #: a masked or NaN/inf pixel lies in the footprint, the aperture or the PSF stamp
SATURATED = 8  #: a saturated pixel lies in the footprint or the aperture
NEGATIVE = 16  #: a negative footprint (difference images)
DIPOLE = 32  #: a footprint of the opposite sign lies next to this one (set by the pipeline)
TRAILED = 64  #: elongated beyond the PSF: a moving object (set by the pipeline)
CENTROID_FAILED = 128  #: windowed centroid did not converge; the barycentre is reported
PSF_FLUX_FAILED = 256  #: no usable pixel under the PSF
BLENDED = 512  #: the footprint has more than one significant peak (set by the pipeline)
SHARP = 1024  #: narrower than the PSF (minor-axis rms < half the PSF σ): a cosmic ray or hot pixel (pipeline)

FLAG_NAMES = {
    EDGE: "EDGE", APERTURE_TRUNCATED: "APERTURE_TRUNCATED", BAD_PIXELS: "BAD_PIXELS", SATURATED: "SATURATED",
    NEGATIVE: "NEGATIVE", DIPOLE: "DIPOLE", TRAILED: "TRAILED", CENTROID_FAILED: "CENTROID_FAILED",
    PSF_FLUX_FAILED: "PSF_FLUX_FAILED", BLENDED: "BLENDED", SHARP: "SHARP",
}  # fmt: skip

#: Mask bits understood by :func:`measure_footprints` (any non-zero value excludes the pixel).
MASK_BAD = 1
MASK_SAT = 2

#: Columns of the result of :func:`measure_footprints`, in order.
COLUMNS = ("x", "y", "flux", "flux_err", "psf_flux", "psf_flux_err", "x2", "y2", "xy", "a", "b", "theta",
           "trail_length", "trail_angle")  # fmt: skip


# --------------------------------------------------------------------------------------------- cores
@njit
def _int_sqrt(x, r):
    """∫_0^x sqrt(r² − t²) dt for x in [−r, r]."""
    x = min(max(x, -r), r)
    return 0.5 * (x * math.sqrt(max(r * r - x * x, 0.0)) + r * r * math.asin(x / r))


@njit
def circle_rect_overlap(x0, x1, y0, y1, r, pts):
    """Exact area of {x0 < X < x1, y0 < Y < y1} inside the circle X² + Y² < r² (centred at the origin);
    ``pts`` is scratch space for 6 values."""
    a, b = max(x0, -r), min(x1, r)
    if a >= b or y0 >= r or y1 <= -r:
        return 0.0
    pts[0], pts[1] = a, b
    n = 2
    for yy in (y0, y1):
        if abs(yy) < r:
            c = math.sqrt(r * r - yy * yy)
            for p in (-c, c):
                if a < p < b:
                    pts[n] = p
                    n += 1
    for i in range(1, n):  # insertion sort of at most 6 values
        v = pts[i]
        j = i - 1
        while j >= 0 and pts[j] > v:
            pts[j + 1] = pts[j]
            j -= 1
        pts[j + 1] = v
    area = 0.0
    for i in range(n - 1):
        u, v = pts[i], pts[i + 1]
        if v <= u:
            continue
        m = 0.5 * (u + v)
        s = math.sqrt(max(r * r - m * m, 0.0))
        top_is_line = y1 < s
        bot_is_line = y0 > -s
        top = y1 if top_is_line else s
        bot = y0 if bot_is_line else -s
        if top <= bot:
            continue
        arc = _int_sqrt(v, r) - _int_sqrt(u, r)
        area += (y1 * (v - u) if top_is_line else arc) - (y0 * (v - u) if bot_is_line else -arc)
    return area


@njit
def _usable(data, var, mask, y, x):
    return mask[y, x] == 0 and np.isfinite(data[y, x]) and np.isfinite(var[y, x])


@njit
def _aperture(data, var, mask, xc, yc, r, pts):
    """(flux, variance, flags) in a circle of radius r at (xc, yc), exact pixel overlap."""
    ny, nx = data.shape
    flux, fvar, flags = 0.0, 0.0, 0
    xlo, xhi = int(math.floor(xc - r + 0.5)), int(math.floor(xc + r + 0.5))
    ylo, yhi = int(math.floor(yc - r + 0.5)), int(math.floor(yc + r + 0.5))
    r2 = r * r
    for y in range(ylo, yhi + 1):
        dy0, dy1 = y - 0.5 - yc, y + 0.5 - yc
        near_y = 0.0 if dy0 < 0 < dy1 else min(abs(dy0), abs(dy1))
        far_y = max(abs(dy0), abs(dy1))
        for x in range(xlo, xhi + 1):
            dx0, dx1 = x - 0.5 - xc, x + 0.5 - xc
            near_x = 0.0 if dx0 < 0 < dx1 else min(abs(dx0), abs(dx1))
            if near_x * near_x + near_y * near_y >= r2:
                continue
            far_x = max(abs(dx0), abs(dx1))
            if far_x * far_x + far_y * far_y <= r2:
                w = 1.0
            else:
                w = circle_rect_overlap(dx0, dx1, dy0, dy1, r, pts)
                if w <= 0.0:
                    continue
            if y < 0 or y >= ny or x < 0 or x >= nx:
                flags |= APERTURE_TRUNCATED
                continue
            if not _usable(data, var, mask, y, x):
                flags |= BAD_PIXELS
                if mask[y, x] & MASK_SAT:
                    flags |= SATURATED
                continue
            flux += w * data[y, x]
            fvar += w * var[y, x]
    return flux, fvar, flags


@njit
def _windowed_centroid(data, var, mask, sign, x0, y0, sigma, max_iter, wx, wy, stamp):
    """Iterated Gaussian-windowed centroid; returns (x, y, ok).

    The window (half-width R = ceil(4σ) + 1) may move up to 2σ from the start, so the pixels it can reach
    are copied once into ``stamp`` (sign applied, unusable pixels zero, outside the image zero) and the
    iterations are plain arithmetic. ``wx``, ``wy``: scratch of 2R + 1 values.
    """
    ny, nx = data.shape
    R = int(math.ceil(4.0 * sigma)) + 1
    S = stamp.shape[0] // 2  # stamp half-width = R + ceil(2σ) + 1
    ix0, iy0 = int(math.floor(x0 + 0.5)), int(math.floor(y0 + 0.5))
    for j in range(2 * S + 1):
        y = iy0 - S + j
        for i in range(2 * S + 1):
            x = ix0 - S + i
            if 0 <= y < ny and 0 <= x < nx and _usable(data, var, mask, y, x):
                stamp[j, i] = sign * data[y, x]
            else:
                stamp[j, i] = 0.0
    xc, yc = x0, y0
    inv2s2 = 1.0 / (2.0 * sigma * sigma)
    for _ in range(max_iter):
        ix, iy = int(math.floor(xc + 0.5)), int(math.floor(yc + 0.5))
        for k in range(2 * R + 1):
            d = ix - R + k - xc
            wx[k] = math.exp(-d * d * inv2s2)
            d = iy - R + k - yc
            wy[k] = math.exp(-d * d * inv2s2)
        sw, swx, swy = 0.0, 0.0, 0.0
        oy, ox = iy - R - (iy0 - S), ix - R - (ix0 - S)  # window origin inside the stamp
        for j in range(2 * R + 1):
            row = stamp[oy + j]
            sr, srx = 0.0, 0.0
            for i in range(2 * R + 1):
                w = wx[i] * row[ox + i]
                sr += w
                srx += w * (i - R)
            sw += wy[j] * sr
            swx += wy[j] * srx
            swy += wy[j] * sr * (j - R)
        if not sw > 0.0:
            return x0, y0, False
        # offsets were taken from the window's integer centre (ix, iy): convert to offsets from (xc, yc)
        ddx = 2.0 * (swx / sw + ix - xc)
        ddy = 2.0 * (swy / sw + iy - yc)
        xc += ddx
        yc += ddy
        if (xc - x0) ** 2 + (yc - y0) ** 2 > 4.0 * sigma * sigma:
            return x0, y0, False
        if ddx * ddx + ddy * ddy < 1e-6:  # converged to 1e-3 pixel
            break
    return xc, yc, True


@njit
def _psf_flux(data, var, mask, xc, yc, sigma, px, py):
    """(flux, variance, flags) of a pixel-integrated Gaussian PSF fitted at (xc, yc); px, py: scratch."""
    ny, nx = data.shape
    R = int(math.ceil(4.0 * sigma)) + 1
    ix, iy = int(math.floor(xc + 0.5)), int(math.floor(yc + 0.5))
    s = sigma * math.sqrt(2.0)
    for i in range(2 * R + 1):
        px[i] = 0.5 * (math.erf((ix - R + i + 0.5 - xc) / s) - math.erf((ix - R + i - 0.5 - xc) / s))
        py[i] = 0.5 * (math.erf((iy - R + i + 0.5 - yc) / s) - math.erf((iy - R + i - 0.5 - yc) / s))
    spd, spp, sppv, flags = 0.0, 0.0, 0.0, 0
    for j in range(2 * R + 1):
        y = iy - R + j
        for i in range(2 * R + 1):
            x = ix - R + i
            p = py[j] * px[i]
            if y < 0 or y >= ny or x < 0 or x >= nx:
                if p > 1e-4:
                    flags |= APERTURE_TRUNCATED
                continue
            if not _usable(data, var, mask, y, x):
                if p > 1e-4:
                    flags |= BAD_PIXELS
                continue
            spd += p * data[y, x]
            spp += p * p
            sppv += p * p * var[y, x]
    if spp <= 0.0:
        return np.nan, np.nan, flags | PSF_FLUX_FAILED
    return spd / spp, sppv / (spp * spp), flags


@njit
def _moments(data, var, mask, sign, offsets, sy, sx0, sx1, f):
    """Barycentre and second moments of footprint f weighted by max(sign·D, 0); flags for bad/sat pixels."""
    sw, swx, swy = 0.0, 0.0, 0.0
    flags = 0
    for i in range(offsets[f], offsets[f + 1]):
        y = sy[i]
        for x in range(sx0[i], sx1[i]):
            if not _usable(data, var, mask, y, x):
                flags |= BAD_PIXELS
                if mask[y, x] & MASK_SAT:
                    flags |= SATURATED
                continue
            w = sign * data[y, x]
            if w > 0:
                sw += w
                swx += w * x
                swy += w * y
    if not sw > 0:
        return np.nan, np.nan, np.nan, np.nan, np.nan, flags
    xb, yb = swx / sw, swy / sw
    sxx, syy, sxy = 0.0, 0.0, 0.0
    for i in range(offsets[f], offsets[f + 1]):
        y = sy[i]
        for x in range(sx0[i], sx1[i]):
            if not _usable(data, var, mask, y, x):
                continue
            w = sign * data[y, x]
            if w > 0:
                dx, dy = x - xb, y - yb
                sxx += w * dx * dx
                syy += w * dy * dy
                sxy += w * dx * dy
    return xb, yb, sxx / sw, syy / sw, sxy / sw, flags


@njit
def _measure(out, flags, data, var, mask, offsets, sy, sx0, sx1, bbox, peak_y, peak_x, sign, sigma, radius):
    ny, nx = data.shape
    R = int(math.ceil(4.0 * sigma)) + 1
    S = R + int(math.ceil(2.0 * sigma)) + 1
    wx, wy, pts = np.empty(2 * R + 1), np.empty(2 * R + 1), np.empty(6)
    stamp = np.empty((2 * S + 1, 2 * S + 1))
    for f in range(peak_y.shape[0]):
        fl = 0
        s = float(sign[f])
        if s < 0:
            fl |= NEGATIVE
        if bbox[f, 0] == 0 or bbox[f, 2] == 0 or bbox[f, 1] == ny - 1 or bbox[f, 3] == nx - 1:
            fl |= EDGE
        xb, yb, x2, y2, xy, mf = _moments(data, var, mask, s, offsets, sy, sx0, sx1, f)
        fl |= mf
        xc, yc, ok = _windowed_centroid(
            data, var, mask, s, float(peak_x[f]), float(peak_y[f]), sigma, 10, wx, wy, stamp
        )
        if not ok:
            fl |= CENTROID_FAILED
            if np.isfinite(xb):
                xc, yc = xb, yb
        af, av, afl = _aperture(data, var, mask, xc, yc, radius, pts)
        pf, pv, pfl = _psf_flux(data, var, mask, xc, yc, sigma, wx, wy)
        fl |= afl | pfl
        # shape (SEP's regularisation of singular moments)
        if np.isfinite(x2):
            if x2 * y2 - xy * xy < 0.00694:
                x2 += 0.0833333
                y2 += 0.0833333
            half = 0.5 * (x2 + y2)
            root = math.sqrt(max(0.25 * (x2 - y2) ** 2 + xy * xy, 0.0))
            a, b = math.sqrt(half + root), math.sqrt(max(half - root, 0.0))
            theta = 0.5 * math.atan2(2.0 * xy, x2 - y2)
            trail = math.sqrt(12.0 * max(a * a - b * b, 0.0))
        else:
            a = b = theta = trail = np.nan
        out[f, 0], out[f, 1], out[f, 2], out[f, 3] = xc, yc, af, math.sqrt(max(av, 0.0))
        out[f, 4], out[f, 5] = pf, math.sqrt(pv) if pv >= 0 else np.nan
        out[f, 6], out[f, 7], out[f, 8] = x2, y2, xy
        out[f, 9], out[f, 10], out[f, 11], out[f, 12], out[f, 13] = a, b, theta, trail, theta
        flags[f] = fl


@njit
def _apertures(flux, err, flags, data, var, mask, x, y, radius):
    pts = np.empty(6)
    for i in range(x.shape[0]):
        f, v, fl = _aperture(data, var, mask, x[i], y[i], radius, pts)
        flux[i], err[i], flags[i] = f, math.sqrt(max(v, 0.0)), fl


# --------------------------------------------------------------------------------------------- public API
def _prepare(data, variance, mask, saturated):
    data = np.asarray(data)
    if data.ndim != 2 or data.size == 0 or data.dtype.kind not in "fiu":
        raise ValueError(f"image must be a non-empty numeric 2-D array, got {data.dtype} {data.shape}")
    if data.dtype not in (np.float32, np.float64) or not data.dtype.isnative:
        data = data.astype(np.float64)
    data = np.ascontiguousarray(data)
    if np.ndim(variance) == 0:
        variance = np.full(data.shape, variance, data.dtype)
    variance = np.asarray(variance)
    if variance.shape != data.shape:
        raise ValueError(f"variance shape {variance.shape} differs from image shape {data.shape}")
    variance = np.ascontiguousarray(variance, dtype=data.dtype)  # one compiled specialisation per dtype
    if mask is None:
        m = np.zeros(data.shape, np.uint8)
    else:
        mask = np.asarray(mask)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {data.shape}")
        m = (mask != 0).view(np.uint8)  # a new array: MASK_BAD where masked
    if saturated is not None:
        saturated = np.asarray(saturated)
        if saturated.shape != data.shape:
            raise ValueError(f"saturation mask shape {saturated.shape} differs from image shape {data.shape}")
        sat = (saturated != 0).view(np.uint8)
        np.multiply(sat, np.uint8(MASK_SAT), out=sat)
        np.bitwise_or(m, sat, out=m)
    return data, variance, m


def measure_footprints(data, variance, footprints, psf_fwhm: float, radius: float, mask=None, saturated=None):
    """Measure every footprint (module docstring).

    Parameters
    ----------
    data : numpy.ndarray
        Background-subtracted 2-D image (not modified).
    variance : numpy.ndarray or float
        Its variance, per pixel or one value.
    footprints : kernels.detect.Footprints
        From :func:`kernels.detect.find_footprints` (spans, bounding boxes, peaks, signs).
    psf_fwhm : float
        FWHM of the Gaussian PSF in pixels (centroid window and PSF flux).
    radius : float
        Aperture radius in pixels.
    mask, saturated : numpy.ndarray, optional
        Non-zero pixels are excluded; ``saturated`` ones also set ``SATURATED``.

    Returns
    -------
    values : numpy.ndarray
        (n, len(COLUMNS)) float64, columns in :data:`COLUMNS` order (x, y 0-based pixel centres).
    flags : numpy.ndarray
        (n,) int64 bit flags (module constants).
    """
    if not (np.isfinite(psf_fwhm) and psf_fwhm > 0):
        raise ValueError(f"PSF FWHM must be a positive number of pixels, got {psf_fwhm}")
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"aperture radius must be positive, got {radius}")
    data, variance, m = _prepare(data, variance, mask, saturated)
    n = len(footprints)
    out = np.full((n, len(COLUMNS)), np.nan)
    flags = np.zeros(n, np.int64)
    fp = footprints
    sigma = psf_fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    if n:
        _measure(out, flags, data, variance, m, fp.offsets, fp.span_y, fp.span_x0, fp.span_x1, fp.bbox,
                 fp.peak_y, fp.peak_x, fp.sign, float(sigma), float(radius))  # fmt: skip
    return out, flags


def aperture_flux(data, variance, x, y, radius: float, mask=None):
    """Exact-overlap circular aperture sums at (x, y): ``(flux, flux_err, flags)`` arrays."""
    data, variance, m = _prepare(data, variance, mask, None)
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"aperture radius must be positive, got {radius}")
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    shape = x.shape
    x, y = np.ascontiguousarray(x.ravel()), np.ascontiguousarray(y.ravel())
    flux, err, flags = np.empty(x.size), np.empty(x.size), np.zeros(x.size, np.int64)
    _apertures(flux, err, flags, data, variance, m, x, y, float(radius))
    return flux.reshape(shape), err.reshape(shape), flags.reshape(shape)
