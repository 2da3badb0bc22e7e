"""Postage-stamp cutouts for alerts: science, template and difference images around a DIASource, as FITS bytes.

Layout (the one Rubin's ``ap_association`` writes through :class:`astropy.nddata.CCDData`, so that
``CCDData.read(io.BytesIO(data))`` reads it back): the primary HDU holds the image calibrated to nJy
(``BUNIT = 'nJy'``) with the cutout's WCS; an ``UNCERT`` image extension the variance in nJy²
(``UTYPE = 'VarianceUncertainty'``); a ``MASK`` extension the int32 :class:`~lsstpipe.pipelines.exposure.MaskBit`
plane (not CCDData's uint8, which would drop bits above 128). Planes that are not given are left out (the
template has no variance or mask of its own). ``CUTMINX``/``CUTMINY`` give the 0-based CCD pixel of the
cutout's pixel (0, 0), so the stamp can be placed back on the CCD.

Size and centring: the stamp is square, ``2 * round(size_arcsec / 2 / scale) + 1`` pixels on a side (151 px,
30.2″ at 0.2″/px, for the default 30″), the odd size so that the pixel holding the source centroid is the
central pixel ``(n // 2, n // 2)``. Near a CCD edge the stamp keeps its full size and position: the part
outside the CCD is NaN in the image and variance and ``NO_DATA`` in the mask, so every alert's stamp has the
same shape and the source stays at the centre.

WCS: the CCD's WCS (TAN-SIP) shifted to the cutout's origin with :class:`astropy.nddata.Cutout2D`, written
with its SIP terms (``relax=True``). The bytes are deterministic: no dates and no checksums are written.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from lsstpipe.pipelines.exposure import MaskBit

__all__ = ["CUTOUT_SIZE_ARCSEC", "Cutout", "Cutouts", "ccd_cutouts", "cutout_size_pixels", "make_cutout",
           "read_cutout"]  # fmt: skip

#: Default side of the square cutouts (arcseconds).
CUTOUT_SIZE_ARCSEC = 30.0


def cutout_size_pixels(wcs: WCS, size_arcsec: float = CUTOUT_SIZE_ARCSEC) -> int:
    """Odd number of pixels on a side of a ``size_arcsec`` stamp, from the WCS's mean pixel scale."""
    if not (np.isfinite(size_arcsec) and size_arcsec > 0):
        raise ValueError(f"cutout size must be a positive number of arcseconds, got {size_arcsec}")
    scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"the WCS has no usable pixel scale ({scale} arcsec/px); pass the calexp's celestial WCS")
    return 2 * int(round(size_arcsec / 2.0 / scale)) + 1


