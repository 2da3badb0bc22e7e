"""DIASources: detection and measurement on the difference image, forced photometry on the calexp.

A pure stage (no I/O). On the decorrelated difference image, positive and negative sources are detected
with the PSF-matched filter at ``threshold`` σ (:func:`lsstpipe.pipelines.detection.detect_and_measure`
with ``negative=True``; the difference is already at zero, so no background is fitted), measured (windowed
centroid, aperture flux, second moments, trail length and angle, flags), given a PSF flux with the science
PSF model at the centroid (:func:`kernels.forced.forced_psf_flux`), sky coordinates from the calexp's WCS,
calibrated fluxes in nJy from the zero point, and the forced PSF flux of the calexp at the same position
(what Rubin's ``DiaSource`` calls ``scienceFlux``). Opposite-sign neighbours within 2 FWHM are ``DIPOLE``;
elongated sources with ``trail_length`` beyond 2 FWHM are ``TRAILED`` (fast movers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kernels import measure as M
from kernels.forced import FAILED as FORCED_FAILED
from kernels.forced import forced_psf_flux, gaussian_stamps
from lsstpipe.pipelines.detection import detect_and_measure
from lsstpipe.pipelines.exposure import NJY_AB_ZP, Exposure, MaskBit

__all__ = ["DIA_DTYPE", "DiaSourceConfig", "NJY_AB_ZP", "bbox_size", "dia_sources", "forced_photometry", "psf_stamp_size",
           "njy_per_electron"]  # fmt: skip


#: One row per DIASource. Positions 0-based pixels of the CCD; angles radians from +x towards +y; fluxes
#: in nJy (``*_flux``) with the sign of the difference; ``flags`` are :mod:`kernels.measure` bits plus
#: :data:`FORCED_FAILED_FLAG` when the calexp's forced flux could not be measured.
DIA_DTYPE = np.dtype(
    [
        ("id", "i8"), ("x", "f8"), ("y", "f8"), ("ra", "f8"), ("dec", "f8"), ("psf_flux", "f8"),
        ("psf_flux_err", "f8"), ("ap_flux", "f8"), ("ap_flux_err", "f8"), ("science_flux", "f8"),
        ("science_flux_err", "f8"), ("snr", "f8"), ("ixx", "f8"), ("iyy", "f8"), ("ixy", "f8"),
        ("trail_length", "f8"), ("trail_angle", "f8"), ("npix", "i8"), ("bbox_size", "i4"), ("is_negative", "?"),
        ("is_dipole", "?"), ("is_trailed", "?"), ("flags", "i8"),
    ]
)  # fmt: skip


def bbox_size(sources: np.ndarray | np.void) -> np.ndarray:
    """Rubin's ``bboxSize`` of DIASource rows (an array or one row): the side of the square holding each
    footprint's bounding box — their ``bbox_size``; for rows from before that column, the side of a square of
    the footprint's area, ``ceil(sqrt(npix))`` (0 without ``npix`` either)."""
    names = sources.dtype.names or ()
    if "bbox_size" in names:
        return np.asarray(sources["bbox_size"], np.int64)
    npix = (
        np.maximum(np.asarray(sources["npix"], np.int64), 0)
        if "npix" in names
        else np.zeros(np.shape(sources), np.int64)
    )
    return np.ceil(np.sqrt(npix)).astype(np.int64)


#: Flag bit (beyond :mod:`kernels.measure`'s) for a failed forced measurement on the calexp.
FORCED_FAILED_FLAG = 1 << 16

#: Mask bits that exclude a difference-image pixel from detection and measurement.
BAD_BITS = int(MaskBit.NO_DATA | MaskBit.BAD | MaskBit.SAT)

PsfStamps = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
"""``psf_stamps(x, y, size) -> (n, size, size)`` normalised PSF images in :func:`kernels.forced.forced_psf_flux`'s
convention (stamp pixel ``(i, j)`` covers image pixel ``(round(y) - size//2 + i, round(x) - size//2 + j)``)."""


@dataclass(frozen=True)
class DiaSourceConfig:
    """Settings of :func:`dia_sources`."""

    threshold: float = 5.0
    """Detection threshold in σ of the PSF-matched filtered difference image."""
    stamp_size: int = 0
    """PSF stamp size in pixels (odd); 0: the odd size nearest 6 × FWHM, at least 15."""
    deblend_prominence: float = 3.0
    """Split footprints at peaks this many σ above the valley (0: never)."""

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"threshold must be positive (σ), got {self.threshold}")
        if self.stamp_size < 0 or (self.stamp_size and self.stamp_size % 2 == 0):
            raise ValueError(f"stamp_size must be 0 or a positive odd number, got {self.stamp_size}")
        if self.deblend_prominence < 0:
            raise ValueError(f"deblend_prominence must be ≥ 0, got {self.deblend_prominence}")


def njy_per_electron(zero_point: float) -> float:
    """nJy of one electron for a zero point (magnitude of a source giving 1 e⁻)."""
    if not np.isfinite(zero_point):
        raise ValueError(f"zero point must be finite, got {zero_point}; calibrate the exposure first")
    return float(10.0 ** (0.4 * (NJY_AB_ZP - zero_point)))


