"""Image characterization of a calibrated CCD exposure: background, PSF, astrometry, photometric zero point.

A pure stage (no I/O): an ISR'd (and snap-combined) :class:`Exposure`, the reference stars around it and
an initial WCS in; the background-subtracted calexp, its background, PSF model, fitted TAN-SIP WCS, zero
point, source catalogue and SDQA metrics out. Steps:

1. background (:func:`kernels.background.estimate_background`) on the unmasked pixels, subtracted;
2. a first FWHM from bright stars' moments, then detection and measurement
   (:func:`lsstpipe.pipelines.detection.detect_and_measure`);
3. PSF stars (:func:`kernels.psf.select_psf_stars`) and the spatially varying Moffat PSF
   (:func:`kernels.psf.fit_psf_model`);
4. astrometry: references placed by the initial WCS, offset/rotation search, nearest-neighbour matching
   with tightening radii, TAN-SIP fit (:mod:`kernels.astrometry`);
5. zero point from the matched unsaturated stars (see :func:`characterize`).

Bad data never raise: each step that cannot be done leaves a flag in ``Characterization.flags`` and the
later steps carry on with what there is (a constant fallback PSF, no WCS, a NaN zero point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.wcs import WCS

from kernels import astrometry as A
from kernels import measure as M
from kernels import psf as P
from kernels.background import Background, estimate_background, subtract_background
from lsstpipe.pipelines.detection import CATALOG_DTYPE, detect_and_measure, estimate_psf_fwhm
from lsstpipe.pipelines.exposure import Exposure, MaskBit

__all__ = ["CharacterizeConfig", "Characterization", "characterize", "initial_wcs", "FLAGS", "SOURCE_DTYPE"]

#: Every flag :func:`characterize` can set, with its meaning.
FLAGS = {
    "NO_DATA": "no usable pixel (all NaN, masked or saturated): nothing was measured",
    "NO_STARS": "too few PSF stars: the PSF is a constant Moffat of the fallback FWHM",
    "ASTROMETRY_FAILED": "no WCS: too few reference stars or matches, or the fit was too poor",
    "PHOTOMETRY_FAILED": "no zero point: too few matched unsaturated stars with reference magnitudes",
}

#: Catalogue of :func:`characterize`: the detection catalogue plus sky position (deg; NaN without a WCS),
#: ``psf_star`` (used for the PSF) and ``ref_index`` (matched row of the refcat, −1 if none).
SOURCE_DTYPE = np.dtype(CATALOG_DTYPE.descr + [("ra", "f8"), ("dec", "f8"), ("psf_star", "?"), ("ref_index", "i8")])


@dataclass(frozen=True)
class CharacterizeConfig:
    """Settings of :func:`characterize`."""

    background_box: int = 128
    """Mesh cell size of the background, pixels."""
    detection_threshold: float = 5.0
    """Detection threshold, σ of the PSF-filtered image."""
    bad_mask_bits: int = int(MaskBit.SAT | MaskBit.NO_DATA | MaskBit.BAD)
    """Mask bits that make a pixel unusable."""
    fallback_fwhm: float = 4.0
    """FWHM (pixels) used when the PSF cannot be measured."""
    psf_min_snr: float = 50.0
    """Smallest S/N of a PSF star."""
    psf_max_stars: int = 100
    """Most PSF stars fitted (the brightest)."""
    psf_min_stars: int = 5
    """Fewer fitted PSF stars than this → ``NO_STARS``."""
    psf_order: int = 2
    """Polynomial order of the PSF's variation over the CCD (0 to 4)."""
    psf_beta: float | None = None
    """Fixed Moffat β; None: fitted (median over the brightest stars)."""
    sip_order: int = 3
    """Forward SIP order (1: TAN only)."""
    max_offset_arcsec: float = 20.0
    """Largest pointing error searched for, arcsec."""
    rotation_search_deg: float = 0.1
    """Largest rotation error searched for (in steps of ``rotation_step_deg``), degrees."""
    rotation_step_deg: float = 0.025
    """Step of the rotation search, degrees."""
    match_radius_arcsec: float = 1.0
    """Final nearest-neighbour match radius, arcsec."""
    astrometry_max_stars: int = 400
    """Brightest sources and references used by the offset search."""
    min_matches: int = 10
    """Fewer matched pairs than this (or than the fit's need) → ``ASTROMETRY_FAILED``."""
    max_astrometric_rms_mas: float = 200.0
    """A fit whose residual rms exceeds this → ``ASTROMETRY_FAILED``."""
    zp_min_snr: float = 20.0
    """Smallest S/N of a zero-point star."""
    zp_min_stars: int = 3
    """Fewer zero-point stars than this → ``PHOTOMETRY_FAILED``."""
    aperture_fwhm: float = 2.0
    """Zero-point aperture radius in units of the PSF FWHM."""
    nsigma: float = 3.0
    """Clipping threshold of the PSF, WCS and zero-point fits."""

    def __post_init__(self) -> None:
        positive = ("background_box", "detection_threshold", "fallback_fwhm", "psf_min_snr", "psf_max_stars",
                    "max_offset_arcsec", "rotation_step_deg", "match_radius_arcsec", "astrometry_max_stars",
                    "max_astrometric_rms_mas", "zp_min_snr", "aperture_fwhm", "nsigma")  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"CharacterizeConfig.{name} must be a positive number, got {value!r}")
        if not 0 <= self.psf_order <= 4:
            raise ValueError(f"psf_order must be within 0..4, got {self.psf_order}")
        if not 1 <= self.sip_order <= 5:
            raise ValueError(f"sip_order must be within 1..5, got {self.sip_order}")
        if self.psf_beta is not None and not self.psf_beta > 1:
            raise ValueError(f"psf_beta must be > 1 (or None to fit it), got {self.psf_beta}")
        if self.psf_min_stars < 3 or self.min_matches < 3 or self.zp_min_stars < 1:
            raise ValueError("psf_min_stars and min_matches must be ≥ 3, zp_min_stars ≥ 1")
        if self.rotation_search_deg < 0:
            raise ValueError(f"rotation_search_deg must be ≥ 0, got {self.rotation_search_deg}")