def make_cutout(
    image: np.ndarray,
    x: float,
    y: float,
    wcs: WCS,
    size: int,
    variance: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    flux_scale: float = 1.0,
) -> bytes:
    """FITS bytes of a ``size`` × ``size`` stamp of ``image`` centred on the pixel holding ``(x, y)``.

    Parameters
    ----------
    image : numpy.ndarray
        2-D CCD image (electrons). Not modified.
    x, y : float
        0-based pixel position of the source on the CCD.
    wcs : astropy.wcs.WCS
        The CCD's WCS (pixel origin 0 as in astropy).
    size : int
        Odd side of the stamp in pixels (:func:`cutout_size_pixels`).
    variance, mask : numpy.ndarray, optional
        Variance (electrons²) and int mask planes of the same shape; written as ``UNCERT`` and ``MASK``.
    flux_scale : float
        nJy per electron (:func:`lsstpipe.pipelines.diasources.njy_per_electron`); the variance is scaled by
        its square.

    Returns
    -------
    bytes
        A FITS file (see the module docstring for the HDUs).
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D, got shape {image.shape}")
    if not (isinstance(size, (int, np.integer)) and size > 0 and size % 2 == 1):
        raise ValueError(f"cutout size must be a positive odd number of pixels, got {size}")
    if not (np.isfinite(x) and np.isfinite(y)):
        raise ValueError(f"source position must be finite, got x={x}, y={y}")
    if not (np.isfinite(flux_scale) and flux_scale > 0):
        raise ValueError(f"flux_scale (nJy per electron) must be positive, got {flux_scale}; calibrate first")
    for name, plane in (("variance", variance), ("mask", mask)):
        if plane is not None and np.shape(plane) != image.shape:
            raise ValueError(f"{name} has shape {np.shape(plane)}; the image is {image.shape}")
    ny, nx = image.shape
    half = size // 2
    if not (-0.5 - half <= x < nx - 0.5 + half and -0.5 - half <= y < ny - 0.5 + half):
        raise ValueError(f"source at ({x:.2f}, {y:.2f}) lies outside the {nx}×{ny} CCD")
    # a centroid just off the edge (a source cut by it) gets the cutout at the nearest edge pixel
    pos = (float(min(max(round(x), 0), nx - 1)), float(min(max(round(y), 0), ny - 1)))
    cut = Cutout2D(image.astype(np.float32, copy=False), pos, (size, size), wcs=wcs, mode="partial",
                   fill_value=np.nan, copy=True)  # fmt: skip
    header = cut.wcs.to_header(relax=True)
    header["CUTMINX"] = (int(pos[0]) - size // 2, "0-based CCD x of cutout pixel (0, 0)")
    header["CUTMINY"] = (int(pos[1]) - size // 2, "0-based CCD y of cutout pixel (0, 0)")
    header["BUNIT"] = "nJy"
    data = (cut.data * np.float32(flux_scale)).astype(np.float32)
    hdus = [fits.PrimaryHDU(data, header=header)]
    if variance is not None:
        var = _partial(np.asarray(variance, np.float32), cut, size, np.nan) * np.float32(flux_scale**2)
        h = fits.ImageHDU(var.astype(np.float32), name="UNCERT")
        h.header["UTYPE"] = "VarianceUncertainty"
        h.header["BUNIT"] = "nJy2"
        hdus.append(h)
    if mask is not None:
        m = _partial(np.asarray(mask, np.int32), cut, size, int(MaskBit.NO_DATA))
        hdus.append(fits.ImageHDU(m.astype(np.int32), name="MASK"))
    buf = io.BytesIO()
    # every card comes from astropy's own WCS.to_header or is a plain keyword set above: FITS verification
    # (≈5 ms per stamp) would find nothing, and the tests read every stamp back
    fits.HDUList(hdus).writeto(buf, output_verify="ignore")
    return buf.getvalue()


def _partial(plane: np.ndarray, cut: Cutout2D, size: int, fill) -> np.ndarray:
    """The same stamp as ``cut`` from another plane, ``fill`` outside the CCD."""
    out = np.full((size, size), fill, plane.dtype)
    out[cut.slices_cutout] = plane[cut.slices_original]
    return out


@dataclass(frozen=True)
class Cutout:
    """A decoded cutout (:func:`read_cutout`)."""

    image: np.ndarray
    variance: np.ndarray | None
    mask: np.ndarray | None
    wcs: WCS
    header: fits.Header


def read_cutout(data: bytes) -> Cutout:
    """Decode the FITS bytes of an alert cutout (ours, or any single-image FITS with an optional WCS)."""
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise ValueError("cutout must be non-empty FITS bytes (the alert's cutoutScience/Template/Difference)")
    with fits.open(io.BytesIO(data)) as hdul:
        header = hdul[0].header.copy()
        image = np.array(hdul[0].data)
        variance = np.array(hdul["UNCERT"].data) if "UNCERT" in hdul else None
        mask = np.array(hdul["MASK"].data) if "MASK" in hdul else None
    return Cutout(image, variance, mask, WCS(header), header)


@dataclass(frozen=True)
class Cutouts:
    """The three FITS cutouts of one alert (None where the image is not available)."""

    science: bytes | None
    template: bytes | None
    difference: bytes | None


def ccd_cutouts(calexp, difference, wcs: WCS, zero_point: float, x: float, y: float,
                size_arcsec: float = CUTOUT_SIZE_ARCSEC) -> Cutouts:  # fmt: skip
    """Science, template and difference cutouts of one DIASource of a processed CCD.

    Parameters
    ----------
    calexp : lsstpipe.pipelines.exposure.Exposure
        The calexp (``CcdResult.calexp``): image, variance and mask.
    difference : lsstpipe.pipelines.difference.Difference or None
        ``CcdResult.difference``: its image/variance/mask give the difference cutout and its PSF-matched
        ``template`` (on the calexp's grid) the template cutout. None: both are None.
    wcs : astropy.wcs.WCS
        The calexp's WCS (``CcdResult.characterization.wcs``).
    zero_point : float
        Magnitude of 1 e⁻ (cutouts are calibrated to nJy).
    x, y : float
        The DIASource's pixel position.
    """
    from lsstpipe.pipelines.diasources import njy_per_electron

    if wcs is None:
        raise ValueError("cutouts need the calexp's WCS; this CCD has no astrometric solution")
    scale = njy_per_electron(zero_point)
    size = cutout_size_pixels(wcs, size_arcsec)
    science = make_cutout(calexp.image, x, y, wcs, size, calexp.variance, calexp.mask, scale)
    if difference is None:
        return Cutouts(science, None, None)
    diff = make_cutout(difference.image, x, y, wcs, size, difference.variance, difference.mask, scale)
    template = make_cutout(difference.template, x, y, wcs, size, flux_scale=scale)
    return Cutouts(science, template, diff)
