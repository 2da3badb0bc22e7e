"""What one detector sees in one exposure: the sources on it, where, how bright, with which PSF.

The PSF is an elliptical Moffat (β = 3.5) whose FWHM is the visit's seeing, growing by 4 % towards the
field edge, with a tangential ellipticity pattern of up to 0.04 plus a constant 0.01 astigmatism term; it
is a smooth function of focal-plane position (LSSTCam-equivalent mm, so the ``mini`` camera sees the
same PSF as the LSSTCam detectors it stands for).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lsstpipe.camera import Camera, Detector
from lsstpipe.sim import sky as skymod

PSF_BETA = 3.5
#: Wavefront sensors sit 1.5 mm out of focus in the f/1.23 beam: each star is a donut of 1.5/1.234 mm
#: (122 pixels) outer diameter, with the central obscuration's hole (61 % of the diameter).
DONUT_RADIUS_PIX = 61.0
DONUT_OBSCURATION = 0.61
#: LSSTCam field radius in mm used to normalise the PSF variation.
FIELD_EDGE_MM = 317.0


@dataclass(frozen=True)
class PsfModel:
    """The exposure's PSF as a function of focal-plane position."""

    seeing_arcsec: float
    pixel_scale: float
    mm_scale: float  # LSSTCam mm per camera mm (8 for mini)

    def at(self, fx_mm, fy_mm):
        """(fwhm_pixels, e1, e2, beta) at focal-plane positions (camera mm)."""
        fx = np.asarray(fx_mm, dtype=float) * self.mm_scale
        fy = np.asarray(fy_mm, dtype=float) * self.mm_scale
        rho2 = (fx**2 + fy**2) / FIELD_EDGE_MM**2
        phi = np.arctan2(fy, fx)
        fwhm = self.seeing_arcsec / self.pixel_scale * (1.0 + 0.04 * rho2)
        e1 = -0.04 * rho2 * np.cos(2 * phi) + 0.01
        e2 = -0.04 * rho2 * np.sin(2 * phi)
        return fwhm, e1, e2, np.full(np.shape(fwhm), PSF_BETA)

    def describe(self) -> dict:
        return {
            "model": "elliptical Moffat",
            "beta": PSF_BETA,
            "fwhm_pixels": "seeing/pixel_scale * (1 + 0.04 rho^2), rho = r_fp / 317 mm (LSSTCam-equivalent)",
            "e1": "-0.04 rho^2 cos(2 phi) + 0.01",
            "e2": "-0.04 rho^2 sin(2 phi)",
            "seeing_arcsec": self.seeing_arcsec,
            "pixel_scale_arcsec": self.pixel_scale,
        }


@dataclass
class Sources:
    """Sources falling on (or near) one detector in one exposure; every array has one entry per source."""

    id: np.ndarray
    kind: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    x: np.ndarray
    y: np.ndarray
    x_end: np.ndarray
    y_end: np.ndarray
    mag: np.ndarray
    flux_e: np.ndarray
    fwhm: np.ndarray
    e1: np.ndarray
    e2: np.ndarray

    def __len__(self) -> int:
        return len(self.id)

    @classmethod
    def concat(cls, parts: list[Sources]) -> Sources:
        fields = cls.__dataclass_fields__
        return cls(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})

    @property
    def trail_length(self) -> np.ndarray:
        return np.hypot(self.x_end - self.x, self.y_end - self.y)

    @property
    def trail_angle(self) -> np.ndarray:
        """Trail direction in degrees from +x towards +y."""
        return np.rad2deg(np.arctan2(self.y_end - self.y, self.x_end - self.x))


def mm_scale(camera: Camera) -> float:
    return 127.0 / camera.raft_pitch_mm


def _on_detector(detector: Detector, x, y, margin: float):
    ny, nx = detector.shape
    return (x > -margin) & (x < nx - 1 + margin) & (y > -margin) & (y < ny - 1 + margin)


def _make(detector, psf, ids, kind, ra, dec, x, y, x_end, y_end, mag, flux_e) -> Sources:
    fx, fy = detector.pixel_to_focal_plane(x, y)
    fwhm, e1, e2, _ = psf.at(fx, fy)
    n = len(ids)
    return Sources(
        id=np.asarray(ids, np.int64), kind=np.full(n, kind, dtype=object), ra=ra, dec=dec, x=x, y=y,
        x_end=x_end, y_end=y_end, mag=mag, flux_e=flux_e, fwhm=np.atleast_1d(fwhm), e1=np.atleast_1d(e1),
        e2=np.atleast_1d(e2),
    )  # fmt: skip


def static_sources(detector, model, psf, stars: skymod.StaticCatalog, band, airmass, mjd, exptime,
                   margin=60.0) -> Sources:  # fmt: skip
    """Stars and variable stars on the detector (``model`` maps sky to pixels)."""
    if len(stars) == 0:
        return _empty()
    x, y = model.sky_to_pixel(stars.ra, stars.dec)
    keep = _on_detector(detector, x, y, margin) & np.isfinite(x)
    factor = stars.flux_factor(mjd)[keep]
    mag = stars.mags[band][keep] - 2.5 * np.log10(factor)
    flux = skymod.electrons_per_second(mag, band, airmass) * exptime
    kinds = np.where(stars.variable[keep], skymod.KIND_VARIABLE, skymod.KIND_STAR)
    out = _make(detector, psf, stars.id[keep], skymod.KIND_STAR, stars.ra[keep], stars.dec[keep], x[keep], y[keep],
                x[keep], y[keep], mag, flux)  # fmt: skip
    out.kind = kinds.astype(object)
    return out