@dataclass(frozen=True)
class Characterization:
    """What :func:`characterize` measured (see the module docstring for the flags)."""

    exposure: Exposure
    """Background-subtracted calexp (e-); metadata gains ``psf_fwhm`` (pixels, median over the CCD),
    ``psf_model``, ``zero_point``, ``zero_point_err``, ``wcs_header`` (dict or None) and
    ``characterize_flags``."""
    background: Background
    psf: P.PsfModel
    wcs: WCS | None
    zero_point: float
    """Magnitude of a source giving 1 e- of total flux in this exposure (NaN when it failed)."""
    sources: np.ndarray
    flags: tuple[str, ...]
    metrics: dict


def initial_wcs(camera, detector, ra: float, dec: float, rotpa: float, order: int = 4) -> WCS:
    """Nominal TAN-SIP WCS of ``detector`` of ``camera`` with the boresight at (ra, dec) and rotator ``rotpa``.

    ``rotpa`` is the position angle of the focal plane's +y axis (the raw header's ``ROTPA``); the optical
    model is the camera's (:class:`lsstpipe.sim.wcs.DetectorSkyModel`). Use pixel origin 0.
    """
    from lsstpipe.sim.wcs import DetectorSkyModel

    return DetectorSkyModel.build(camera, detector, ra, dec, rotpa).fit_tan_sip(order)


def _empty_background(shape) -> Background:
    nan = np.full((1, 1), np.nan)
    return Background(nan, nan.copy(), np.array([(shape[0] - 1) / 2.0]), np.array([(shape[1] - 1) / 2.0]),
                      tuple(shape), math.nan, math.nan)  # fmt: skip


