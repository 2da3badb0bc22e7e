"""Sky background: robust statistics on a mesh of boxes, then a smooth bicubic-spline surface.

The image is cut into ``box × box`` cells (the last row/column of cells takes the remainder). In each cell
the pixels that are finite and unmasked are sigma-clipped about their median (``nsigma`` × the standard
deviation, until nothing changes or ``iters`` rounds); the cell's level is the clipped median and its rms
the clipped standard deviation. As in SExtractor/SEP the clipping runs on a fine histogram (4096 bins over
mean ± 4σ of the cell, refined when sources inflate σ), two or three passes over the pixels in all instead
of a selection per round: the median is interpolated in its bin and the clipping limits fall on bin edges,
so the result matches the exact clipped statistics to ~1e-3 σ in full cells and within the statistics' own
noise in cells of a few pixels (tests/test_kernels_background.py compares them). Cells with fewer than ``min_fraction`` of their pixels usable are filled from
their valid neighbours; a ``filter_size`` median filter then removes cells biased by large objects. The
surface through the cell centres is a natural bicubic spline (tensor product: a natural cubic spline along
y through each mesh column, then along x through each row), extended linearly beyond the outer centres, as
SExtractor/SEP do.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kernels.config import njit


# --------------------------------------------------------------------------------------------- cores
@njit
def _hist_median(hist, lo_bin, hi_bin, rank, left, width):
    """Value of fractional ``rank`` (0-based) among the counts of bins lo_bin..hi_bin, values spread
    uniformly within each bin."""
    cum = 0.0
    for b in range(lo_bin, hi_bin + 1):
        c = hist[b]
        if c > 0 and cum + c > rank:
            return left + width * (b + (rank - cum + 0.5) / c)
        cum += c
    return left + width * (hi_bin + 1)


@njit
def _cell_stats(image, mask, y0, y1, x0, x1, nsigma, iters, min_count, scratch, hist):
    """Clipped (median, std, n) of one cell; n = 0 when too few usable pixels.

    One pass gathers the usable pixels with their mean and standard deviation σ0; a second bins them into
    ``hist`` over mean ± 4σ0 (the median is within σ0 of the mean, so every clipping window med ± 3σ
    with σ ≤ σ0 lies inside); the clipping rounds then run on the histogram: the mean and standard
    deviation of the bins whose centres lie within med ± nsigma·σ, and the median by linear interpolation
    in its bin. When sources inflated σ0 so that a bin is wider than σ/256, the pixels are binned again
    around the current window.
    """
    n = 0
    shift = 0.0
    s, s2 = 0.0, 0.0
    for y in range(y0, y1):
        for x in range(x0, x1):
            v = image[y, x]
            if mask[y, x] == 0 and np.isfinite(v):
                if n == 0:
                    shift = v
                d = v - shift
                s += d
                s2 += d * d
                scratch[n] = v
                n += 1
    if n < min_count or n < 2:
        return 0.0, 0.0, 0
    mean = s / n
    std = np.sqrt(max(s2 / n - mean * mean, 0.0))
    mean += shift
    if std == 0.0:
        return mean, 0.0, n
    nb = hist.shape[0]
    left = mean - 4.0 * std
    width = 8.0 * std / nb
    inv = 1.0 / width
    for b in range(nb):
        hist[b] = 0
    below = 0
    for i in range(n):
        f = (scratch[i] - left) * inv
        if f < 0.0:
            below += 1
        elif f < nb:
            hist[int(f)] += 1
    # round 0: median of all n values (those below the histogram come first)
    med = _hist_median(hist, 0, nb - 1, 0.5 * (n - 1) - below, left, width)
    m = n
    lo_bin, hi_bin = 0, nb - 1
    fresh = True
    for _ in range(iters):
        if width * 256.0 > std > 0.0:
            # the first σ was inflated by sources: re-bin finely around the current window (one more pass);
            # the next window med' ± kσ' (σ' ≤ σ, |med' - med| < σ) stays inside med ± (k + 2)σ
            left = med - (nsigma + 2.0) * std
            width = 2.0 * (nsigma + 2.0) * std / nb
            inv = 1.0 / width
            for b in range(nb):
                hist[b] = 0
            for i in range(n):
                f = (scratch[i] - left) * inv
                if 0.0 <= f < nb:
                    hist[int(f)] += 1
            fresh = True
        # bins whose centre lies in [med - k std, med + k std]
        new_lo = max(int(np.ceil((med - nsigma * std - left) * inv - 0.5)), 0)
        new_hi = min(int(np.floor((med + nsigma * std - left) * inv - 0.5)), nb - 1)
        if not fresh and new_lo == lo_bin and new_hi == hi_bin:
            break
        fresh = False
        c, sc, sc2 = 0.0, 0.0, 0.0
        for b in range(new_lo, new_hi + 1):
            k = hist[b]
            if k:
                t = b + 0.5
                c += k
                sc += k * t
                sc2 += k * t * t
        if c < 2:
            break
        lo_bin, hi_bin, m = new_lo, new_hi, int(c)
        tm = sc / c
        std = width * np.sqrt(max(sc2 / c - tm * tm, 0.0) + 1.0 / 12.0)
        med = _hist_median(hist, lo_bin, hi_bin, 0.5 * (c - 1), left, width)
    return med, std, m


@njit
def _mesh_stats(level, rms, count, image, mask, box, nsigma, iters, min_fraction):
    ny, nx = image.shape
    my, mx = level.shape
    scratch = np.empty(box * box, image.dtype)
    hist = np.zeros(4096, np.int64)
    for j in range(my):
        y0, y1 = j * box, min((j + 1) * box, ny)
        for i in range(mx):
            x0, x1 = i * box, min((i + 1) * box, nx)
            min_count = int(np.ceil(min_fraction * (y1 - y0) * (x1 - x0)))
            med, std, n = _cell_stats(image, mask, y0, y1, x0, x1, nsigma, iters, min_count, scratch, hist)
            level[j, i], rms[j, i], count[j, i] = med, std, n


@njit
def _spline_second_derivatives(t, v, m2, work):
    """Second derivatives of the natural cubic spline through (t, v) (tridiagonal solve)."""
    n = t.shape[0]
    m2[0] = 0.0
    m2[n - 1] = 0.0
    if n < 3:
        for i in range(n):
            m2[i] = 0.0
        return
    # forward sweep on rows 1..n-2: h[i-1] m[i-1] + 2(h[i-1]+h[i]) m[i] + h[i] m[i+1] = 6 (slope_i - slope_{i-1})
    work[0] = 0.0
    for i in range(1, n - 1):
        h0, h1 = t[i] - t[i - 1], t[i + 1] - t[i]
        rhs = 6.0 * ((v[i + 1] - v[i]) / h1 - (v[i] - v[i - 1]) / h0)
        diag = 2.0 * (h0 + h1) - h0 * work[i - 1]
        work[i] = h1 / diag
        m2[i] = (rhs - h0 * m2[i - 1]) / diag
    for i in range(n - 2, 0, -1):
        m2[i] -= work[i] * m2[i + 1]


@njit
def _spline_eval(t, v, m2, x):
    """Natural cubic spline at x, linear beyond the end knots."""
    n = t.shape[0]
    if n == 1:
        return v[0]
    if x <= t[0]:
        h = t[1] - t[0]
        slope = (v[1] - v[0]) / h - h * (2.0 * m2[0] + m2[1]) / 6.0
        return v[0] + slope * (x - t[0])
    if x >= t[n - 1]:
        h = t[n - 1] - t[n - 2]
        slope = (v[n - 1] - v[n - 2]) / h + h * (m2[n - 2] + 2.0 * m2[n - 1]) / 6.0
        return v[n - 1] + slope * (x - t[n - 1])
    lo, hi = 0, n - 1
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if t[mid] > x:
            hi = mid
        else:
            lo = mid
    h = t[hi] - t[lo]
    a = (t[hi] - x) / h
    b = 1.0 - a
    return a * v[lo] + b * v[hi] + ((a * a * a - a) * m2[lo] + (b * b * b - b) * m2[hi]) * h * h / 6.0


@njit
def _interpolate(out, mesh, ty, tx, base, subtract):
    """Tensor-product natural spline of ``mesh`` (knots ty × tx) at every pixel centre of ``out``; with
    ``subtract``, ``out = base - spline`` instead (background subtraction in the same pass)."""
    ny, nx = out.shape
    my, mx = mesh.shape
    # 1. along y: every mesh column at every image row -> cols[ny, mx]
    cols = np.empty((ny, mx), np.float64)
    colv = np.empty(my, np.float64)
    m2y = np.empty(my, np.float64)
    work = np.empty(max(my, mx), np.float64)
    for i in range(mx):
        for j in range(my):
            colv[j] = mesh[j, i]
        _spline_second_derivatives(ty, colv, m2y, work)
        for y in range(ny):
            cols[y, i] = _spline_eval(ty, colv, m2y, float(y))
    # 2. along x, row by row: spline through cols[y, :] evaluated at every column; the interval and weights
    #    of each column do not depend on the row, so precompute them.
    lo = np.empty(nx, np.int64)
    wa = np.empty(nx, np.float64)
    wb = np.empty(nx, np.float64)
    wc = np.empty(nx, np.float64)
    wd = np.empty(nx, np.float64)
    kind = np.zeros(nx, np.int64)  # 0 inside, -1 left of the first knot, +1 right of the last
    for x in range(nx):
        xf = float(x)
        if mx == 1:
            kind[x] = 2
            continue
        if xf <= tx[0]:
            kind[x] = -1
            wa[x] = xf - tx[0]
            continue
        if xf >= tx[mx - 1]:
            kind[x] = 1
            wa[x] = xf - tx[mx - 1]
            continue
        k = 0
        while tx[k + 1] < xf:
            k += 1
        h = tx[k + 1] - tx[k]
        a = (tx[k + 1] - xf) / h
        b = 1.0 - a
        lo[x], wa[x], wb[x] = k, a, b
        wc[x] = (a * a * a - a) * h * h / 6.0
        wd[x] = (b * b * b - b) * h * h / 6.0
    rowv = np.empty(mx, np.float64)
    m2x = np.empty(mx, np.float64)
    for y in range(ny):
        for i in range(mx):
            rowv[i] = cols[y, i]
        _spline_second_derivatives(tx, rowv, m2x, work)
        if mx > 1:
            h0 = tx[1] - tx[0]
            s0 = (rowv[1] - rowv[0]) / h0 - h0 * (2.0 * m2x[0] + m2x[1]) / 6.0
            h1 = tx[mx - 1] - tx[mx - 2]
            s1 = (rowv[mx - 1] - rowv[mx - 2]) / h1 + h1 * (m2x[mx - 2] + 2.0 * m2x[mx - 1]) / 6.0
        else:
            s0 = s1 = 0.0
        for x in range(nx):
            kx = kind[x]
            if kx == 0:
                k = lo[x]
                v = wa[x] * rowv[k] + wb[x] * rowv[k + 1] + wc[x] * m2x[k] + wd[x] * m2x[k + 1]
            elif kx == -1:
                v = rowv[0] + s0 * wa[x]
            elif kx == 1:
                v = rowv[mx - 1] + s1 * wa[x]
            else:
                v = rowv[0]
            if subtract:
                out[y, x] = base[y, x] - v
            else:
                out[y, x] = v


# --------------------------------------------------------------------------------------------- public API
class Background(NamedTuple):
    """A background model: the filtered mesh, its knots, and the image shape it describes."""

    level: np.ndarray  #: (my, mx) sky level per cell, after filling and median filtering
    rms: np.ndarray  #: (my, mx) noise per cell: clipped std, filled, filtered and corrected for the clipping
    ty: np.ndarray  #: (my,) row coordinate of each cell centre (pixels, 0-based)
    tx: np.ndarray  #: (mx,) column coordinate of each cell centre
    shape: tuple  #: (ny, nx) of the image
    global_level: float  #: median of the cell levels
    global_rms: float  #: median of the cell rms values

    def image(self, dtype=np.float32) -> np.ndarray:
        """The smooth background surface at every pixel."""
        return interpolate_mesh(self.level, self.ty, self.tx, self.shape, dtype)

    def rms_image(self, dtype=np.float32) -> np.ndarray:
        """The smooth noise surface at every pixel."""
        return interpolate_mesh(self.rms, self.ty, self.tx, self.shape, dtype)


def mesh_centres(n: int, box: int) -> np.ndarray:
    """Centres (0-based pixel coordinates) of the cells cutting ``n`` pixels into boxes of ``box``."""
    starts = np.arange(0, n, box)
    ends = np.minimum(starts + box, n)
    return (starts + ends - 1) / 2.0


def _check_image(image: np.ndarray, mask) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {image.shape}")
    if image.dtype.kind not in "fiu":
        raise ValueError(f"image must be numeric, got {image.dtype}")
    if image.dtype.kind != "f" or not image.dtype.isnative:
        image = image.astype(np.float32 if image.dtype.itemsize <= 2 else np.float64)
    if mask is None:
        mask = np.zeros(image.shape, np.uint8)
    else:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
        if mask.dtype == bool:
            mask = mask.view(np.uint8)
        elif mask.dtype.kind not in "iu" or not mask.dtype.isnative:
            mask = mask.astype(np.int32)
    return image, mask


def mesh_statistics(image, mask=None, box: int = 128, nsigma: float = 3.0, iters: int = 5, min_fraction=0.5):
    """Clipped median, clipped standard deviation and usable-pixel count of every mesh cell.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image; NaN/inf pixels are ignored.
    mask : numpy.ndarray, optional
        Same shape; non-zero pixels are ignored.
    box : int
        Cell size in pixels.
    nsigma, iters : float, int
        Clipping half-width in standard deviations and the maximum number of clipping rounds.
    min_fraction : float
        A cell with fewer usable pixels than this fraction of its area gets count 0 (invalid).

    Returns
    -------
    level, rms : numpy.ndarray
        (my, mx) float64; zero where invalid.
    count : numpy.ndarray
        (my, mx) int64 pixels left after clipping; 0 marks an invalid cell.
    """
    image, mask = _check_image(image, mask)
    if box < 2:
        raise ValueError(f"box must be at least 2 pixels, got {box}")
    my, mx = -(-image.shape[0] // box), -(-image.shape[1] // box)
    level, rms, count = np.zeros((my, mx)), np.zeros((my, mx)), np.zeros((my, mx), np.int64)
    _mesh_stats(level, rms, count, image, mask, int(box), float(nsigma), int(iters), float(min_fraction))
    return level, rms, count


def fill_and_filter(values: np.ndarray, valid: np.ndarray, filter_size: int = 3) -> np.ndarray:
    """Fill invalid cells with the mean of their valid 8-neighbours (repeatedly, growing inwards), then
    median-filter with a ``filter_size`` square window (clipped at the mesh edges)."""
    v = np.array(values, dtype=np.float64)
    ok = np.array(valid, dtype=bool)
    if not ok.any():
        raise ValueError("no background cell has enough usable pixels: the image is all NaN/inf or masked")
    my, mx = v.shape
    while not ok.all():
        vp = np.pad(np.where(ok, v, 0.0), 1)
        kp = np.pad(ok.astype(np.float64), 1)
        s = sum(vp[1 + dy : 1 + dy + my, 1 + dx : 1 + dx + mx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        c = sum(kp[1 + dy : 1 + dy + my, 1 + dx : 1 + dx + mx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        newly = ~ok & (c > 0)
        v[newly] = s[newly] / c[newly]
        ok |= newly
    if filter_size > 1:
        h = filter_size // 2
        out = np.empty_like(v)
        for j in range(my):
            for i in range(mx):
                out[j, i] = np.median(v[max(j - h, 0) : j + h + 1, max(i - h, 0) : i + h + 1])
        v = out
    return v


def interpolate_mesh(mesh: np.ndarray, ty: np.ndarray, tx: np.ndarray, shape: tuple, dtype=np.float32) -> np.ndarray:
    """Natural bicubic spline through ``mesh`` at knots ``ty × tx``, evaluated at every pixel of ``shape``
    (linear beyond the outer knots)."""
    mesh = np.ascontiguousarray(mesh, dtype=np.float64)
    ty = np.ascontiguousarray(ty, dtype=np.float64)
    tx = np.ascontiguousarray(tx, dtype=np.float64)
    if mesh.shape != (ty.size, tx.size):
        raise ValueError(f"mesh shape {mesh.shape} does not match knots ({ty.size}, {tx.size})")
    if not np.all(np.isfinite(mesh)):
        raise ValueError("background mesh has NaN/inf cells; fill them first (fill_and_filter)")
    if np.any(np.diff(ty) <= 0) or np.any(np.diff(tx) <= 0):
        raise ValueError("mesh knots must increase strictly")
    out = np.empty(tuple(int(s) for s in shape), dtype)
    _interpolate(out, mesh, ty, tx, np.zeros((1, 1), dtype), False)
    return out


def subtract_background(image: np.ndarray, background: Background) -> np.ndarray:
    """``image - background.image()`` in one pass, without the background surface in memory.

    Returns a new array of the image's float dtype (float32 for integer images); ``image`` is not modified.
    """
    image = np.asarray(image)
    if image.shape != tuple(background.shape):
        raise ValueError(f"image shape {image.shape} differs from the background's {tuple(background.shape)}")
    if image.dtype not in (np.float32, np.float64) or not image.dtype.isnative:
        image = image.astype(np.float64 if image.dtype.itemsize > 4 else np.float32)
    out = np.empty(image.shape, image.dtype)
    b = background
    _interpolate(out, np.ascontiguousarray(b.level, np.float64), np.ascontiguousarray(b.ty, np.float64),
                 np.ascontiguousarray(b.tx, np.float64), image, True)  # fmt: skip
    return out


def clipped_std_correction(nsigma: float) -> float:
    """Factor from the standard deviation of a Gaussian clipped at ±``nsigma`` to that of the Gaussian
    (1.0135 at 3σ), so that the rms mesh estimates the noise rather than the clipped noise."""
    from math import erf, exp, pi, sqrt

    z = float(nsigma)
    inside = erf(z / sqrt(2.0))
    return 1.0 / sqrt(1.0 - 2.0 * z * exp(-0.5 * z * z) / sqrt(2.0 * pi) / inside)


def estimate_background(
    image, mask=None, box: int = 128, filter_size: int = 3, nsigma: float = 3.0, iters: int = 5, min_fraction=0.5
) -> Background:
    """The background model of an image (see the module docstring).

    Parameters
    ----------
    image : numpy.ndarray
        2-D image, any float or integer dtype; NaN/inf pixels are ignored and it is not modified.
    mask : numpy.ndarray, optional
        Non-zero pixels are ignored (sources, saturation, defects).
    box, filter_size, nsigma, iters, min_fraction
        Cell size; median filter size in cells; clipping; see :func:`mesh_statistics`.

    Returns
    -------
    Background
        Call ``.image()`` for the full-resolution surface and ``.rms_image()`` for the noise.

    Raises
    ------
    ValueError
        If no cell has enough usable pixels (an all-NaN or fully masked image).
    """
    image, mask = _check_image(image, mask)
    level, rms, count = mesh_statistics(image, mask, box, nsigma, iters, min_fraction)
    valid = count > 0
    level = fill_and_filter(level, valid, filter_size)
    rms = fill_and_filter(rms, valid, filter_size) * clipped_std_correction(nsigma)
    ty, tx = mesh_centres(image.shape[0], box), mesh_centres(image.shape[1], box)
    return Background(level, rms, ty, tx, image.shape, float(np.median(level)), float(np.median(rms)))
