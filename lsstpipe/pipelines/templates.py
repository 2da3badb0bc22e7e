"""Templates for image differencing: the template patches, reading them from a repository, and warping them
onto a science CCD's pixel grid.

Templates are coadds in nJy per pixel, in patches with their own WCS (:class:`TemplatePatch`).
:func:`read_template_patches` (the stage's one I/O helper) finds the patches of a band that overlap a CCD and
reads them, memoised per file; :func:`warp_template` resamples them with Lanczos-3 (:mod:`kernels.warp`)
onto the science grid, converting to the science's electrons with its zero point. The subtraction itself is
:mod:`lsstpipe.pipelines.difference`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS

from kernels.astrometry import angular_separation_deg
from kernels.warp import WarpResult, grid_nodes, warp_image
from lsstpipe.io.filememo import FileMemo
from lsstpipe.io.fitsfile import read_image
from lsstpipe.pipelines.exposure import NJY_AB_ZP, MaskBit

__all__ = ["TemplatePatch", "read_template_patches", "warp_template"]


@dataclass(frozen=True)
class TemplatePatch:
    """One template patch: image in nJy per pixel, variance in nJy², its WCS, PSF FWHM (pixels; NaN if
    unknown) and an optional integer mask (0 = good, the ``NO_DATA`` bit = unusable)."""

    image: np.ndarray
    variance: np.ndarray
    wcs: WCS
    psf_fwhm_pix: float
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.image.ndim != 2 or self.variance.shape != self.image.shape:
            raise ValueError(f"template image {self.image.shape} and variance {self.variance.shape} must be the "
                             "same 2-D shape")  # fmt: skip
        if self.mask is not None and self.mask.shape != self.image.shape:
            raise ValueError(f"template mask {self.mask.shape} differs from its image {self.image.shape}")


# --------------------------------------------------------------------------------------------- I/O
def read_template_patches(repo_or_paths, band: str, ra: float, dec: float, radius_deg: float,
                          footprint=None, margin: int = 64) -> list[TemplatePatch]:  # fmt: skip
    """Template patches of ``band`` whose area comes within ``radius_deg`` of (ra, dec).

    With ``footprint`` — ``(ra, dec)`` arrays of points along the science CCD's boundary, degrees — only the
    part of each patch that covers the footprint's bounding box (plus ``margin`` pixels for the warp, the
    matching kernel and the edge border) is read, through memory maps: a worker holds a CCD's worth of
    template, not whole patches (a full-size LSSTCam CCD overlaps up to 9 patches of 200 MB).

    ``repo_or_paths``: an :class:`lsstpipe.repo.Repository`, a repository directory, or FITS file paths
    (HDUs IMAGE, VARIANCE, optional MASK with a celestial WCS; the primary header's PSFFWHM in arcsec and
    PIXSCALE give the PSF FWHM in pixels, else it is NaN). Files of another band (``BAND`` keyword) are
    skipped. A patch's mask is None when the file has none or when it flags no pixel of the part read.
    Returns an empty list where nothing overlaps.
    """
    from astropy.io import fits

    from lsstpipe.repo import Repository

    if isinstance(repo_or_paths, (str, os.PathLike)) and os.path.isdir(repo_or_paths):
        repo_or_paths = Repository(repo_or_paths)
    if isinstance(repo_or_paths, Repository):
        paths = [repo_or_paths.root / row["path"] for row in repo_or_paths.templates(band)]
    elif isinstance(repo_or_paths, (str, os.PathLike)):
        paths = [repo_or_paths]
    elif isinstance(repo_or_paths, Iterable):
        paths = list(repo_or_paths)
    else:
        raise ValueError(f"give a Repository, a repository directory or template paths, not {type(repo_or_paths)}")
    out = []
    for path in paths:
        info = _PATCH_INFO(path)
        if info.band not in (None, band):
            continue
        if info.problem:
            raise ValueError(info.problem)
        wcs, (ny, nx) = info.wcs, info.shape
        if not _overlaps(wcs, (ny, nx), ra, dec, radius_deg):
            continue
        cut = (slice(0, ny), slice(0, nx))
        if footprint is not None:
            fx, fy = wcs.all_world2pix(np.asarray(footprint[0], float), np.asarray(footprint[1], float), 0)
            x0, x1 = max(int(np.floor(np.min(fx))) - margin, 0), min(int(np.ceil(np.max(fx))) + margin + 1, nx)
            y0, y1 = max(int(np.floor(np.min(fy))) - margin, 0), min(int(np.ceil(np.max(fy))) + margin + 1, ny)
            if x1 <= x0 or y1 <= y0:
                continue
            cut = (slice(y0, y1), slice(x0, x1))
            wcs = wcs.slice(cut)
        else:
            wcs = wcs.deepcopy()  # the caller's own: the cached one stays as read
        with fits.open(path, memmap=False) as hdul:  # pixels by plain reads of the cut's rows (read_image)
            mask = read_image(hdul["MASK"], cut, np.int32) if info.has_mask else None
            if mask is not None and not mask.any():
                mask = None  # an all-good mask says nothing: a worker would hold (and warp) a plane of zeros
            image, variance = read_image(hdul["IMAGE"], cut), read_image(hdul["VARIANCE"], cut)
            out.append(TemplatePatch(image, variance, wcs, info.fwhm, mask))
    return out


@dataclass(frozen=True)
class _PatchInfo:
    """What a template patch's headers say: its band, WCS, shape, PSF FWHM (pixels), whether it has a mask,
    and what is wrong with it (None: nothing)."""

    band: str | None
    wcs: WCS | None
    shape: tuple[int, int]
    fwhm: float
    has_mask: bool
    problem: str | None = None


def _read_patch_info(path) -> _PatchInfo:
    from astropy.io import fits

    with fits.open(path, memmap=True) as hdul:
        hdr = hdul[0].header
        names = [h.name for h in hdul]
        band = hdr.get("BAND")
        band = None if band is None else str(band)
        if "IMAGE" not in names or "VARIANCE" not in names:
            return _PatchInfo(band, None, (0, 0), float("nan"), False,
                              f"template {path} lacks IMAGE/VARIANCE HDUs (has {names})")  # fmt: skip
        ihdr = hdul["IMAGE"].header
        fwhm = float("nan")
        if isinstance(hdr.get("PSFFWHM"), (int, float)) and isinstance(hdr.get("PIXSCALE"), (int, float)):
            fwhm = float(hdr["PSFFWHM"]) / float(hdr["PIXSCALE"])
        shape = (int(ihdr.get("ZNAXIS2", ihdr["NAXIS2"])), int(ihdr.get("ZNAXIS1", ihdr["NAXIS1"])))
        return _PatchInfo(band, WCS(ihdr), shape, fwhm, "MASK" in names)


#: Headers of the template patches, once per process and patch version: a worker tests every patch of the
#: band for overlap with each CCD, and parsing a compressed patch's headers and WCS costs ~5 ms (0.9 s per CCD
#: for the 100 patches of the demo repository, every CCD).
_PATCH_INFO: FileMemo[_PatchInfo] = FileMemo(_read_patch_info, 20000, "template")


def _overlaps(wcs: WCS, shape, ra: float, dec: float, radius_deg: float) -> bool:
    """Whether the circle of ``radius_deg`` about (ra, dec) reaches the patch (tested on a 9×9 grid of the
    patch and the circle's centre projected into it)."""
    ny, nx = shape
    gx, gy = np.meshgrid(np.linspace(-0.5, nx - 0.5, 9), np.linspace(-0.5, ny - 0.5, 9))
    pra, pdec = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    sep = angular_separation_deg(pra, pdec, ra, dec)
    step = np.hypot(nx, ny) / 8 * np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))
    if sep.min() <= radius_deg + step:
        return True
    x, y = wcs.all_world2pix(ra, dec, 0)
    return bool(-0.5 <= x <= nx - 0.5 and -0.5 <= y <= ny - 0.5)


