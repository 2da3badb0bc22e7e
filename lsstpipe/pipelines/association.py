"""Association: one CCD's DIASources → Solar System objects and DIAObjects, as rows of Rubin's APDB schema.

A pure stage (no I/O). Its inputs are what the night job reads from the APDB for the CCD's region and the
Solar System predictions for the exposure midpoint; its outputs are the rows it writes back
(:mod:`lsstpipe.db.apdb`), with Rubin's column names (``apdb.yaml`` of ``lsst-sdm-schemas``; fluxes in nJy,
times in MJD TAI).

Policy, in order:

1. **Solar System first.** Every DIASource is matched one-to-one (:func:`kernels.associate.associate`) to
   the predicted SSObject positions at the exposure midpoint, each prediction with its own radius (the
   ephemeris uncertainty). Matched sources get ``ssObjectId`` and never touch DIAObjects: a moving object
   would otherwise corrupt a static object's light curve or seed a one-detection DIAObject.
2. **DIAObjects.** The remaining sources are matched one-to-one to the region's current DIAObjects within
   ``radius_arcsec`` (default 1″, ≈ 5σ of the centroid error of a S/N 5 source in 0.7″ seeing): nearest pair
   first, then higher S/N, then lower index (see :mod:`kernels.associate`). Negative and dipole sources
   associate like any other (a variable fading below its template is a real measurement).
3. **New DIAObjects** are created for every unmatched source, negative ones and dipoles included, as Rubin
   does: a variable star fainter than its template on its first visits must get its object, or its light
   curve is split (scored against the simulator's truth in ``tests/test_level1_truth.py``: with objects for
   positive non-dipole sources only, 45 % of a variable's DIASources were on one object; with negative ones
   too, 96.9 %; with every unmatched source, ≥ 99 %, and still no object merging two true sources). The new DIAObject's id is the
   ``diaSourceId`` of the source that created it (Rubin's convention), so concurrent CCD jobs need no
   shared id counter.
4. **Summaries.** Every DIAObject that gained a source is rewritten as a new version (the APDB closes the
   previous version's validity interval): position = S/N²-weighted mean of unit vectors of its sources
   (centroid variance ∝ 1/S/N²; exact across RA 0/360 and at the poles), per-band PSF-flux inverse-variance
   mean, its error, the sample σ, N, min, max and mean error, science-flux mean, ``nDiaSources``, first and
   last ``midpointMjdTai``. Fluxes come from the sources in ``history`` (what ``getDiaSources`` returned:
   Rubin reads 12 months) plus the new ones; ``nDiaSources`` and ``firstDiaSourceMjdTai`` carry over from
   the previous version, so they count the whole history.

Row arrays use 0 for "no id" in ``diaObjectId``/``ssObjectId``; :mod:`lsstpipe.db.apdb` stores it as NULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kernels import measure as M
from kernels.associate import associate
from lsstpipe.camera import PIXEL_SCALE_ARCSEC
from lsstpipe.pipelines.diasources import FORCED_FAILED_FLAG, bbox_size

__all__ = ["AssociationConfig", "AssociationResult", "BANDS", "DIA_OBJECT_ROW", "DIA_SOURCE_ROW",
           "FORCED_SOURCE_ROW", "SS_PREDICTION_DTYPE", "TRAIL_ALGORITHM_SDSS_SHAPE", "associate_ccd",
           "dia_source_id", "dia_source_rows", "forced_source_rows", "summarize_objects"]  # fmt: skip

BANDS = "ugrizy"

#: Bits of :func:`dia_source_id`: the source index within the CCD, then the detector.
INDEX_BITS, DETECTOR_BITS = 20, 8

#: Predicted Solar System positions at the exposure midpoint (degrees; radius in arcsec).
SS_PREDICTION_DTYPE = np.dtype([("ssObjectId", "i8"), ("ra", "f8"), ("dec", "f8"), ("radius_arcsec", "f8")])

#: DiaSource columns we fill (Rubin's names and units; :func:`dia_source_rows` documents the mapping).
DIA_SOURCE_ROW = np.dtype(
    [("diaSourceId", "i8"), ("visit", "i8"), ("detector", "i2"), ("diaObjectId", "i8"), ("ssObjectId", "i8"),
     ("midpointMjdTai", "f8"), ("exposureTime", "f4"), ("ra", "f8"), ("dec", "f8"), ("x", "f4"), ("y", "f4"),
     ("centroid_flag", "?"), ("apFlux", "f4"), ("apFluxErr", "f4"), ("apFlux_flag_apertureTruncated", "?"),
     ("isNegative", "?"), ("snr", "f4"), ("psfFlux", "f4"), ("psfFluxErr", "f4"), ("psfNdata", "i4"),
     ("psfFlux_flag", "?"), ("psfFlux_flag_edge", "?"), ("psfFlux_flag_noGoodPixels", "?"), ("trailLength", "f4"),
     ("trailAngle", "f4"), ("trailNdata", "i4"), ("trailAlgorithm", "i4"), ("trail_flag", "?"),
     ("dipoleNdata", "i4"), ("scienceFlux", "f4"), ("scienceFluxErr", "f4"), ("forced_PsfFlux_flag", "?"),
     ("ixx", "f4"), ("iyy", "f4"), ("ixy", "f4"), ("band", "U1"), ("isDipole", "?"), ("dipoleFitAttempted", "?"),
     ("timeProcessedMjdTai", "f8"), ("bboxSize", "i4"), ("pixelFlags_bad", "?"), ("pixelFlags_edge", "?"),
     ("pixelFlags_saturated", "?")]
)  # fmt: skip

#: Rubin's ``trailAlgorithm`` key of a trail measured from the second moments (1 = SDSSShape).
TRAIL_ALGORITHM_SDSS_SHAPE = 1

_BAND_STATS = ("psfFluxMean", "psfFluxMeanErr", "psfFluxSigma", "psfFluxMin", "psfFluxMax", "psfFluxErrMean",
               "scienceFluxMean", "scienceFluxMeanErr")  # fmt: skip

#: DiaObject columns we fill (``validityStartMjdTai``/``validityEndMjdTai`` are set by the APDB client).
DIA_OBJECT_ROW = np.dtype(
    [("diaObjectId", "i8"), ("ra", "f8"), ("dec", "f8"), ("nDiaSources", "i4"),
     ("firstDiaSourceMjdTai", "f8"), ("lastDiaSourceMjdTai", "f8")]
    + [(f"{b}_psfFluxNdata", "i4") for b in BANDS]
    + [(f"{b}_{s}", "f4") for b in BANDS for s in _BAND_STATS]
)  # fmt: skip

#: DiaForcedSource columns.
FORCED_SOURCE_ROW = np.dtype(
    [("diaForcedSourceId", "i8"), ("diaObjectId", "i8"), ("ra", "f8"), ("dec", "f8"), ("visit", "i8"),
     ("detector", "i2"), ("psfFlux", "f4"), ("psfFluxErr", "f4"), ("midpointMjdTai", "f8"),
     ("scienceFlux", "f4"), ("scienceFluxErr", "f4"), ("band", "U1"), ("timeProcessedMjdTai", "f8")]
)  # fmt: skip


@dataclass(frozen=True)
class AssociationConfig:
    """Settings of :func:`associate_ccd`."""

    radius_arcsec: float = 1.0
    """DIASource–DIAObject match radius (arcsec)."""
    pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC
    """The CCD's pixel scale (arcsec), for :func:`dia_source_rows` (moments, trail lengths); not used by the
    matching itself. The default is LSSTCam's nominal scale (that of every camera in :mod:`lsstpipe.camera`);
    callers with a fitted WCS should pass the CCD's."""

    def __post_init__(self) -> None:
        for name in ("radius_arcsec", "pixel_scale_arcsec"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")


@dataclass(frozen=True)
class AssociationResult:
    """What :func:`associate_ccd` returns.

    Attributes
    ----------
    dia_sources : numpy.ndarray
        :data:`DIA_SOURCE_ROW` rows, one per input DIASource, in input order.
    dia_objects : numpy.ndarray
        :data:`DIA_OBJECT_ROW` rows: new versions of updated objects, then the new objects.
    n_new, n_updated, n_ss_matched, n_unassociated : int
        Counts of new DIAObjects, updated DIAObjects, sources matched to SSObjects and sources left
        without any object (unmatched negatives and dipoles).
    """

    dia_sources: np.ndarray
    dia_objects: np.ndarray
    n_new: int
    n_updated: int
    n_ss_matched: int
    n_unassociated: int


def dia_source_id(visit: int, detector: int, index: Any) -> np.ndarray:
    """Globally unique DIASource ids: ``((visit << 8 | detector) << 20) | index``.

    Raises
    ------
    ValueError
        A value does not fit its field (detector < 256, index < 2²⁰, 0 ≤ visit < 2³⁵).
    """
    idx = np.asarray(index, np.int64)
    if not 0 <= detector < 1 << DETECTOR_BITS:
        raise ValueError(f"detector {detector} does not fit {DETECTOR_BITS} bits of the DIASource id")
    if not 0 <= visit < 1 << (63 - INDEX_BITS - DETECTOR_BITS):
        raise ValueError(f"visit {visit} does not fit the DIASource id; visits must be < 2^35")
    if idx.size and (idx.min() < 0 or idx.max() >= 1 << INDEX_BITS):
        raise ValueError(f"more than 2^{INDEX_BITS} DIASources on one CCD; raise the detection threshold")
    return ((np.int64(visit) << DETECTOR_BITS | np.int64(detector)) << INDEX_BITS) | idx


def _check_time(name: str, value: float) -> None:
    if not (np.isfinite(value) and 40000 < value < 100000):
        raise ValueError(f"{name} must be an MJD (TAI) between 40000 and 100000, got {value}")


def _check_band(band: str) -> None:
    if band not in BANDS or len(band) != 1:
        raise ValueError(f"band must be one of {', '.join(BANDS)}, got {band!r}")


def dia_source_rows(sources: np.ndarray, visit: int, detector: int, band: str, midpoint_mjd_tai: float,
                    processed_mjd_tai: float, pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC, *,
                    psf_stamp_size: int | None = None, exposure_time: float | None = None, wcs: Any = None,
                    ids: Any = None) -> np.ndarray:  # fmt: skip
    """Rubin DiaSource rows (:data:`DIA_SOURCE_ROW`) of ``DIA_DTYPE`` sources, not yet associated.

    The one mapping from our measurement to Rubin's DiaSource: the APDB stores these rows and the alert's
    ``diaSource`` is made from them (:func:`lsstpipe.alerts.packet.alert_dia_source`). Units are those of
    ``apdb.yaml`` and of the alert schema, which agree field by field:

    ====================================  =======================  ==============================================
    ours (``DIA_DTYPE``)                  Rubin                    conversion
    ====================================  =======================  ==============================================
    ixx, iyy, ixy (px², CCD axes)         ixx, iyy, ixy            × ``pixel_scale_arcsec``² → arcsec² (CCD axes)
    trail_length (px, moments)            trailLength              × ``pixel_scale_arcsec`` → arcsec; NaN where
                                                                   the moments failed (then ``trail_flag``)
    trail_angle (rad from +x)             trailAngle               deg east of north through ``wcs`` (mod 180);
                                                                   NaN without a WCS
    —                                     trailAlgorithm           1 (SDSSShape: from the second moments)
    npix (footprint pixels)               trailNdata               pixels of the moments behind ``trailLength``
                                                                   (0 where it is NaN)
    —                                     psfNdata                 ``psf_stamp_size``²: the pixels of the PSF fit
    bbox_size (or npix)                   bboxSize                 pixels (:func:`bbox_size`)
    —                                     dipoleNdata              0: no dipole model is fitted
    —                                     dipoleFitAttempted       False (``isDipole`` is the neighbour test)
    flags PSF_FLUX_FAILED, psf_flux NaN   psfFlux_flag             either
    flags PSF_FLUX_FAILED                 psfFlux_flag_noGoodPixels
    flags APERTURE_TRUNCATED              psfFlux_flag_edge,       the aperture or the PSF stamp leaves the image
                                          apFlux_flag_apertureTruncated
    ====================================  =======================  ==============================================

    Fluxes are nJy, positions degrees and 0-based pixels, as measured; the other flags map one to one from
    :mod:`kernels.measure` bits (``EDGE``, ``BAD_PIXELS``, ``SATURATED``, ``CENTROID_FAILED``) and
    :data:`~lsstpipe.pipelines.diasources.FORCED_FAILED_FLAG`.

    Parameters
    ----------
    sources : numpy.ndarray
        ``DIA_DTYPE`` rows of one CCD.
    visit, detector : int
        The CCD; ``visit`` is stored as given.
    band : str
        One of ``ugrizy``.
    midpoint_mjd_tai, processed_mjd_tai : float
        Exposure midpoint and processing time (MJD TAI).
    pixel_scale_arcsec : float
        The CCD's pixel scale (from its WCS). The default is LSSTCam's nominal 0.2″
        (:data:`lsstpipe.camera.PIXEL_SCALE_ARCSEC`, which every camera of :mod:`lsstpipe.camera` has).
    psf_stamp_size : int
        Side of the PSF stamp of the ``psf_flux`` fit (``DiaSourceConfig.stamp_size`` or its FWHM-based
        default): ``psfNdata`` is its area. Required (a keyword for the call's readability).
    exposure_time : float, optional
        Seconds (``exposureTime``; NaN → NULL if not given).
    wcs : astropy.wcs.WCS, optional
        The calexp's WCS, for ``trailAngle`` (NaN without it).
    ids : array_like of int, optional
        The ``diaSourceId`` of each source; by default :func:`dia_source_id` of ``visit``, ``detector`` and
        the source's index.
    """
    _check_band(band)
    _check_time("midpoint_mjd_tai", midpoint_mjd_tai)
    _check_time("processed_mjd_tai", processed_mjd_tai)
    if not (np.isfinite(pixel_scale_arcsec) and pixel_scale_arcsec > 0):
        raise ValueError(f"pixel_scale_arcsec must be finite and > 0, got {pixel_scale_arcsec}")
    if psf_stamp_size is None:
        raise ValueError("dia_source_rows needs psf_stamp_size, the PSF stamp side of the psf_flux fit (psfNdata)")
    if not (psf_stamp_size > 0 and psf_stamp_size % 2 == 1):
        raise ValueError(f"psf_stamp_size must be a positive odd number of pixels, got {psf_stamp_size}")
    n = len(sources)
    out = np.zeros(n, DIA_SOURCE_ROW)
    if ids is None:
        out["diaSourceId"] = dia_source_id(visit, detector, np.arange(n))
    else:
        ids = np.asarray(ids, np.int64)
        if ids.shape != (n,):
            raise ValueError(f"ids must hold one id per source ({n}), got shape {ids.shape}")
        out["diaSourceId"] = ids
    out["visit"], out["detector"], out["band"] = visit, detector, band
    out["midpointMjdTai"], out["timeProcessedMjdTai"] = midpoint_mjd_tai, processed_mjd_tai
    out["exposureTime"] = np.nan if exposure_time is None else exposure_time
    for ours, rubin in (("ra", "ra"), ("dec", "dec"), ("x", "x"), ("y", "y"), ("ap_flux", "apFlux"),
                        ("ap_flux_err", "apFluxErr"), ("snr", "snr"), ("psf_flux", "psfFlux"),
                        ("psf_flux_err", "psfFluxErr"), ("science_flux", "scienceFlux"),
                        ("science_flux_err", "scienceFluxErr"), ("is_negative", "isNegative"),
                        ("is_dipole", "isDipole")):  # fmt: skip
        out[rubin] = sources[ours]
    s2 = pixel_scale_arcsec**2
    for name in ("ixx", "iyy", "ixy"):
        out[name] = np.asarray(sources[name], np.float64) * s2
    npix = np.maximum(np.asarray(sources["npix"], np.int64), 0)
    flags = np.asarray(sources["flags"], np.int64)
    out["psfNdata"] = psf_stamp_size**2
    out["bboxSize"] = bbox_size(sources)
    trail = np.asarray(sources["trail_length"], np.float64)
    measured = np.isfinite(trail)
    out["trailLength"] = trail * pixel_scale_arcsec
    out["trailAngle"] = _trail_angle_deg(sources, wcs)
    out["trailAlgorithm"] = TRAIL_ALGORITHM_SDSS_SHAPE
    out["trailNdata"] = np.where(measured, npix, 0)
    out["trail_flag"] = ~measured
    out["dipoleNdata"] = 0
    out["dipoleFitAttempted"] = False
    out["centroid_flag"] = flags & M.CENTROID_FAILED != 0
    out["apFlux_flag_apertureTruncated"] = out["psfFlux_flag_edge"] = flags & M.APERTURE_TRUNCATED != 0
    out["psfFlux_flag_noGoodPixels"] = flags & M.PSF_FLUX_FAILED != 0
    out["psfFlux_flag"] = out["psfFlux_flag_noGoodPixels"] | ~np.isfinite(np.asarray(sources["psf_flux"], float))
    out["forced_PsfFlux_flag"] = flags & FORCED_FAILED_FLAG != 0
    out["pixelFlags_bad"] = flags & M.BAD_PIXELS != 0
    out["pixelFlags_edge"] = flags & M.EDGE != 0
    out["pixelFlags_saturated"] = flags & M.SATURATED != 0
    return out


def _trail_angle_deg(sources: np.ndarray, wcs: Any) -> np.ndarray:
    """Position angles (deg east of north, mod 180) of the trail directions ``trail_angle`` at each source."""
    out = np.full(len(sources), np.nan)
    if wcs is None or not len(sources):
        return out
    angle = np.asarray(sources["trail_angle"], np.float64)
    ok = np.isfinite(angle) & np.isfinite(np.asarray(sources["trail_length"], np.float64))
    if not ok.any():
        return out
    x, y = np.asarray(sources["x"], np.float64)[ok], np.asarray(sources["y"], np.float64)[ok]
    ra0, de0 = wcs.all_pix2world(x, y, 0)
    ra1, de1 = wcs.all_pix2world(x + np.cos(angle[ok]), y + np.sin(angle[ok]), 0)
    dra = ((ra1 - ra0 + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(de0))
    out[ok] = np.rad2deg(np.arctan2(dra, de1 - de0)) % 180.0
    return out


def forced_source_rows(forced: np.ndarray, visit: int, detector: int, band: str, midpoint_mjd_tai: float,
                       processed_mjd_tai: float) -> np.ndarray:  # fmt: skip
    """Rubin DiaForcedSource rows (:data:`FORCED_SOURCE_ROW`) of ``FORCED_DTYPE`` rows (one per DIAObject)."""
    _check_band(band)
    _check_time("midpoint_mjd_tai", midpoint_mjd_tai)
    _check_time("processed_mjd_tai", processed_mjd_tai)
    out = np.zeros(len(forced), FORCED_SOURCE_ROW)
    out["diaForcedSourceId"] = dia_source_id(visit, detector, np.arange(len(forced)))
    out["diaObjectId"] = forced["dia_object_id"]
    for ours, rubin in (("ra", "ra"), ("dec", "dec"), ("psf_flux", "psfFlux"), ("psf_flux_err", "psfFluxErr"),
                        ("science_flux", "scienceFlux"), ("science_flux_err", "scienceFluxErr")):  # fmt: skip
        out[rubin] = forced[ours]
    out["visit"], out["detector"], out["band"] = visit, detector, band
    out["midpointMjdTai"], out["timeProcessedMjdTai"] = midpoint_mjd_tai, processed_mjd_tai
    return out


def _column(table: Any, name: str, dtype: Any) -> np.ndarray:
    try:
        col = table[name]
        if np.dtype(dtype).kind == "i" and hasattr(col, "to_numpy"):  # a DataFrame column: NULL ids are 0
            return col.to_numpy(dtype=dtype, na_value=0)
        return np.asarray(col, dtype)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"input table lacks a usable {name!r} column ({exc}); pass APDB rows") from None


def summarize_objects(object_ids: np.ndarray, sources: Any, previous: Any | None = None) -> np.ndarray:
    """New DiaObject versions (:data:`DIA_OBJECT_ROW`) summarising ``sources`` per object.

    Parameters
    ----------
    object_ids : numpy.ndarray of int64
        The objects to summarise; each must have at least one row in ``sources``.
    sources : table (structured array or DataFrame)
        DiaSource rows (history and new) with ``diaObjectId``, ``ra``, ``dec``, ``snr``, ``band``,
        ``psfFlux``, ``psfFluxErr``, ``scienceFlux``, ``scienceFluxErr``, ``midpointMjdTai``.
    previous : table, optional
        The objects' current DiaObject rows; their ``nDiaSources`` and ``firstDiaSourceMjdTai`` are carried
        over, adding the sources of ``sources`` newer than the previous ``lastDiaSourceMjdTai``.
    """
    oid = _column(sources, "diaObjectId", np.int64)
    ra, dec = np.deg2rad(_column(sources, "ra", float)), np.deg2rad(_column(sources, "dec", float))
    snr = _column(sources, "snr", float)
    band = _column(sources, "band", str)
    f, fe = _column(sources, "psfFlux", float), _column(sources, "psfFluxErr", float)
    sf, sfe = _column(sources, "scienceFlux", float), _column(sources, "scienceFluxErr", float)
    t = _column(sources, "midpointMjdTai", float)
    prev: dict[int, tuple[int, float, float]] = {}
    if previous is not None and len(previous):
        for i, n, first, last in zip(_column(previous, "diaObjectId", np.int64), _column(previous, "nDiaSources", np.int64),
                                     _column(previous, "firstDiaSourceMjdTai", float),
                                     _column(previous, "lastDiaSourceMjdTai", float)):  # fmt: skip
            prev[int(i)] = (int(n), float(first), float(last))
    out = np.zeros(len(object_ids), DIA_OBJECT_ROW)
    order = np.argsort(oid, kind="stable")
    bounds = np.searchsorted(oid[order], object_ids), np.searchsorted(oid[order], object_ids, side="right")
    for k, obj in enumerate(np.asarray(object_ids, np.int64)):
        rows = order[bounds[0][k] : bounds[1][k]]
        if not rows.size:
            raise ValueError(f"DIAObject {obj} has no DiaSource in the input: pass its history")
        w = np.where(np.isfinite(snr[rows]), np.maximum(snr[rows], 1.0), 1.0) ** 2
        v = np.array([np.cos(dec[rows]) * np.cos(ra[rows]), np.cos(dec[rows]) * np.sin(ra[rows]), np.sin(dec[rows])])
        m = v @ w
        row = out[k]
        row["diaObjectId"] = obj
        row["ra"] = np.rad2deg(np.arctan2(m[1], m[0])) % 360.0
        row["dec"] = np.rad2deg(np.arctan2(m[2], np.hypot(m[0], m[1])))
        n, first, last = prev.get(int(obj), (0, np.inf, -np.inf))
        last = last if np.isfinite(last) else -np.inf  # a previous version without a time: count all
        row["nDiaSources"] = n + int(np.sum(t[rows] > last))
        row["firstDiaSourceMjdTai"] = np.fmin(first, t[rows].min())
        row["lastDiaSourceMjdTai"] = np.fmax(last, t[rows].max())
        for b in BANDS:
            _band_stats(row, b, f[rows][band[rows] == b], fe[rows][band[rows] == b], sf[rows][band[rows] == b],
                        sfe[rows][band[rows] == b])  # fmt: skip
    return out


def _weighted(x: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    ok = np.isfinite(x) & np.isfinite(e) & (e > 0)
    if not ok.any():
        return np.nan, np.nan
    w = 1.0 / e[ok] ** 2
    return float(np.sum(w * x[ok]) / np.sum(w)), float(1.0 / np.sqrt(np.sum(w)))


def _band_stats(row: np.void, b: str, f: np.ndarray, fe: np.ndarray, sf: np.ndarray, sfe: np.ndarray) -> None:
    good = np.isfinite(f)
    row[f"{b}_psfFluxNdata"] = int(good.sum())
    for s in _BAND_STATS:
        row[f"{b}_{s}"] = np.nan
    if not good.any():
        return
    row[f"{b}_psfFluxMean"], row[f"{b}_psfFluxMeanErr"] = _weighted(f, fe)
    if good.sum() > 1:
        row[f"{b}_psfFluxSigma"] = np.std(f[good], ddof=1)
    row[f"{b}_psfFluxMin"], row[f"{b}_psfFluxMax"] = f[good].min(), f[good].max()
    if np.isfinite(fe[good]).any():
        row[f"{b}_psfFluxErrMean"] = np.nanmean(fe[good])
    row[f"{b}_scienceFluxMean"], row[f"{b}_scienceFluxMeanErr"] = _weighted(sf, sfe)


def associate_ccd(sources: np.ndarray, objects: Any, history: Any, ss_predictions: np.ndarray | None,
                  config: AssociationConfig = AssociationConfig()) -> AssociationResult:  # fmt: skip
    """Associate one CCD's DiaSource rows with SSObjects and DIAObjects (see the module docstring).

    Parameters
    ----------
    sources : numpy.ndarray
        :data:`DIA_SOURCE_ROW` rows of this CCD (:func:`dia_source_rows`), not yet associated.
    objects : table
        The current DiaObject rows of the region (``getDiaObjects``): ``diaObjectId``, ``ra``, ``dec``,
        ``nDiaSources``, ``firstDiaSourceMjdTai``, ``lastDiaSourceMjdTai``.
    history : table
        Earlier DiaSource rows of those objects (``getDiaSources``), used for the summaries; may be empty.
    ss_predictions : numpy.ndarray or None
        :data:`SS_PREDICTION_DTYPE` positions at the exposure midpoint.
    config : AssociationConfig

    Returns
    -------
    AssociationResult
    """
    if not isinstance(sources, np.ndarray) or sources.dtype != DIA_SOURCE_ROW:
        raise ValueError("sources must be DIA_SOURCE_ROW rows: convert DIA_DTYPE with dia_source_rows() first")
    out = sources.copy()
    out["diaObjectId"] = 0
    out["ssObjectId"] = 0
    free = np.ones(len(out), bool)
    n_ss = 0
    if ss_predictions is not None and len(ss_predictions):
        if ss_predictions.dtype != SS_PREDICTION_DTYPE:
            raise ValueError(f"ss_predictions must have dtype SS_PREDICTION_DTYPE, got {ss_predictions.dtype}")
        match, _ = associate(out["ra"], out["dec"], out["snr"], ss_predictions["ra"], ss_predictions["dec"],
                             ss_predictions["radius_arcsec"])  # fmt: skip
        hit = match >= 0
        out["ssObjectId"][hit] = ss_predictions["ssObjectId"][match[hit]]
        free &= ~hit
        n_ss = int(hit.sum())
    obj_ids = _column(objects, "diaObjectId", np.int64)
    idx = np.flatnonzero(free)
    match, _ = associate(out["ra"][idx], out["dec"][idx], out["snr"][idx], _column(objects, "ra", float),
                         _column(objects, "dec", float), config.radius_arcsec)  # fmt: skip
    hit = match >= 0
    out["diaObjectId"][idx[hit]] = obj_ids[match[hit]]
    creates = idx[~hit]
    out["diaObjectId"][creates] = out["diaSourceId"][creates]
    updated = np.unique(obj_ids[match[hit]])
    n_unassociated = int(np.sum((out["diaObjectId"] == 0) & (out["ssObjectId"] == 0)))
    if len(history):
        hist_ids = _column(history, "diaObjectId", np.int64)
        keep = np.isin(hist_ids, updated)
        cols = ("diaObjectId", "ra", "dec", "snr", "band", "psfFlux", "psfFluxErr", "scienceFlux",
                "scienceFluxErr", "midpointMjdTai")  # fmt: skip
        hist = {c: _column(history, c, out.dtype[c] if c != "band" else str)[keep] for c in cols}
        both = {c: np.concatenate([hist[c], out[c][out["diaObjectId"] != 0]]) for c in cols}
    else:
        both = out[out["diaObjectId"] != 0]
    previous = None
    if len(updated):
        sel = np.isin(obj_ids, updated)
        previous = {c: _column(objects, c, float)[sel] for c in ("nDiaSources", "firstDiaSourceMjdTai",
                                                                  "lastDiaSourceMjdTai")}  # fmt: skip
        previous["diaObjectId"] = obj_ids[sel]
    all_ids = np.concatenate([updated, out["diaSourceId"][creates]])
    rows = summarize_objects(all_ids, both, previous)
    return AssociationResult(out, rows, len(creates), len(updated), n_ss, n_unassociated)
