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

:func:`score_association` scores a whole APDB against the simulator's truth (variables and transients
kept on one DIAObject, DIAObjects merging true sources, Solar System detections on the right SSObject).
"""

from __future__ import annotations

import csv
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
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
from lsstpipe.pipelines.mops_orbits import SSOBJECT_DTYPE, predict_positions

__all__ = ["Level1Config", "Level1Counts", "Level1Prefetch", "ccd_level1", "ccd_region", "id_visit", "prefetch_region",
           "refresh_prefetch", "score_association", "ssobjects_from_truth", "visit_midpoint_mjd_tai"]  # fmt: skip

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


def _ids(column: Any) -> np.ndarray:
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
        src_obj = _ids(src["diaObjectId"])[pos] if len(src) else np.zeros(0, np.int64)
        src_ss = _ids(src["ssObjectId"])[pos] if len(src) else np.zeros(0, np.int64)
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


# --------------------------------------------------------------------------------------------- truth
def ssobjects_from_truth(repo: Any) -> np.ndarray:
    """:data:`~lsstpipe.pipelines.mops_orbits.SSOBJECT_DTYPE` rows of a simulated repository's true orbits
    (``truth/ssos.csv``), ``ssObjectId`` = the simulator's id: the SSObject table a perfect daytime MOPS
    would have produced, for :func:`~lsstpipe.pipelines.mops_orbits.nightly_coefficients`."""
    path = Path(getattr(repo, "root", repo)) / "truth" / "ssos.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {path.parent.parent} a repository made by lsstpipe.sim?")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    out = np.zeros(len(rows), SSOBJECT_DTYPE)
    for ours, col in (("ssObjectId", "id"), ("a", "a"), ("e", "e"), ("inc", "inc"), ("node", "node"),
                      ("argPeri", "arg_peri"), ("ma", "mean_anomaly"), ("epoch", "epoch_mjd_tdb")):  # fmt: skip
        out[ours] = [float(r[col]) if ours != "ssObjectId" else int(r[col]) for r in rows]
    return out


def _table(apdb: Level1Database, name: str) -> Any:
    import pandas as pd
    import sqlalchemy

    config = apdb.apdb.getConfig()
    engine = sqlalchemy.create_engine(config.db_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            return pd.read_sql_table(
                f"{config.prefix}{name}", conn, schema=config.namespace, dtype_backend="numpy_nullable"
            )  # 64-bit ids stay exact with NULLs
    finally:
        engine.dispose()


def _truth_segments(root: Path, exposures: list[dict], detector: str) -> dict[str, np.ndarray]:
    """True sources of one CCD over a visit's snaps: fixed sources at their position, Solar System objects
    as the segment from their position at the first snap's opening to the last snap's closing."""
    seen: dict[int, dict] = {}
    for e in sorted(exposures, key=lambda r: r["snap"]):
        paths = list(root.glob(f"truth/exposures/*/{e['obsid']}/{e['obsid']}_{detector}_sources.csv"))
        if not paths:
            raise FileNotFoundError(f"no truth table of {e['obsid']} {detector} under {root}/truth: score a "
                                    "repository made by lsstpipe.sim")  # fmt: skip
        with paths[0].open() as fh:
            for r in csv.DictReader(fh):
                i = int(r["id"])
                if i not in seen:
                    seen[i] = {"id": i, "kind": r["kind"], "x0": float(r["x"]), "y0": float(r["y"])}
                seen[i]["x1"], seen[i]["y1"] = float(r["x_end"]), float(r["y_end"])
    rows = list(seen.values())
    out = {k: np.array([r[k] for r in rows], float) for k in ("x0", "y0", "x1", "y1")}
    out["id"] = np.array([r["id"] for r in rows], np.int64)
    out["kind"] = np.array([r["kind"] for r in rows], dtype=object)
    return out


def _segment_distance(px, py, t: dict[str, np.ndarray]) -> np.ndarray:
    dx, dy = t["x1"] - t["x0"], t["y1"] - t["y0"]
    length2 = np.maximum(dx * dx + dy * dy, 1e-12)
    u = np.clip(((px[:, None] - t["x0"]) * dx + (py[:, None] - t["y0"]) * dy) / length2, 0.0, 1.0)
    return np.hypot(px[:, None] - (t["x0"] + u * dx), py[:, None] - (t["y0"] + u * dy))


def score_association(repo: Any, apdb: Level1Database, *, match_radius_pix: float = 2.5) -> dict:
    """Score the association stored in ``apdb`` against a simulated repository's truth.

    Every stored DiaSource is matched to the nearest true source of its visit and CCD (pixel distance to
    the source, or to the trail of a Solar System object across the visit's snaps) within
    ``match_radius_pix``; unmatched DiaSources (noise, artefacts) are left out of every score.

    Returns
    -------
    dict
        ``n_dia_sources``, ``n_matched``; for ``kind`` in ``variable`` and ``transient``:
        ``{kind}_sources`` (matched DiaSources of that kind), ``{kind}_on_one_object`` (the fraction of them
        on their true source's most common DIAObject, NULL ``diaObjectId`` counting as off it),
        ``{kind}_unassociated`` (how many have no DIAObject), ``{kind}_associated_on_one_object`` (the same
        fraction among those with a DIAObject); ``n_objects`` (DIAObjects with a matched
        DiaSource), ``n_merged`` and ``merged_fraction`` (those holding DiaSources of two or more true
        sources); ``sso_sources``, ``sso_correct`` and ``sso_matched_fraction`` (Solar System detections
        carrying the right ``ssObjectId``).
    """
    from lsstpipe.camera import get_camera
    from lsstpipe.repo import Repository

    repo = repo if isinstance(repo, Repository) else Repository(repo)
    names = {d.id: d.name for d in get_camera(repo.read_config()["camera"])}
    by_visit: dict[int, list[dict]] = defaultdict(list)
    for e in repo.exposures("OBJECT"):
        by_visit[int(e["visit"])].append(e)
    src = _table(apdb, "DiaSource")
    n = len(src)
    obj = _ids(src["diaObjectId"]) if n else np.zeros(0, np.int64)
    ssid = _ids(src["ssObjectId"]) if n else np.zeros(0, np.int64)
    tid = np.zeros(n, np.int64)
    kind = np.full(n, "", dtype=object)
    visits, dets = (src[c].to_numpy(np.int64) if n else np.zeros(0, np.int64) for c in ("visit", "detector"))
    for v, d in sorted(set(zip(visits.tolist(), dets.tolist()))):
        sel = np.flatnonzero((visits == v) & (dets == d))
        truth = _truth_segments(repo.root, by_visit[v], names[d])
        if not len(truth["id"]):
            continue
        dist = _segment_distance(src["x"].to_numpy(float)[sel], src["y"].to_numpy(float)[sel], truth)
        best = dist.argmin(axis=1)
        ok = dist[np.arange(len(sel)), best] <= match_radius_pix
        tid[sel[ok]], kind[sel[ok]] = truth["id"][best[ok]], truth["kind"][best[ok]]
    out: dict[str, Any] = {"n_dia_sources": n, "n_matched": int(np.sum(tid != 0))}
    for k in ("variable", "transient"):
        sel = kind == k
        on = 0
        for t in np.unique(tid[sel]):
            objs = obj[sel & (tid == t)]
            objs = objs[objs != 0]
            on += int(np.bincount(np.unique(objs, return_inverse=True)[1]).max()) if objs.size else 0
        n_k, n_null = int(sel.sum()), int(np.sum(sel & (obj == 0)))
        out[f"{k}_sources"], out[f"{k}_unassociated"] = n_k, n_null
        out[f"{k}_on_one_object"] = on / n_k if n_k else np.nan
        out[f"{k}_associated_on_one_object"] = on / (n_k - n_null) if n_k > n_null else np.nan
    has = (obj != 0) & (tid != 0)
    members: dict[int, set] = defaultdict(set)
    for o, t in zip(obj[has], tid[has]):
        members[int(o)].add(int(t))
    out["n_objects"] = len(members)
    out["n_merged"] = sum(len(s) > 1 for s in members.values())
    out["merged_fraction"] = out["n_merged"] / len(members) if members else np.nan
    sso = kind == "sso"
    out["sso_sources"] = int(sso.sum())
    out["sso_correct"] = int(np.sum(sso & (ssid == tid)))
    out["sso_matched_fraction"] = out["sso_correct"] / out["sso_sources"] if sso.any() else np.nan
    return out
