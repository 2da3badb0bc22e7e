"""Crosstalk coefficients from exposures with bright sources, in raw segment (readout-order) coordinates.

All 16 amplifiers of a CCD are digitised at the same instant, so pixel ``[y, x]`` of every raw segment is
coupled to pixel ``[y, x]`` of every other segment: ``victim_j += C[i, j] * source_i``
(:mod:`kernels.crosstalk`; the simulator applies exactly that to the bias-free signal in ADU, before the
bias and the read noise). The readout order and the flips of the amplifiers are already those of the raw
segments, so no remapping is needed here: pass the overscan-corrected data regions of the segments as
they come off the camera (HDU order).

Method (per exposure, then summed over exposures):

1. ``count[y, x]``: how many amplifiers are *bright* there (signal ``>= bright``, finite); pixels where
   none is bright but one is ``>= quiet`` above its median level are *loud* (a source's halo, whose
   crosstalk would bias the victims' background).
2. Victim background: for every amplifier, the median of its finite pixels that are neither bright nor
   loud in cells
   of ``cell_rows × cell_cols`` raw pixels (NaN where a cell has none): the sky the crosstalk signal
   sits on; plus a column offset, the median over rows of those pixels minus their cell median (the
   fixed column pattern of the bias, the serial transient: a bleed trail of a source runs along a
   column). The victim noise ``sigma[a]`` is 1.4826 × the median absolute deviation of those pixels
   from this background model.
3. For every pixel where exactly one amplifier ``i`` is bright, below ``ceiling`` (a source value that is
   known: ADC-saturated counts are not), and every other amplifier ``j`` with a finite pixel and cell
   background: ``d = s_j - bg_j`` against ``s = s_i``. Pixels with another bright amplifier are left out
   (two sources would couple into the same victim pixel), and so is any ``j`` whose own scene is bright
   there.
4. A robust start: the median of the ratios ``d / s`` per pair, from a histogram of :data:`HIST_BINS`
   bins over ``[-max_coeff, max_coeff]`` (ratios outside are the victim's own scene, not crosstalk; a
   histogram keeps the pass streaming over exposures with bounded memory).
5. Least squares through the origin, iteratively clipped around the previous estimate: pixels with
   ``|d - c_ij s| <= nsigma * sigma_j``; ``c = Σ d s / Σ s²``, its error the rms residual over
   ``sqrt(Σ s²)``. ``niter`` passes.

The victim's own faint scene under a source pixel is noise to this fit; its mean over many sources is
what the background median leaves, a small bias for crowded fields.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kernels.arrays import readonly
from kernels.config import njit

__all__ = ["XtalkFit", "fit_crosstalk"]

#: Pairs with fewer pixels than this get a NaN coefficient (the residual scatter needs several).
MIN_PIXELS = 3
#: Bins of the first pass's ratio histogram over ``[-max_coeff, max_coeff]``.
HIST_BINS = 4000


@njit
def _bright_count(segs, bright, level, quiet, count):
    """``count[y, x]``: the number of amplifiers with a signal ``>= bright`` at ``[y, x]``, or -1 where
    none is bright but one is ``>= quiet`` above its ``level`` (too loud for the background)."""
    namp, h, w = segs.shape
    for y in range(h):
        for x in range(w):
            c = 0
            loud = False
            for a in range(namp):
                v = segs[a, y, x]
                if v >= bright:  # False for NaN
                    c += 1
                if v - level[a] >= quiet:
                    loud = True
            count[y, x] = c if (c > 0 or not loud) else -1


@njit
def _background(segs, count, cy, cx, bg, buf):
    """Median of the finite pixels with ``count == 0`` per amplifier and cell (NaN for an empty cell)."""
    namp, h, w = segs.shape
    ncy, ncx = bg.shape[1], bg.shape[2]
    for a in range(namp):
        for p in range(ncy):
            for q in range(ncx):
                n = 0
                for y in range(p * cy, min((p + 1) * cy, h)):
                    for x in range(q * cx, min((q + 1) * cx, w)):
                        v = segs[a, y, x]
                        if count[y, x] == 0 and math.isfinite(v):
                            buf[n] = v
                            n += 1
                bg[a, p, q] = np.median(buf[:n]) if n > 0 else np.nan


@njit
def _columns(segs, count, bg, cy, cx, col, buf):
    """Column offsets: the median over rows of the background pixels minus their cell median (0 if none)."""
    namp, h, w = segs.shape
    for a in range(namp):
        for x in range(w):
            n = 0
            for y in range(h):
                v = segs[a, y, x] - bg[a, y // cy, x // cx]
                if count[y, x] == 0 and math.isfinite(v):
                    buf[n] = v
                    n += 1
            col[a, x] = np.median(buf[:n]) if n > 0 else 0.0


@njit
def _noise(segs, count, bg, cy, cx, col, sigma, buf):
    """1.4826 × median absolute deviation of the background pixels from the background model, per amplifier."""
    namp, h, w = segs.shape
    for a in range(namp):
        n = 0
        for y in range(h):
            for x in range(w):
                v = segs[a, y, x]
                b = bg[a, y // cy, x // cx] + col[a, x]
                if count[y, x] == 0 and math.isfinite(v) and math.isfinite(b):
                    buf[n] = abs(v - b)
                    n += 1
        sigma[a] = 1.4826 * np.median(buf[:n]) if n > 0 else np.nan


@njit
def _pixel_pairs(segs, count, bright, ceiling, y, x):
    """The bright amplifier ``i`` at ``[y, x]`` and its signal, or ``(-1, 0)`` if the pixel is not usable."""
    if count[y, x] != 1:
        return -1, 0.0
    i = 0
    while not segs[i, y, x] >= bright:
        i += 1
    s = np.float64(segs[i, y, x])
    if not s < ceiling:
        return -1, 0.0
    return i, s


@njit
def _victim(segs, bg, cy, cx, col, sigma, j, y, x):
    """Background-subtracted victim signal ``d`` at ``[y, x]`` (NaN if the pixel or its background is not)."""
    b = bg[j, y // cy, x // cx] + col[j, x]
    v = np.float64(segs[j, y, x])
    if math.isfinite(v) and math.isfinite(b) and math.isfinite(sigma[j]):
        return v - b
    return np.nan


@njit
def _histogram(segs, count, bg, cy, cx, col, bright, ceiling, sigma, max_coeff, hist):
    """First pass: histogram of the ratios ``d / s`` in ``[-max_coeff, max_coeff]`` per pair."""
    namp, h, w = segs.shape
    nbins = hist.shape[2]
    width = 2.0 * max_coeff / nbins
    for y in range(h):
        for x in range(w):
            i, s = _pixel_pairs(segs, count, bright, ceiling, y, x)
            if i < 0:
                continue
            for j in range(namp):
                if j == i:
                    continue
                r = _victim(segs, bg, cy, cx, col, sigma, j, y, x) / s
                if abs(r) <= max_coeff:  # False for NaN
                    k = min(int(math.floor((r + max_coeff) / width)), nbins - 1)
                    hist[i, j, k] += 1


@njit
def _accumulate(segs, count, bg, cy, cx, col, bright, ceiling, sigma, center, nsigma, sums):
    """Clipped least-squares sums: ``sums[i, j] += (n, Σ s², Σ d s, Σ d²)`` over the pixels with
    ``|d - center[i, j] s| <= nsigma sigma_j`` (pairs with a NaN centre are skipped)."""
    namp, h, w = segs.shape
    for y in range(h):
        for x in range(w):
            i, s = _pixel_pairs(segs, count, bright, ceiling, y, x)
            if i < 0:
                continue
            for j in range(namp):
                if j == i:
                    continue
                d = _victim(segs, bg, cy, cx, col, sigma, j, y, x)
                if abs(d - center[i, j] * s) <= nsigma * sigma[j]:  # False for NaN
                    sums[i, j, 0] += 1.0
                    sums[i, j, 1] += s * s
                    sums[i, j, 2] += d * s
                    sums[i, j, 3] += d * d


@dataclass(frozen=True)
class XtalkFit:
    """Result of :func:`fit_crosstalk` (all ``(namp, namp)``, source × victim, zero/NaN diagonal).

    Attributes
    ----------
    coeff : numpy.ndarray
        float64 ratio victim / source; NaN where fewer than :data:`MIN_PIXELS` pixels were usable.
    error : numpy.ndarray
        float64 1σ error of ``coeff`` (rms residual / sqrt(Σ s²)); inf where unmeasured.
    npix : numpy.ndarray
        int64 number of pixels of the final fit.
    """

    coeff: np.ndarray
    error: np.ndarray
    npix: np.ndarray


def _checked(segs: np.ndarray, shape: tuple | None) -> np.ndarray:
    a = np.asarray(segs)
    if a.ndim != 3 or a.dtype.kind != "f":
        raise ValueError(
            f"segment stacks must be 3-D float arrays (namp, rows, cols) of overscan-corrected signal, got "
            f"{a.dtype} {a.shape}; subtract the overscan and convert to float first"
        )
    if shape is not None and a.shape != shape:
        raise ValueError(f"all segment stacks must have the same shape; got {a.shape} after {shape}")
    if a.shape[0] < 2:
        raise ValueError(f"crosstalk needs at least 2 amplifiers, got {a.shape[0]}")
    if not a.dtype.isnative or a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    return readonly(a)


def fit_crosstalk(
    stacks: Sequence[np.ndarray],
    bright: float = 20000.0,
    quiet: float = 400.0,
    ceiling: float = np.inf,
    cell: tuple[int, int] = (32, 32),
    nsigma: float = 4.0,
    max_coeff: float = 1e-2,
    niter: int = 3,
) -> XtalkFit:
    """Estimate the crosstalk matrix from overscan-corrected segment stacks (see the module docstring).

    Parameters
    ----------
    stacks : sequence of numpy.ndarray
        float32/float64 ``(namp, rows, cols)`` overscan-corrected data regions in HDU order, one per
        exposure, all the same shape. NaN pixels are ignored. Not modified.
    bright : float
        Signal (ADU) from which a source pixel is used.
    quiet : float
        Pixels where an amplifier is this far (ADU) above its median are left out of the background
        (their crosstalk halo would raise the victims' median).
    ceiling : float
        Source pixels at or above this signal are not used (their value is unknown, e.g. ADC-clipped).
    cell : (int, int)
        Rows and columns of the background cells; larger than the bright regions of a source.
    nsigma : float
        Clipping half-width in units of the victim noise.
    max_coeff : float
        Largest plausible ``|coefficient|`` (the first pass's window).
    niter : int
        Number of fitting passes (≥ 1).

    Returns
    -------
    XtalkFit
    """
    if not len(stacks):
        raise ValueError("no segment stacks given; pass the exposures with bright sources")
    if not (np.isfinite(bright) and bright > 0):
        raise ValueError(f"bright must be a positive signal in ADU, got {bright}")
    if not 0 < quiet <= bright:
        raise ValueError(f"quiet ({quiet}) must be positive and at most bright ({bright})")
    if not ceiling > bright:
        raise ValueError(f"ceiling ({ceiling}) must be above bright ({bright})")
    cy, cx = (int(c) for c in cell)
    if cy < 1 or cx < 1:
        raise ValueError(f"background cells must be at least 1×1 pixels, got {cell}")
    if not (nsigma > 0 and max_coeff > 0 and niter >= 1):
        raise ValueError(f"need nsigma > 0, max_coeff > 0 and niter ≥ 1; got {nsigma}, {max_coeff}, {niter}")
    arrays = []
    for s in stacks:
        arrays.append(_checked(s, arrays[0].shape if arrays else None))
    namp, h, w = arrays[0].shape
    ncy, ncx = -(-h // cy), -(-w // cx)
    buf = np.empty(h * w, np.float64)
    counts, bgs, cols, sigmas = [], [], [], []
    for segs in arrays:
        count = np.empty((h, w), np.int64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN amplifier has a NaN level
            level = np.nanmedian(segs.reshape(namp, -1), axis=1).astype(np.float64)
        _bright_count(segs, float(bright), level, float(quiet), count)
        bg = np.empty((namp, ncy, ncx), np.float64)
        _background(segs, count, cy, cx, bg, buf)
        col = np.empty((namp, w), np.float64)
        _columns(segs, count, bg, cy, cx, col, buf)
        sigma = np.empty(namp, np.float64)
        _noise(segs, count, bg, cy, cx, col, sigma, buf)
        counts.append(count)
        bgs.append(bg)
        cols.append(col)
        sigmas.append(sigma)
    hist = np.zeros((namp, namp, HIST_BINS), np.int64)
    for segs, count, bg, col, sigma in zip(arrays, counts, bgs, cols, sigmas):
        _histogram(segs, count, bg, cy, cx, col, float(bright), float(ceiling), sigma, float(max_coeff), hist)
    center = _histogram_median(hist, max_coeff)
    for _ in range(int(niter)):
        sums = np.zeros((namp, namp, 4))
        for segs, count, bg, col, sigma in zip(arrays, counts, bgs, cols, sigmas):
            _accumulate(segs, count, bg, cy, cx, col, float(bright), float(ceiling), sigma, center, float(nsigma), sums)
        coeff, error, npix = _solve(sums)
        center = coeff
    return XtalkFit(coeff=coeff, error=error, npix=npix)


def _histogram_median(hist: np.ndarray, max_coeff: float) -> np.ndarray:
    """Centre of the first histogram bin holding half of the pair's ratios (NaN for an empty histogram)."""
    nbins = hist.shape[2]
    cum = np.cumsum(hist, axis=2)
    n = cum[..., -1]
    k = np.argmax(2 * cum >= n[..., None], axis=2)
    return np.where(n > 0, -max_coeff + (k + 0.5) * (2.0 * max_coeff / nbins), np.nan)


def _solve(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficients, errors and pixel counts from the sums ``(n, Σ s², Σ d s, Σ d²)``."""
    n, sss, sds, sdd = (sums[..., k] for k in range(4))
    ok = (n >= MIN_PIXELS) & (sss > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(ok, sds / np.where(ok, sss, 1.0), np.nan)
        rss = np.maximum(sdd - 2.0 * c * sds + c * c * sss, 0.0)
        err = np.where(ok, np.sqrt(rss / np.maximum(n - 1.0, 1.0) / np.where(ok, sss, 1.0)), np.inf)
    return c, err, n.astype(np.int64)