def transient_sources(detector, model, psf, tr: skymod.TransientCatalog, band, airmass, mjd, exptime,
                      margin=60.0) -> Sources:  # fmt: skip
    """Transients that are on (flux > 0) at ``mjd`` and fall on the detector."""
    if len(tr) == 0:
        return _empty()
    factor = tr.flux_factor(mjd)
    x, y = model.sky_to_pixel(tr.ra, tr.dec)
    keep = _on_detector(detector, x, y, margin) & (factor > 1e-4) & np.isfinite(x)
    mag = tr.peak_mag[band][keep] - 2.5 * np.log10(factor[keep])
    flux = skymod.electrons_per_second(mag, band, airmass) * exptime
    return _make(detector, psf, tr.id[keep], skymod.KIND_TRANSIENT, tr.ra[keep], tr.dec[keep], x[keep], y[keep],
                 x[keep], y[keep], mag, flux)  # fmt: skip


def moving_sources(detector, model, psf, ephemerides, band, airmass, mjd, exptime, margin=60.0) -> Sources:
    """Solar System objects on the detector, trailing from their position at the shutter opening to the
    closing (``ephemerides`` must hold both times)."""
    if ephemerides is None or len(ephemerides.ids) == 0:
        return _empty()
    ra0, dec0, mags = ephemerides.at(mjd, band)
    ra1, dec1, _ = ephemerides.at(mjd + exptime / 86400.0, band)
    x0, y0 = model.sky_to_pixel(ra0, dec0)
    x1, y1 = model.sky_to_pixel(ra1, dec1)
    keep = (_on_detector(detector, x0, y0, margin) | _on_detector(detector, x1, y1, margin)) & np.isfinite(x0)
    flux = skymod.electrons_per_second(mags[keep], band, airmass) * exptime
    return _make(detector, psf, ephemerides.ids[keep], skymod.KIND_SSO, ra0[keep], dec0[keep], x0[keep], y0[keep],
                 x1[keep], y1[keep], mags[keep], flux)  # fmt: skip


def _empty() -> Sources:
    z = np.zeros(0)
    return Sources(id=np.zeros(0, np.int64), kind=np.zeros(0, object), ra=z, dec=z, x=z, y=z, x_end=z, y_end=z,
                   mag=z, flux_e=z, fwhm=z, e1=z, e2=z)  # fmt: skip


def donut_template(radius: float, fwhm: float, e1: float, e2: float) -> np.ndarray:
    """The image of a defocused star, normalised to unit sum: the pupil (an annulus of outer ``radius``
    pixels with the central obscuration) seen through the seeing (an elliptical Moffat)."""
    from scipy.signal import fftconvolve

    from kernels.render import add_moffat_sources

    half = int(np.ceil(radius + 3.0 * fwhm)) + 2
    n = 2 * half + 1
    sub = 4
    g = (np.arange(n * sub) + 0.5) / sub - half - 0.5
    r = np.hypot(g[:, None], g[None, :])
    pupil = ((r <= radius) & (r >= DONUT_OBSCURATION * radius)).astype(np.float64)
    pupil = pupil.reshape(n, sub, n, sub).mean(axis=(1, 3))
    psf = np.zeros((4 * int(np.ceil(fwhm)) + 1,) * 2)
    c = psf.shape[0] // 2
    add_moffat_sources(psf, [float(c)], [float(c)], [1.0], fwhm, PSF_BETA, e1, e2, radius=c)
    out = np.clip(fftconvolve(pupil, psf, mode="same"), 0.0, None)
    return out / out.sum()


def _add_template(image: np.ndarray, template: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray) -> None:
    ny, nx = image.shape
    h = template.shape[0] // 2
    for xi, yi, f in zip(np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int), flux):
        x0, x1, y0, y1 = xi - h, xi + h + 1, yi - h, yi + h + 1
        if x1 <= 0 or y1 <= 0 or x0 >= nx or y0 >= ny:
            continue
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1, nx), min(y1, ny)
        image[cy0:cy1, cx0:cx1] += (f * template[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]).astype(image.dtype)


def render_sources(image: np.ndarray, sources: Sources, donut_radius: float = 0.0) -> None:
    """Add every source to ``image`` (electrons before the flat field).

    Trails are drawn as a chain of PSFs, one per 0.5 pixel of motion, sharing the flux. With
    ``donut_radius`` > 0 (wavefront sensors) each source is the defocused pupil
    (:func:`donut_template` at the detector's median PSF), placed to the nearest pixel.
    """
    from kernels.render import add_moffat_sources, stamp_radius

    if len(sources) == 0:
        return
    n_sub = np.maximum(np.ceil(sources.trail_length / 0.5).astype(int), 1)
    idx = np.repeat(np.arange(len(sources)), n_sub)
    offs = np.concatenate([(np.arange(k) + 0.5) / k for k in n_sub])
    x = sources.x[idx] + offs * (sources.x_end - sources.x)[idx]
    y = sources.y[idx] + offs * (sources.y_end - sources.y)[idx]
    flux = sources.flux_e[idx] / n_sub[idx]
    if donut_radius > 0:
        template = donut_template(
            donut_radius, float(np.median(sources.fwhm)), float(np.median(sources.e1)), float(np.median(sources.e2))
        )
        _add_template(image, template, x, y, flux)
        return
    radius = stamp_radius(flux, sources.fwhm[idx], PSF_BETA)
    add_moffat_sources(image, x, y, flux, sources.fwhm[idx], PSF_BETA, sources.e1[idx], sources.e2[idx], radius)