def _clipped_mean(values, errors, nsigma: float, iters: int = 5) -> tuple[float, float, np.ndarray]:
    """Inverse-variance weighted mean with clipping at ``nsigma`` robust σ; (mean, error, used)."""
    used = np.isfinite(values) & np.isfinite(errors) & (errors > 0)
    mean = float("nan")
    for _ in range(iters):
        if not used.any():
            break
        med = np.median(values[used])
        sig = 1.4826 * np.median(np.abs(values[used] - med))
        new = used & (np.abs(values - med) <= nsigma * max(sig, 1e-4))
        if np.array_equal(new, used):
            break
        used = new
    if not used.any():
        return mean, float("nan"), used
    # the error is the larger of the photon-noise error and the stars' scatter (reference errors, crowding)
    w = 1.0 / errors[used] ** 2
    mean = float(np.sum(w * values[used]) / np.sum(w))
    scatter = float(np.std(values[used])) if used.sum() > 1 else 0.0
    err = max(1.0 / math.sqrt(np.sum(w)), scatter / math.sqrt(used.sum()))
    return mean, err, used


def _astrometry(cat, idx_bright, refcat, ref_mag, wcs0, shape, cfg: CharacterizeConfig, scale_arcsec: float):
    """Match and fit; returns (wcs, stats, src_index, ref_index) or raises ValueError with the reason."""
    ny, nx = shape
    if len(refcat) == 0:
        raise ValueError("the reference catalogue is empty")
    with np.errstate(invalid="ignore"):
        try:
            rx, ry = wcs0.all_world2pix(refcat["ra"], refcat["dec"], 0, maxiter=30, quiet=True)
        except Exception:  # noqa: BLE001 (astropy's own convergence errors): TAN alone is close enough here
            rx, ry = wcs0.wcs_world2pix(refcat["ra"], refcat["dec"], 0)
    margin = cfg.max_offset_arcsec / scale_arcsec + 0.01 * max(nx, ny)
    on = np.isfinite(rx) & (rx > -margin) & (rx < nx - 1 + margin) & (ry > -margin) & (ry < ny - 1 + margin)
    ref_ok = np.flatnonzero(on)
    ref_ok = ref_ok[np.argsort(np.where(np.isfinite(ref_mag[ref_ok]), ref_mag[ref_ok], 99.0), kind="stable")]
    if ref_ok.size < cfg.min_matches:
        raise ValueError(f"only {ref_ok.size} reference stars fall on the CCD")
    sx, sy = cat["x"][idx_bright], cat["y"][idx_bright]
    max_shift = cfg.max_offset_arcsec / scale_arcsec
    n_rot = int(round(cfg.rotation_search_deg / cfg.rotation_step_deg))
    rots = [k * cfg.rotation_step_deg for k in range(-n_rot, n_rot + 1)]
    sel = ref_ok[: cfg.astrometry_max_stars * 2]  # the brightest
    centre = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    off = A.find_offset(sx, sy, rx[sel], ry[sel], centre, max_shift, bin_size=max(2.0, 0.5 / scale_arcsec),
                        rotations_deg=rots, min_peak=cfg.min_matches)  # fmt: skip
    if off is None:
        raise ValueError("no significant offset between the sources and the references")
    c, s = math.cos(math.radians(off["rotation_deg"])), math.sin(math.radians(off["rotation_deg"]))
    qx = centre[0] + c * (rx - centre[0]) - s * (ry - centre[1]) + off["dx"]
    qy = centre[1] + s * (rx - centre[0]) + c * (ry - centre[1]) + off["dy"]
    good = (cat["flags"] & (M.SATURATED | M.BAD_PIXELS | M.CENTROID_FAILED | M.TRAILED | M.SHARP)) == 0
    good &= cat["snr"] >= 2 * cfg.detection_threshold
    gidx = np.flatnonzero(good)
    radius = 3.0 / scale_arcsec
    final = cfg.match_radius_arcsec / scale_arcsec
    for _ in range(4):
        si, ri, _d = A.match_sources(cat["x"][gidx], cat["y"][gidx], qx[ref_ok], qy[ref_ok], radius)
        if si.size < cfg.min_matches:
            raise ValueError(f"only {si.size} sources match a reference star within {radius * scale_arcsec:.1f}″")
        m = A.fit_affine(qx[ref_ok][ri], qy[ref_ok][ri], cat["x"][gidx][si], cat["y"][gidx][si])
        qx, qy = (m[0, 0] + m[0, 1] * qx + m[0, 2] * qy, m[1, 0] + m[1, 1] * qx + m[1, 2] * qy)
        radius = max(final, radius / 2.0)
    si, ri, _d = A.match_sources(cat["x"][gidx], cat["y"][gidx], qx[ref_ok], qy[ref_ok], final)
    src, ref = gidx[si], ref_ok[ri]
    if src.size < cfg.min_matches:
        raise ValueError(f"only {src.size} sources match a reference star within {cfg.match_radius_arcsec}″")
    weights = np.clip(cat["snr"][src], 1.0, 200.0) ** 2
    order = cfg.sip_order
    while order > 1 and src.size < 2 * (order + 1) * (order + 2):  # ≥ 4 pairs per polynomial term
        order -= 1
    wcs, stats = A.fit_tan_sip(cat["x"][src], cat["y"][src], refcat["ra"][ref], refcat["dec"][ref], shape, order,
                               weights=weights, nsigma=cfg.nsigma + 1.0, crval=tuple(wcs0.wcs.crval))  # fmt: skip
    stats["offset"] = off
    stats["sip_order"] = order
    if not stats["rms_mas"] <= cfg.max_astrometric_rms_mas:
        raise ValueError(f"astrometric residual rms {stats['rms_mas']:.0f} mas exceeds {cfg.max_astrometric_rms_mas}")
    used = stats["used"]
    return wcs, stats, src[used], ref[used]


