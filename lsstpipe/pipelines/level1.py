"""The Level 1 half of a CCD job: association, the APDB write and the alerts of one processed CCD.

Two stages, called by a worker around :func:`lsstpipe.pipelines.ap.process_ccd`:

1. :func:`prefetch_region` — what the worker reads *before the exposure ends*: the CCD's region on the sky
   (a circle around the nominal WCS's footprint plus a margin), its current DIAObjects, their DiaSources
   and DiaForcedSources of the last 12 months (``lsst.dax.apdb``'s ``read_*_months``; only rows *before*
   the visit are kept) and the Solar System predictions at the visit's midpoint from the night's Chebyshev
   coefficients (:func:`lsstpipe.pipelines.mops_orbits.predict_positions`).
   :meth:`Level1Prefetch.dia_objects_for_forced` feeds ``CcdInputs.dia_objects`` so that the chain's
   forced photometry on the difference image covers them.
2. :func:`ccd_level1` — after the chain: associate the DIASources (:func:`~lsstpipe.pipelines.association.associate_ccd`),
   store DiaSources, the new DiaObject versions and the DiaForcedSources in one transaction
   (:meth:`~lsstpipe.db.apdb.Level1Database.store_ccd`), then one alert per DIASource, written in batches.
   Just before associating, the region's DIAObjects are read again (:func:`refresh_prefetch`): the same
   CCD of the previous visit may have stored its new DIAObjects after this visit's prefetch.

DIASource ids pack the visit into 35 bits (:func:`~lsstpipe.pipelines.association.dia_source_id`); Rubin's
``YYYYMMDD * 100000 + seq`` visit ids do not fit, so ids are made from :func:`id_visit` while the rows'
``visit`` column keeps the real visit.

Idempotence under a retry of the same (visit, detector): the CCD's alert files are first deleted
(:meth:`~lsstpipe.alerts.writer.AlertWriter.reset_ccd`); if the APDB already holds the CCD (a first attempt
crashed after its store, or a racing job stored it), nothing is associated or stored again and the alerts
are rebuilt from the stored association (DiaSource ids are a deterministic function of visit, detector and
the source's index, and the chain is deterministic), so the APDB and the alert files hold each DIASource
exactly once. A CCD without a difference image yields no rows and no alerts, with a flag saying why.

:mod:`lsstpipe.pipelines.level1_truth` scores a whole APDB against the simulator's truth.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from astropy.time import Time

from kernels.astrometry import angular_separation_deg
from lsstpipe.alerts.cutouts import CUTOUT_SIZE_ARCSEC, CcdCutouts
from lsstpipe.alerts.packet import (
    HISTORY_DAYS,
    SourceContext,
    dia_source_record,
    make_alert,
    record_fields,
    ss_source_record,
)
from lsstpipe.alerts.writer import AlertWriter
from lsstpipe.db.apdb import Level1Database, circle
from lsstpipe.pipelines.ap import CcdInputs, CcdResult
from lsstpipe.pipelines.association import (
    AssociationConfig,
    associate_ccd,
    dia_source_id,
    dia_source_rows,
    forced_source_rows,
)
from lsstpipe.pipelines.mops_orbits import predict_positions

__all__ = ["Level1Config", "Level1Counts", "Level1Prefetch", "ccd_level1", "ccd_region", "id_column", "id_visit",
           "prefetch_region", "refresh_prefetch", "visit_midpoint_mjd_tai"]  # fmt: skip

#: Flag of a CCD that has no difference image (hence no DIASources and no alerts).
NO_DIFFERENCE = "LEVEL1_NO_DIFFERENCE_IMAGE"
#: Flag of a CCD that the APDB already held: its alerts were rebuilt from the stored association.
ALREADY_STORED = "LEVEL1_ALREADY_STORED"
#: Flag of a CCD associated and stored without alerts (the Alert Production Cluster's ``pipeline.alerts: false``).
ALERTS_OFF = "LEVEL1_ALERTS_OFF"


@dataclass(frozen=True)
class Level1Config:
    """Settings of :func:`ccd_level1`."""

    association: AssociationConfig = field(default_factory=AssociationConfig)
    """DIASource–DIAObject matching (radius, pixel scale)."""
    cutout_size_arcsec: float = CUTOUT_SIZE_ARCSEC
    """Side of the science/template/difference cutouts."""
    history_days: float = HISTORY_DAYS
    """Previous DiaSources/DiaForcedSources sent in an alert (days before the visit)."""
    refresh_objects: bool = True
    """Re-read the region's DIAObjects just before associating (:func:`refresh_prefetch`)."""

    def __post_init__(self) -> None:
        for name in ("cutout_size_arcsec", "history_days"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")


@dataclass(frozen=True)
class Level1Prefetch:
    """What :func:`prefetch_region` read for one CCD of one visit.

    Attributes
    ----------
    ra, dec, radius_deg : float
        The region (degrees).
    visit_mjd_tai : float
        The visit midpoint the reads were made for.
    dia_objects : pandas.DataFrame
        Current DiaObject versions in the region (APDB columns).
    dia_sources, dia_forced_sources : pandas.DataFrame
        Their DiaSources / DiaForcedSources of the 12 months before the visit.
    ss_predictions : numpy.ndarray or None
        :data:`~lsstpipe.pipelines.association.SS_PREDICTION_DTYPE` positions in the region (None: no coefficients).
    """

    ra: float
    dec: float
    radius_deg: float
    visit_mjd_tai: float
    dia_objects: Any
    dia_sources: Any
    dia_forced_sources: Any
    ss_predictions: np.ndarray | None

    def dia_objects_for_forced(self) -> np.ndarray:
        """``(id, ra, dec)`` rows of the region's DIAObjects, what ``CcdInputs.dia_objects`` takes."""
        out = np.zeros(len(self.dia_objects), [("id", "i8"), ("ra", "f8"), ("dec", "f8")])
        if len(out):
            out["id"] = self.dia_objects["diaObjectId"].to_numpy(np.int64)
            out["ra"] = self.dia_objects["ra"].to_numpy(float)
            out["dec"] = self.dia_objects["dec"].to_numpy(float)
        return out


@dataclass(frozen=True)
class Level1Counts:
    """What :func:`ccd_level1` did for one CCD.

    ``first_alert_time``/``last_alert_time`` are ``time.time()`` when the CCD's first/last alert file was
    written (NaN without alerts). ``flags`` says why there are no alerts or that the CCD was already stored.
    """

    diasources: int
    new_objects: int
    forced: int
    ss_matched: int
    alerts: int
    first_alert_time: float
    last_alert_time: float
    flags: tuple[str, ...] = ()


def ccd_region(inputs: CcdInputs, margin_deg: float = 0.01) -> tuple[float, float, float]:
    """``(ra, dec, radius)`` in degrees of a circle holding the CCD (nominal WCS) plus ``margin_deg``."""
    if not (np.isfinite(margin_deg) and margin_deg >= 0):
        raise ValueError(f"margin_deg must be finite and ≥ 0, got {margin_deg}")
    ny, nx = inputs.detector.shape
    wcs = inputs.initial_wcs
    ra_c, dec_c = (float(v[0]) for v in wcs.all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0))
    cra, cdec = wcs.all_pix2world([0, nx - 1, 0, nx - 1], [0, 0, ny - 1, ny - 1], 0)
    cosd = np.cos(np.radians(dec_c))
    dra = (np.asarray(cra) - ra_c + 180.0) % 360.0 - 180.0
    radius = float(np.max(np.hypot(dra * cosd, np.asarray(cdec) - dec_c))) + margin_deg
    return ra_c % 360.0, dec_c, radius


