"""Detection and measurement stage: background, PSF-matched detection, measurement, flags.

A pure stage: arrays in, a numpy structured array (the source catalogue) out; no I/O. It works on a calexp
(``negative=False``) and on a difference image (``negative=True``: negative footprints too, and the dipole
flag), and on any image without a variance plane (the variance is then the background's rms², plus the
sources' Poisson noise if a gain is given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kernels import measure as M
from kernels.background import estimate_background
from kernels.background import subtract_background as _subtract
from kernels.detect import deblend, find_footprints, matched_filter

#: dtype of the catalogue: positions are 0-based pixel centres; theta and trail_angle in radians,
#: counter-clockwise from +x; fluxes in the image's units (negative for negative sources).
CATALOG_DTYPE = np.dtype(
    [
        ("id", "i8"), ("x", "f8"), ("y", "f8"), ("flux", "f8"), ("flux_err", "f8"), ("psf_flux", "f8"),
        ("psf_flux_err", "f8"), ("a", "f8"), ("b", "f8"), ("theta", "f8"), ("x2", "f8"), ("y2", "f8"),
        ("xy", "f8"), ("trail_length", "f8"), ("trail_angle", "f8"), ("snr", "f8"), ("npix", "i8"),
        ("bbox_size", "i4"), ("sign", "i1"), ("flags", "i8"),
    ]
)  # fmt: skip


@dataclass(frozen=True)
class DetectionSummary:
    """What the stage used and found, for logs and SDQA."""

    psf_fwhm: float  #: FWHM (pixels) of the matched filter and PSF photometry
    psf_fwhm_estimated: bool  #: whether it was measured from the image
    aperture_radius: float  #: radius (pixels) of the ``flux`` aperture
    background_level: float  #: median sky level of the background mesh
    background_rms: float  #: median noise of the background mesh
    threshold: float  #: detection threshold in σ of the filtered image
    psf_aperture_correction: float  #: factor applied to ``psf_flux`` to put it on the aperture's scale
    n_positive: int
    n_negative: int


def _weighted_size(data, usable, xs, ys, sigma_w):
    """Gaussian-weighted second moment (per axis, averaged) of sources at (xs, ys), window σ = sigma_w."""
    R = int(math.ceil(4 * sigma_w)) + 1
    ny, nx = data.shape
    out = np.full(xs.size, np.nan)
    for k, (x0, y0) in enumerate(zip(xs, ys)):
        ix, iy = int(round(x0)), int(round(y0))
        if ix - R < 0 or iy - R < 0 or ix + R >= nx or iy + R >= ny:
            continue
        st = data[iy - R : iy + R + 1, ix - R : ix + R + 1].astype(np.float64)
        ok = usable[iy - R : iy + R + 1, ix - R : ix + R + 1]
        if not ok.all():
            continue
        yy, xx = np.mgrid[iy - R : iy + R + 1, ix - R : ix + R + 1]
        r2 = (xx - x0) ** 2 + (yy - y0) ** 2
        w = np.exp(-r2 / (2 * sigma_w**2)) * st
        sw = w.sum()
        if sw > 0:
            out[k] = (w * r2).sum() / sw / 2.0
    return out


def estimate_psf_fwhm(data, variance, usable, guess: float = 4.0, n_max: int = 200) -> float:
    """FWHM (pixels) of the PSF from the Gaussian-weighted sizes of bright, unflagged sources.

    Sources are detected at 10σ once, with a filter of FWHM ``guess``; for a Gaussian of σ_s in a window of
    σ_w the weighted moment is m = σ_s² σ_w² / (σ_s² + σ_w²), so σ_s² = m σ_w² / (σ_w² − m); the window
    is then set to the estimate and the estimate refined until it changes by < 1 %. Raises ``ValueError``
    when fewer than 3 stars are usable.
    """
    fwhm = float(guess)
    sn = matched_filter(data, variance, fwhm, mask=~usable)
    fp = find_footprints(sn, 10.0, negative=False)
    if len(fp) < 3:
        raise ValueError("too few bright sources to measure the PSF; give its FWHM (psf_fwhm / --fwhm)")
    vals, flags = M.measure_footprints(data, variance, fp, fwhm, 2 * fwhm, mask=~usable)
    good = (flags == 0) & np.isfinite(vals[:, 0]) & (fp.npix < 2000)
    order = np.argsort(-fp.peak_sn[good])[:n_max]
    xs, ys = vals[good, 0][order], vals[good, 1][order]
    for _ in range(6):
        sigma_w = fwhm / 2.3548200450309493
        m = _weighted_size(data, usable, xs, ys, sigma_w)
        m = m[np.isfinite(m) & (m > 0) & (m < 0.95 * sigma_w**2)]
        if m.size < 3:
            raise ValueError("too few clean stars to measure the PSF; give its FWHM (psf_fwhm / --fwhm)")
        new = float(np.clip(2.3548200450309493 * math.sqrt(float(np.median(m * sigma_w**2 / (sigma_w**2 - m)))),
                            0.5, 50.0))  # fmt: skip
        converged = abs(new - fwhm) < 0.01 * fwhm
        fwhm = new
        if converged:
            break
    return fwhm


def detect_and_measure(
    image,
    variance=None,
    mask=None,
    psf_fwhm: float | None = None,
    threshold: float = 5.0,
    *,
    negative: bool = False,
    subtract_background: bool = True,
    box: int = 128,
    aperture_radius: float | None = None,
    saturation: float | None = None,
    gain: float | None = None,
    min_pixels: int = 1,
    trail_min: float | None = None,
    deblend_prominence: float | None = 3.0,
    return_summary: bool = False,
):
    """Detect and measure the sources of one image.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image (calexp or difference image), any numeric dtype; NaN/inf pixels are masked. Not modified.
    variance : numpy.ndarray, optional
        Its variance plane. If None: the background rms² (plus ``max(D, 0) / gain`` if ``gain`` is given).
    mask : numpy.ndarray, optional
        Non-zero pixels are bad: excluded from the background, the filter and every measurement.
    psf_fwhm : float, optional
        PSF FWHM in pixels; measured from the image's bright stars if None.
    threshold : float
        Detection threshold in σ of the matched-filtered image.
    negative : bool
        Also detect negative sources (difference images); sets ``NEGATIVE`` and ``DIPOLE`` flags.
    subtract_background : bool
        Fit and subtract a mesh background (``box`` pixels); False for difference images already at zero.
    aperture_radius : float, optional
        Radius of the ``flux`` aperture in pixels (default 2 × FWHM).
    saturation : float, optional
        Pixels at or above this level are saturated: detected, but excluded from the background and from
        every measurement; their sources are flagged ``SATURATED``.
    gain : float, optional
        e⁻ per image unit, for the sources' Poisson noise when ``variance`` is None.
    min_pixels : int
        Smallest footprint kept.
    trail_min : float, optional
        ``TRAILED`` is set when the trail length exceeds this (default 2 × FWHM) at S/N ≥ 2 × threshold and
        the source is not ``SHARP`` (minor-axis rms below half the PSF σ: cosmic rays, hot pixels).
    deblend_prominence : float or None
        Split footprints at peaks that stand this many σ (of the filtered image) above the valley to every
        brighter peak (:func:`kernels.detect.deblend`); None or 0: no deblending. Children get ``BLENDED``.
    return_summary : bool
        Also return a :class:`DetectionSummary`.

    Returns
    -------
    numpy.ndarray
        Structured array of :data:`CATALOG_DTYPE`, positive sources first; ``flux`` is the aperture flux and
        ``psf_flux`` the Gaussian-PSF flux scaled by the median aperture/PSF ratio of bright clean stars; with ``return_summary`` a tuple
        ``(catalogue, summary)``.

    Raises
    ------
    ValueError
        For an image that is not 2-D numeric, has no finite unmasked pixel, or mismatched planes.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.size == 0 or img.dtype.kind not in "fiu":
        raise ValueError(f"image must be a non-empty 2-D numeric array, got {img.dtype} {img.shape}")
    if img.dtype not in (np.float32, np.float64) or not img.dtype.isnative:
        img = img.astype(np.float32)
    usable = np.isfinite(img)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != img.shape:
            raise ValueError(f"mask shape {mask.shape} differs from image shape {img.shape}")
        usable &= mask == 0
    if variance is not None:
        variance = np.asarray(variance)
        if variance.shape != img.shape:
            raise ValueError(f"variance shape {variance.shape} differs from image shape {img.shape}")
        usable &= variance >= 0  # False for NaN; the kernels also skip infinite variances
    if not usable.any():
        raise ValueError("the image has no finite, unmasked pixel (all NaN/inf or masked): nothing to detect")
    saturated = None
    bad = ~usable
    if saturation is not None:
        # saturated pixels are detected (their clipped values are still bright) but never measured
        with np.errstate(invalid="ignore"):
            saturated = usable & (img >= saturation)

    if subtract_background:
        bkg = estimate_background(img, mask=bad if saturated is None else bad | saturated, box=box)
        data = _subtract(img, bkg)
        bg_level, bg_rms = bkg.global_level, bkg.global_rms
    else:
        bkg, data = None, img
        bg_level = 0.0
        bg_rms = float(np.std(img[usable]))
    if variance is None:
        variance = bkg.rms_image() ** 2 if bkg is not None else np.full(img.shape, bg_rms**2, np.float32)
        if gain is not None:
            if not gain > 0:
                raise ValueError(f"gain must be positive, got {gain}")
            variance += np.where(usable, np.maximum(data, 0), 0) / np.float32(gain)

    estimated = psf_fwhm is None
    if estimated:
        psf_fwhm = estimate_psf_fwhm(data, variance, usable if saturated is None else usable & ~saturated)
    if not (np.isfinite(psf_fwhm) and psf_fwhm > 0):
        raise ValueError(f"PSF FWHM must be a positive number of pixels, got {psf_fwhm}")
    radius = 2.0 * psf_fwhm if aperture_radius is None else float(aperture_radius)

    sn = matched_filter(data, variance, psf_fwhm, mask=bad)
    fp = find_footprints(sn, threshold, negative=negative, min_pixels=min_pixels)
    if deblend_prominence is not None and deblend_prominence > 0:
        fp = deblend(sn, fp, prominence=deblend_prominence)
    vals, flags = M.measure_footprints(data, variance, fp, psf_fwhm, radius, mask=bad, saturated=saturated)

    cat = np.zeros(len(fp), CATALOG_DTYPE)
    cat["id"] = np.arange(len(fp))
    for i, name in enumerate(M.COLUMNS):
        if name in CATALOG_DTYPE.names:
            cat[name] = vals[:, i]
    cat["snr"], cat["npix"], cat["sign"] = fp.peak_sn, fp.npix, fp.sign
    if len(fp):  # the side of the square that holds the footprint's bounding box (Rubin's bboxSize)
        cat["bbox_size"] = np.maximum(fp.bbox[:, 1] - fp.bbox[:, 0], fp.bbox[:, 3] - fp.bbox[:, 2]) + 1
    apcorr = _aperture_correction(cat, flags, threshold)
    cat["psf_flux"] *= apcorr
    cat["psf_flux_err"] *= apcorr
    psf_sigma = psf_fwhm / 2.3548200450309493
    sharp = (cat["b"] < 0.5 * psf_sigma) & (np.abs(cat["snr"]) >= 2 * threshold)
    trail_min = 2.0 * psf_fwhm if trail_min is None else trail_min
    trailed = (cat["trail_length"] > trail_min) & (np.abs(cat["snr"]) >= 2 * threshold) & ~sharp
    flags[sharp] |= M.SHARP
    flags[trailed] |= M.TRAILED
    if negative and len(fp):
        flags |= _dipoles(cat, 2.0 * psf_fwhm)
    siblings = np.bincount(fp.parent)[fp.parent] if len(fp) else np.zeros(0, np.int64)
    flags[siblings > 1] |= M.BLENDED
    cat["flags"] = flags
    if return_summary:
        summary = DetectionSummary(float(psf_fwhm), estimated, radius, bg_level, bg_rms, float(threshold),
                                   apcorr, int((fp.sign > 0).sum()), int((fp.sign < 0).sum()))  # fmt: skip
        return cat, summary
    return cat