def characterize(exposure: Exposure, refcat: np.ndarray, initial_wcs, band: str,
                 config: CharacterizeConfig = CharacterizeConfig()) -> Characterization:  # fmt: skip
    """Characterize one calibrated CCD exposure.

    Parameters
    ----------
    exposure : Exposure
        ISR'd (snap-combined) exposure in electrons. Not modified.
    refcat : numpy.ndarray
        Reference stars: a structured array with ``ra``, ``dec`` (deg) and ``{band}_mag`` (AB) columns,
        e.g. :func:`lsstpipe.io.refcat.read_refcat` over a cone around the CCD. May be empty.
    initial_wcs : astropy.wcs.WCS
        Nominal WCS (pixel origin 0), e.g. :func:`initial_wcs` from the boresight; pointing errors up to
        ``config.max_offset_arcsec`` and rotation errors up to ``config.rotation_search_deg`` are recovered.
    band : str
        Band of the exposure (selects ``{band}_mag``).
    config : CharacterizeConfig

    Returns
    -------
    Characterization
        ``zero_point`` is the AB magnitude of a source whose **total** flux in this exposure is 1 e-
        (the simulator's ``zero_point_mag_for_1e`` for the same exposure time): each matched, unflagged
        star's flux in a circular aperture of ``aperture_fwhm`` × FWHM is divided by the PSF model's
        fraction of total flux in that aperture, and ``ref_mag + 2.5 log10(total flux)`` is averaged with
        inverse-variance weights after sigma clipping.

    Raises
    ------
    ValueError
        For arguments of the wrong kind (not an Exposure, a refcat without ``ra``/``dec``/``{band}_mag``, a
        WCS that is not 2-D). Bad data (no stars, NaN blocks, saturation, an empty refcat) are flagged.
    """
    if not isinstance(exposure, Exposure):
        raise ValueError(f"exposure must be an lsstpipe Exposure, got {type(exposure).__name__}")
    refcat = np.asarray(refcat)
    need = ("ra", "dec", f"{band}_mag")
    if refcat.dtype.names is None or any(n not in refcat.dtype.names for n in need):
        raise ValueError(f"refcat must be a structured array with columns {need}; got {refcat.dtype.names}")
    if not isinstance(initial_wcs, WCS) or initial_wcs.naxis != 2:
        raise ValueError("initial_wcs must be a 2-D astropy WCS (see characterize.initial_wcs)")
    cfg = config
    shape = exposure.shape
    flags: list[str] = []
    metrics: dict = {}
    image, variance = exposure.image, exposure.variance
    usable = np.isfinite(image) & np.isfinite(variance) & (variance >= 0) & ((exposure.mask & cfg.bad_mask_bits) == 0)
    scale0 = float(np.sqrt(abs(np.linalg.det(initial_wcs.pixel_scale_matrix)))) * 3600.0
    cat = np.zeros(0, SOURCE_DTYPE)
    psf = P.PsfModel.constant(shape, cfg.fallback_fwhm)
    background = None
    if usable.sum() >= max(0.01 * usable.size, 100):
        try:
            background = estimate_background(image, mask=~usable, box=cfg.background_box)
        except ValueError as exc:  # no mesh cell with enough usable pixels
            metrics["background_error"] = str(exc)
    if background is None:
        flags += ["NO_DATA", "NO_STARS", "ASTROMETRY_FAILED", "PHOTOMETRY_FAILED"]
        background, data = _empty_background(shape), image.copy()
        wcs, zp, zp_err = None, math.nan, math.nan
    else:
        data = subtract_background(image, background)
        data = data if data.dtype == np.float32 else data.astype(np.float32)
        cat, psf, psf_info = _detect_and_psf(data, variance, usable, cfg, flags, metrics)
        wcs, zp, zp_err = None, math.nan, math.nan
        bright = np.flatnonzero((cat["flags"] & (M.SATURATED | M.BAD_PIXELS | M.SHARP | M.TRAILED)) == 0)
        bright = bright[np.argsort(-cat["flux"][bright], kind="stable")][: cfg.astrometry_max_stars]
        try:
            wcs, stats, src, ref = _astrometry(
                cat, bright, refcat, refcat[f"{band}_mag"], initial_wcs, shape, cfg, scale0
            )
            cat["ref_index"][src] = ref
            metrics["astrometric_scatter_mas"] = stats["rms_mas"]
            metrics["n_refcat_matches"] = int(src.size)
            metrics["sip_order"] = stats["sip_order"]
            metrics["pointing_offset_pix"] = (stats["offset"]["dx"], stats["offset"]["dy"])
            ok = np.isfinite(cat["x"])
            cat["ra"][ok], cat["dec"][ok] = wcs.all_pix2world(cat["x"][ok], cat["y"][ok], 0)
        except ValueError as exc:
            flags.append("ASTROMETRY_FAILED")
            metrics["astrometry_error"] = str(exc)
        if wcs is not None:
            zp, zp_err, n = _zero_point(data, variance, usable, cat, refcat[f"{band}_mag"], psf, cfg)
            metrics["n_zero_point_stars"] = n
            if not np.isfinite(zp):
                flags.append("PHOTOMETRY_FAILED")
        else:
            flags.append("PHOTOMETRY_FAILED")
    cy, cx = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
    fwhm_pix = float(
        np.median(psf.fwhm(*np.meshgrid(np.linspace(0, shape[1] - 1, 9), np.linspace(0, shape[0] - 1, 9))))
    )
    scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0 if wcs is not None else scale0
    metrics.setdefault("n_psf_stars", 0)
    metrics.setdefault("psf_residual_rms", math.nan)
    metrics.setdefault("n_refcat_matches", 0)
    metrics.setdefault("astrometric_scatter_mas", math.nan)
    metrics.update(seeing_arcsec=fwhm_pix * scale, psf_fwhm_pix=fwhm_pix, psf_fwhm_centre_pix=float(psf.fwhm(cx, cy)),
                   zero_point=zp, zero_point_err=zp_err, background_level=float(background.global_level),
                   background_rms=float(background.global_rms), n_sources=int(len(cat)), pixel_scale_arcsec=scale)  # fmt: skip
    meta = dict(exposure.metadata)
    meta.update(psf_fwhm=fwhm_pix, psf_model=psf.to_dict(), zero_point=zp, zero_point_err=zp_err,
                wcs_header=dict(wcs.to_header(relax=True)) if wcs is not None else None,
                characterize_flags=list(flags))  # fmt: skip
    out = Exposure(data, exposure.variance, exposure.mask, meta)
    return Characterization(out, background, psf, wcs, zp, cat, tuple(flags), metrics)