def visit_midpoint_mjd_tai(inputs: CcdInputs) -> float:
    """The visit's exposure midpoint (MJD TAI): halfway from the first snap's start to the last snap's end."""
    first, last = inputs.snap_metadata[0], inputs.snap_metadata[-1]
    t0, t1 = float(first.get("mjd", np.nan)), float(last.get("mjd", np.nan)) + float(last["exptime"]) / 86400.0
    if not (np.isfinite(t0) and np.isfinite(t1)):
        raise ValueError("the raws carry no MJD-OBS; pass the visit midpoint from the visit's schedule")
    return 0.5 * (t0 + t1)


def _before(frame: Any, mjd: float) -> Any:
    import pandas as pd

    if frame is None:
        return pd.DataFrame()
    if not len(frame):
        return frame
    return frame[frame["midpointMjdTai"].to_numpy(float) < mjd].reset_index(drop=True)


def prefetch_region(apdb: Level1Database, inputs: CcdInputs, visit_mjd_tai: float, ss_coefficients=None, *,
                    margin_deg: float = 0.01, ss_radius_arcsec: float = 2.0) -> Level1Prefetch:  # fmt: skip
    """Read the CCD's region from the APDB and predict the Solar System objects in it (module docstring).

    Parameters
    ----------
    apdb : Level1Database
    inputs : CcdInputs
        The CCD (its nominal WCS and detector shape give the region).
    visit_mjd_tai : float
        The visit's exposure midpoint (MJD TAI), as scheduled.
    ss_coefficients : numpy.ndarray, optional
        The night's :func:`~lsstpipe.pipelines.mops_orbits.nightly_coefficients` (None: no SS predictions).
    margin_deg : float
        Extra radius around the CCD (WCS error, association radius).
    ss_radius_arcsec : float
        Match radius of each SS prediction.
    """
    ra, dec, radius = ccd_region(inputs, margin_deg)
    predictions = None
    if ss_coefficients is not None:
        pred = predict_positions(ss_coefficients, visit_mjd_tai, ss_radius_arcsec)
        predictions = pred[angular_separation_deg(pred["ra"], pred["dec"], ra, dec) <= radius]
    return Level1Prefetch(ra, dec, radius, float(visit_mjd_tai), *_read_region(apdb, ra, dec, radius, visit_mjd_tai),
                          predictions)  # fmt: skip