def _aperture_correction(cat, flags, threshold: float) -> float:
    """Median aperture/PSF flux ratio of clean, bright (S/N ≥ 4 × threshold) positive sources; 1 if < 5."""
    good = (flags == 0) & (cat["sign"] > 0) & (cat["snr"] >= 4 * threshold) & (cat["psf_flux"] > 0)
    good &= np.isfinite(cat["flux"])
    if good.sum() < 5:
        return 1.0
    return float(np.median(cat["flux"][good] / cat["psf_flux"][good]))


def _dipoles(cat, radius: float) -> np.ndarray:
    """``DIPOLE`` for every source with one of the opposite sign within ``radius`` pixels."""
    from scipy.spatial import cKDTree

    out = np.zeros(cat.size, np.int64)
    pos, neg = np.flatnonzero(cat["sign"] > 0), np.flatnonzero(cat["sign"] < 0)
    if pos.size == 0 or neg.size == 0:
        return out
    xy = np.nan_to_num(np.column_stack([cat["x"], cat["y"]]), nan=-1e9)
    tree = cKDTree(xy[neg])
    dist, _ = tree.query(xy[pos], distance_upper_bound=radius)
    hit = pos[np.isfinite(dist)]
    out[hit] = M.DIPOLE
    dist, _ = cKDTree(xy[pos]).query(xy[neg], distance_upper_bound=radius)
    out[neg[np.isfinite(dist)]] = M.DIPOLE
    return out