def _detect_and_psf(data, variance, usable, cfg: CharacterizeConfig, flags: list, metrics: dict):
    """Detection catalogue (:data:`SOURCE_DTYPE`) and PSF model; appends ``NO_STARS`` when it must."""
    bad = (~usable).view(np.uint8)
    try:
        fwhm0 = estimate_psf_fwhm(data, variance, usable, guess=cfg.fallback_fwhm)
    except ValueError:
        fwhm0 = cfg.fallback_fwhm
    try:
        raw = detect_and_measure(data, variance, bad, psf_fwhm=fwhm0, threshold=cfg.detection_threshold,
                                 subtract_background=False)  # fmt: skip
    except ValueError as exc:  # e.g. nothing finite left after the background
        metrics["detection_error"] = str(exc)
        raw = np.zeros(0, CATALOG_DTYPE)
    cat = np.zeros(len(raw), SOURCE_DTYPE)
    for name in CATALOG_DTYPE.names:
        cat[name] = raw[name]
    cat["ra"], cat["dec"], cat["ref_index"] = np.nan, np.nan, -1
    size = np.sqrt(np.maximum(cat["x2"] + cat["y2"], 0.0))
    radius = max(6, int(math.ceil(3.0 * fwhm0)))
    idx = P.select_psf_stars(cat["x"], cat["y"], cat["snr"], cat["flags"], size, n_max=cfg.psf_max_stars,
                             min_snr=cfg.psf_min_snr, isolation=2.0 * radius, shape=data.shape,
                             border=radius + 1, nsigma=cfg.nsigma)  # fmt: skip
    psf, info = P.PsfModel.constant(data.shape, fwhm0), None
    if idx.size >= cfg.psf_min_stars:
        try:
            psf, info = P.fit_psf_model(data, variance, ~usable, cat["x"][idx], cat["y"][idx], cat["flux"][idx],
                                        fwhm0, cfg.psf_order, cfg.psf_beta, radius=radius, nsigma=cfg.nsigma)  # fmt: skip
        except ValueError:
            info = None
    if info is None or info["n_stars"] < cfg.psf_min_stars:
        flags.append("NO_STARS")
        psf = P.PsfModel.constant(data.shape, fwhm0)
        metrics["n_psf_stars"] = 0 if info is None else info["n_stars"]
        return cat, psf, info
    # mark the stars kept by the fit (matched by position)
    from scipy.spatial import cKDTree

    dist, k = cKDTree(np.column_stack([cat["x"][idx], cat["y"][idx]])).query(
        np.column_stack([info["x"][info["used"]], info["y"][info["used"]]]), distance_upper_bound=2.0
    )
    cat["psf_star"][idx[k[np.isfinite(dist)]]] = True
    metrics["n_psf_stars"] = info["n_stars"]
    metrics["psf_residual_rms"] = info["residual_rms"]
    return cat, psf, info