def _read_region(apdb: Level1Database, ra: float, dec: float, radius: float, mjd: float, objects: Any = None):
    """Current DiaObjects of the cone (read unless given) and their DiaSources/DiaForcedSources before ``mjd``."""
    objects = apdb.dia_objects(ra, dec, radius) if objects is None else objects
    ids = objects["diaObjectId"].to_numpy(np.int64) if len(objects) else np.zeros(0, np.int64)
    sources = apdb.dia_sources(ra, dec, radius, mjd, ids)
    forced = apdb.apdb.getDiaForcedSources(circle(ra, dec, radius), [int(i) for i in ids], _tai(mjd))
    return objects, _before(sources, mjd), _before(forced, mjd)


def refresh_prefetch(apdb: Level1Database, prefetch: Level1Prefetch) -> Level1Prefetch:
    """``prefetch`` with the region's DIAObjects read again, and their histories if any changed since.

    The prefetch is read before the exposure ends, while the same CCD of the previous visit (36 s earlier,
    on another rank) may still be running: without this re-read its new DIAObjects would be missed and the
    same source would get a second DIAObject. One query when nothing changed, three when something did.
    """
    objects = apdb.dia_objects(prefetch.ra, prefetch.dec, prefetch.radius_deg)

    def versions(frame: Any) -> set:
        if not len(frame):
            return set()
        return set(zip(frame["diaObjectId"].to_numpy(np.int64).tolist(),
                       frame["validityStartMjdTai"].to_numpy(float).tolist()))  # fmt: skip

    if versions(objects) == versions(prefetch.dia_objects):
        return prefetch
    reads = _read_region(apdb, prefetch.ra, prefetch.dec, prefetch.radius_deg, prefetch.visit_mjd_tai, objects)
    return replace(prefetch, dia_objects=reads[0], dia_sources=reads[1], dia_forced_sources=reads[2])