def psf_stamp_size(config: DiaSourceConfig, fwhm: float) -> int:
    """Side (odd, pixels) of the PSF stamps of the DIASource fits: ``config.stamp_size``, else the odd size
    nearest 6 × ``fwhm``, at least 15."""
    if config.stamp_size:
        return config.stamp_size
    s = max(15, int(round(6 * fwhm)))
    return s + 1 - s % 2


def forced_photometry(exposure: Exposure, x, y, psf_stamps: PsfStamps | None, psf_fwhm: float,
                      zero_point: float, stamp_size: int = 0):  # fmt: skip
    """Forced PSF fluxes (nJy) of ``exposure`` at ``(x, y)``: ``(flux, flux_err, flags)``.

    ``psf_stamps`` gives the PSF at each position (a circular Gaussian of ``psf_fwhm`` if None); NO_DATA,
    BAD and SAT pixels are excluded.
    """
    x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
    size = stamp_size or psf_stamp_size(DiaSourceConfig(), psf_fwhm)
    stamps = psf_stamps(x, y, size) if psf_stamps is not None else gaussian_stamps(x, y, psf_fwhm, size)
    bad = (exposure.mask & BAD_BITS) != 0
    f, e, flags = forced_psf_flux(exposure.image, exposure.variance, x, y, stamps, mask=bad)
    scale = njy_per_electron(zero_point)
    return f * scale, e * scale, flags


def dia_sources(
    difference_image: np.ndarray,
    difference_variance: np.ndarray,
    difference_mask: np.ndarray,
    calexp: Exposure,
    psf_fwhm: float,
    zero_point: float,
    wcs=None,
    psf_stamps: PsfStamps | None = None,
    config: DiaSourceConfig = DiaSourceConfig(),
) -> np.ndarray:
    """Detect and measure the DIASources of one CCD.

    Parameters
    ----------
    difference_image, difference_variance, difference_mask : numpy.ndarray
        The decorrelated difference image (electrons, on the calexp's grid), its variance and mask
        (:class:`MaskBit`). Not modified.
    calexp : Exposure
        The background-subtracted calibrated exposure (forced photometry).
    psf_fwhm : float
        FWHM (pixels) of the difference image's PSF (the matched filter).
    zero_point : float
        Magnitude of a source giving 1 e⁻ (fluxes come out in nJy).
    wcs : astropy.wcs.WCS, optional
        The calexp's WCS; ``ra``/``dec`` are NaN without one.
    psf_stamps : callable, optional
        The science PSF model (see :data:`PsfStamps`); a Gaussian of ``psf_fwhm`` if None.
    config : DiaSourceConfig

    Returns
    -------
    numpy.ndarray
        :data:`DIA_DTYPE` rows, positive sources first.
    """
    shape = calexp.shape
    for name, a in (("image", difference_image), ("variance", difference_variance), ("mask", difference_mask)):
        if np.shape(a) != shape:
            raise ValueError(f"difference {name} has shape {np.shape(a)}; the calexp is {shape}")
    bad = (np.asarray(difference_mask) & BAD_BITS) != 0
    if bad.all():
        return np.zeros(0, DIA_DTYPE)
    cat = detect_and_measure(
        difference_image, difference_variance, bad, psf_fwhm=psf_fwhm, threshold=config.threshold,
        negative=True, subtract_background=False, deblend_prominence=config.deblend_prominence or None,
    )  # fmt: skip
    out = np.zeros(len(cat), DIA_DTYPE)
    if not len(cat):
        return out
    scale = njy_per_electron(zero_point)
    x, y = cat["x"], cat["y"]
    size = psf_stamp_size(config, psf_fwhm)
    stamps = psf_stamps(x, y, size) if psf_stamps is not None else gaussian_stamps(x, y, psf_fwhm, size)
    pf, pe, _ = forced_psf_flux(difference_image, difference_variance, x, y, stamps, mask=bad)
    sf, se, sflags = forced_photometry(calexp, x, y, psf_stamps, psf_fwhm, zero_point, size)
    out["id"] = cat["id"]
    out["x"], out["y"] = x, y
    if wcs is not None:
        out["ra"], out["dec"] = wcs.all_pix2world(x, y, 0)
    else:
        out["ra"] = out["dec"] = np.nan
    out["psf_flux"], out["psf_flux_err"] = pf * scale, pe * scale
    out["ap_flux"], out["ap_flux_err"] = cat["flux"] * scale, cat["flux_err"] * scale
    out["science_flux"], out["science_flux_err"] = sf, se
    out["snr"] = cat["snr"]
    out["ixx"], out["iyy"], out["ixy"] = cat["x2"], cat["y2"], cat["xy"]
    out["trail_length"], out["trail_angle"] = cat["trail_length"], cat["trail_angle"]
    out["npix"] = cat["npix"]
    out["bbox_size"] = cat["bbox_size"]
    flags = cat["flags"].copy()
    flags[(sflags & FORCED_FAILED) != 0] |= FORCED_FAILED_FLAG
    out["flags"] = flags
    out["is_negative"] = cat["sign"] < 0
    out["is_dipole"] = (flags & M.DIPOLE) != 0
    out["is_trailed"] = (flags & M.TRAILED) != 0
    return out