def _zero_point(data, variance, usable, cat, ref_mag, psf: P.PsfModel, cfg: CharacterizeConfig):
    """(zero point, error, number of stars used) from the matched stars' aperture-corrected fluxes."""
    m = np.flatnonzero(cat["ref_index"] >= 0)
    m = m[(cat["flags"][m] & ~np.int64(M.BLENDED)) == 0]
    m = m[(cat["snr"][m] >= cfg.zp_min_snr) & np.isfinite(ref_mag[cat["ref_index"][m]])]
    if m.size < cfg.zp_min_stars:
        return math.nan, math.nan, int(m.size)
    fwhm = float(np.median(psf.fwhm(cat["x"][m], cat["y"][m])))
    radius = cfg.aperture_fwhm * fwhm
    flux, err, fl = M.aperture_flux(data, variance, cat["x"][m], cat["y"][m], radius, mask=(~usable).view(np.uint8))
    frac = psf.aperture_fraction(cat["x"][m], cat["y"][m], radius)
    ok = (fl == 0) & (flux > 0) & (err > 0)
    total = flux[ok] / frac[ok]
    values = ref_mag[cat["ref_index"][m[ok]]] + 2.5 * np.log10(total)
    errors = 1.0857362047581294 * err[ok] / flux[ok]
    if values.size < cfg.zp_min_stars:
        return math.nan, math.nan, int(values.size)
    zp, zp_err, used = _clipped_mean(values, np.maximum(errors, 1e-3), cfg.nsigma)
    if used.sum() < cfg.zp_min_stars:
        return math.nan, math.nan, int(used.sum())
    return zp, zp_err, int(used.sum())