def _tai(mjd: float) -> Time:
    return Time(mjd, format="mjd", scale="tai")


def _records(frame: Any, fields: dict) -> list[dict]:
    """Rows of an APDB frame or a row array as dicts of the alert record's fields (NULL → None)."""
    if frame is None or not len(frame):
        return []
    if isinstance(frame, np.ndarray):
        names = [n for n in frame.dtype.names or () if n in fields]
        return [{n: (r[n].item() if n not in _ID_FIELDS or r[n] != 0 else None) for n in names} for r in frame]
    cols = [c for c in frame.columns if c in fields]
    sub = frame[cols].astype(object)
    return sub.where(sub.notna(), None).to_dict("records")


_ID_FIELDS = ("diaObjectId", "ssObjectId")


def id_column(column: Any) -> np.ndarray:
    """An id column of an APDB frame as int64, NULL → 0 (never through float64: ids exceed 2^53)."""
    if column.dtype.kind == "f":
        raise ValueError(f"id column {column.name} was read as float64, which loses 64-bit ids; read it as Int64")
    return column.astype("Int64").to_numpy(np.int64, na_value=0)


def _by_object(records: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("diaObjectId") is not None:
            out[int(r["diaObjectId"])].append(r)
    return out


def _stored_rows(apdb: Level1Database, prefetch: Level1Prefetch, visit: int, detector: int,
                 midpoint: float) -> tuple[Any, Any, Any]:  # fmt: skip
    """The DiaSources, current DiaObjects and DiaForcedSources the APDB holds for an already-stored CCD."""
    import pandas as pd

    region = (prefetch.ra, prefetch.dec, prefetch.radius_deg)
    src = apdb.apdb.getDiaSources(circle(*region), None, _tai(midpoint - 1.0))
    src = pd.DataFrame() if src is None else src
    if len(src):
        src = src[(src["visit"].to_numpy(np.int64) == visit) & (src["detector"].to_numpy(np.int64) == detector)]
    ids = src["diaObjectId"].dropna().astype(np.int64).unique() if len(src) else np.zeros(0, np.int64)
    objects = apdb.dia_objects(*region)
    if len(objects):
        objects = objects[np.isin(objects["diaObjectId"].to_numpy(np.int64), ids)]
    targets = set(ids.tolist()) | set(prefetch.dia_objects_for_forced()["id"].tolist())  # what was measured
    forced = apdb.apdb.getDiaForcedSources(circle(*region), sorted(targets), _tai(midpoint))
    if forced is not None and len(forced):
        forced = forced[(forced["visit"].to_numpy(np.int64) == visit)
                        & (forced["detector"].to_numpy(np.int64) == detector)]  # fmt: skip
    return src.reset_index(drop=True), objects, forced


def id_visit(visit: int) -> int:
    """The visit number packed into DIASource ids (:func:`~lsstpipe.pipelines.association.dia_source_id` has
    35 bits for it): the visit itself when it fits, else Rubin's ``YYYYMMDD * 100000 + seq`` exposure id as
    ``days since 2000-01-01 * 100000 + seq`` (unique and fitting until the year 2900)."""
    import datetime

    if 0 <= visit < 1 << 35:
        return visit
    day, seq = divmod(visit, 100000)
    try:
        date = datetime.date(day // 10000, day // 100 % 100, day % 100)
    except ValueError:
        raise ValueError(f"visit {visit} neither fits the 35 bits of a DIASource id nor is a YYYYMMDD*100000+seq "
                         "exposure id; number the visits below 2^35") from None  # fmt: skip
    return (date - datetime.date(2000, 1, 1)).days * 100000 + seq


def ccd_level1(inputs: CcdInputs, result: CcdResult, prefetch: Level1Prefetch, *, visit: int, detector_id: int,
               midpoint_mjd_tai: float, apdb: Level1Database, alerts: AlertWriter | None,
               config: Level1Config = Level1Config()) -> Level1Counts:  # fmt: skip
    """Associate, store and alert one processed CCD (see the module docstring).

    Parameters
    ----------
    inputs, result : CcdInputs, CcdResult
        The chain's inputs and output for the CCD.
    prefetch : Level1Prefetch
        :func:`prefetch_region` of this CCD and visit.
    visit, detector_id : int
        The CCD (``detector_id`` is ``Detector.id``).
    midpoint_mjd_tai : float
        Exposure midpoint (MJD TAI).
    apdb : Level1Database
    alerts : AlertWriter or None
        Full batches are written as they fill; the CCD's partial batch is flushed at the end. None: the
        DIASources are associated and stored, no alert is issued (``pipeline.alerts: false`` in the Alert
        Production Cluster's configuration); the counts say :data:`ALERTS_OFF`.
    config : Level1Config

    Returns
    -------
    Level1Counts
    """
    visit, detector_id = int(visit), int(detector_id)
    if not (np.isfinite(midpoint_mjd_tai) and abs(midpoint_mjd_tai - prefetch.visit_mjd_tai) < 1.0):
        raise ValueError(f"midpoint {midpoint_mjd_tai} is not the prefetch's visit time {prefetch.visit_mjd_tai}: "
                         "prefetch the region for this visit")  # fmt: skip
    if alerts is not None:
        alerts.reset_ccd(visit, detector_id)  # a retry replaces the first attempt's files
    char = result.characterization
    if result.difference is None or char is None or char.wcs is None:
        why = ",".join(result.flags) or "no difference image"
        return Level1Counts(0, 0, 0, 0, 0, np.nan, np.nan, (f"{NO_DIFFERENCE}({why})",))
    band = inputs.band
    processed = float(Time.now().tai.mjd)
    dia = result.dia_sources
    packed = id_visit(visit)
    ids = dia_source_id(packed, detector_id, np.arange(len(dia)))
    flags: list[str] = []
    stored = False
    exptime = float(sum(float(m["exptime"]) for m in inputs.snap_metadata))
    scale = float(char.metrics.get("pixel_scale_arcsec", config.association.pixel_scale_arcsec))
    ctx = SourceContext(visit, detector_id, midpoint_mjd_tai, processed, band, scale, result.dia_stamp_size, exptime,
                        char.wcs)  # fmt: skip
    if not apdb.apdb.containsVisitDetector(visit, detector_id):
        if config.refresh_objects:
            prefetch = refresh_prefetch(apdb, prefetch)
        rows = dia_source_rows(dia, visit, detector_id, band, midpoint_mjd_tai, processed, ctx.pixel_scale_arcsec,
                               psf_stamp_size=ctx.psf_stamp_size, exposure_time=ctx.exposure_time, wcs=ctx.wcs,
                               ids=ids)  # fmt: skip
        assoc = associate_ccd(rows, prefetch.dia_objects, prefetch.dia_sources, prefetch.ss_predictions,
                              config.association)  # fmt: skip
        forced = forced_source_rows(result.forced, packed, detector_id, band, midpoint_mjd_tai, processed)
        forced["visit"] = visit
        stored = apdb.store_ccd(visit, detector_id, midpoint_mjd_tai, assoc.dia_objects, assoc.dia_sources, forced)
    if alerts is None:
        n_new = assoc.n_new if stored else 0
        n_forced = len(forced) if stored else 0
        n_ss = assoc.n_ss_matched if stored else 0
        flags = [*flags, ALERTS_OFF] if stored else [*flags, ALREADY_STORED, ALERTS_OFF]
        return Level1Counts(len(dia), int(n_new), int(n_forced), int(n_ss), 0, np.nan, np.nan, tuple(flags))
    if stored:
        src_obj, src_ss = assoc.dia_sources["diaObjectId"], assoc.dia_sources["ssObjectId"]
        objects = assoc.dia_objects.copy()
        new, n_forced, n_ss = assoc.n_new, len(forced), assoc.n_ss_matched
        obj_records = _records(objects, record_fields(alerts.schema, "diaObject"))
        forced_now = forced
    else:  # already in the APDB: rebuild the alerts from what is stored, store nothing
        flags.append(ALREADY_STORED)
        src, objects, forced_now = _stored_rows(apdb, prefetch, visit, detector_id, midpoint_mjd_tai)
        stored_ids = src["diaSourceId"].to_numpy(np.int64) if len(src) else np.zeros(0, np.int64)
        keep = np.isin(ids, stored_ids)
        if not keep.all():
            flags.append(f"LEVEL1_RETRY_MISMATCH({int((~keep).sum())} DIASources not in the APDB: no alert)")
        dia, ids = dia[keep], ids[keep]
        order = np.argsort(stored_ids)
        pos = order[np.searchsorted(stored_ids, ids, sorter=order)]
        src_obj = id_column(src["diaObjectId"])[pos] if len(src) else np.zeros(0, np.int64)
        src_ss = id_column(src["ssObjectId"])[pos] if len(src) else np.zeros(0, np.int64)
        new, n_ss = 0, int(np.sum(src_ss != 0))  # nothing is created by a retry
        n_forced = len(forced_now) if forced_now is not None else 0
        obj_records = _records(objects, record_fields(alerts.schema, "diaObject"))
    for r in obj_records:
        r.setdefault("validityStartMjdTai", midpoint_mjd_tai)
    n, first, last = _write_alerts(inputs, result, prefetch, dia, ids, src_obj, src_ss, obj_records, forced_now,
                                   ctx=ctx, alerts=alerts, config=config)  # fmt: skip
    return Level1Counts(len(dia), int(new), int(n_forced), int(n_ss), n, first, last, tuple(flags))


def _write_alerts(inputs, result, prefetch, dia, ids, src_obj, src_ss, obj_records, forced_now, *,
                  ctx: SourceContext, alerts: AlertWriter, config: Level1Config):  # fmt: skip
    """One alert per DIASource, added to the writer (full batches leave at once); the CCD's rest is flushed."""
    schema = alerts.schema
    char = result.characterization
    objects = {int(r["diaObjectId"]): r for r in obj_records}
    prv_src = _by_object(_records(prefetch.dia_sources, record_fields(schema, "diaSource")))
    prv_forced = _by_object(_records(prefetch.dia_forced_sources, record_fields(schema, "diaForcedSource"))
                            + _records(forced_now, record_fields(schema, "diaForcedSource")))  # fmt: skip
    first = last = np.nan
    n = 0
    # the stamps' headers are formatted once per CCD (astropy per stamp took ~10 ms an alert)
    cutouts = CcdCutouts(result.calexp, result.difference, char.wcs, char.zero_point, config.cutout_size_arcsec) \
        if len(dia) else None  # fmt: skip

    def wrote(paths) -> None:
        nonlocal first, last
        if paths:
            last = time.time()
            first = last if np.isnan(first) else first

    for k, row in enumerate(dia):
        oid, ssid, sid = int(src_obj[k]), int(src_ss[k]), int(ids[k])
        rec = dia_source_record(row, ctx, schema, dia_source_id=sid, dia_object_id=oid or None,
                                ss_object_id=ssid or None)  # fmt: skip
        ss = ss_source_record(schema, sid, ssid, float(row["ra"]), float(row["dec"])) if ssid else None
        cuts = cutouts.at(float(row["x"]), float(row["y"]))
        alert = make_alert(schema, rec, dia_object=objects.get(oid), prv_dia_sources=prv_src.get(oid, ()),
                           prv_dia_forced_sources=prv_forced.get(oid, ()), ss_source=ss, cutouts=cuts,
                           history_days=config.history_days, validate=not alerts.validate)  # fmt: skip
        path = alerts.add(alert)
        wrote([path] if path is not None else [])
        n += 1
    wrote(alerts.flush(ctx.visit, ctx.detector))
    return n, first, last