# --------------------------------------------------------------------------------------------- warp
def warp_template(patches, wcs: WCS, shape: tuple[int, int], zero_point: float, step: int = 32, border: int = 0):
    """The template on the science grid in electrons: ``(image, variance, mask)`` (float32, float32, int32).

    Every patch is Lanczos-3 warped (``kernels.warp``, variance as noise density, flux conserved) from the
    science WCS (``wcs``, pixel origin 0) through the sky into its WCS; pixels no patch covers are
    ``NO_DATA`` with NaN image and variance. Patches fill pixels the earlier ones left empty. With
    ``border`` the grid extends that many pixels beyond the science frame on every side (shape
    ``(ny + 2 border, nx + 2 border)``, science pixel (0, 0) at (border, border)).
    """
    ny, nx = (int(s) + 2 * border for s in shape)
    if not math.isfinite(zero_point):
        raise ValueError(f"zero point must be finite, not {zero_point}")
    if border < 0:
        raise ValueError(f"border must be ≥ 0 pixels, not {border}")
    out = WarpResult(np.full((ny, nx), np.nan, np.float32), np.full((ny, nx), np.nan, np.float32),
                     np.full((ny, nx), int(MaskBit.NO_DATA), np.int32))  # fmt: skip
    xs, ys = grid_nodes((ny, nx), step)
    X, Y = np.meshgrid(xs - border, ys - border)
    ra, dec = wcs.all_pix2world(X, Y, 0)
    for p in patches:
        sx, sy = p.wcs.all_world2pix(ra, dec, 0)
        pny, pnx = p.image.shape
        inside = (sx > -3) & (sx < pnx + 2) & (sy > -3) & (sy < pny + 2)
        if not inside.any():
            continue
        warp_image(p.image, p.variance, p.mask, sx, sy, step, (ny, nx), out=out)
    scale = np.float32(10.0 ** (-0.4 * (NJY_AB_ZP - zero_point)))
    np.multiply(out.image, scale, out=out.image)
    np.multiply(out.variance, scale * scale, out=out.variance)
    return out.image, out.variance, out.mask
