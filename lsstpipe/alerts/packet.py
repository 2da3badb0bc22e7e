"""Alert packets in Rubin's Avro format, against the schema shipped by ``lsst-alert-packet``.

The schema is never copied: :func:`load_schema` reads it from the installed package (by default the latest
version it ships, :func:`lsst.alert.packet.get_latest_schema_version`; v11.1 at the time of writing). In
v11.x the alert's identifier is the top-level ``diaSourceId`` (the triggering DiaSource; there is no separate
``alertId``), and the Solar System match travels as ``ssSource`` (the per-detection record with
``ssObjectId``) plus the object's ``mpc_orbits`` row.

:func:`make_alert` assembles one alert per DIASource: the ``diaSource`` record, its ``diaObject``, up to
12 months (:data:`HISTORY_DAYS`) of previous DiaSources and DiaForcedSources, the ``ssSource`` and
``mpc_orbits`` if matched, and the three FITS cutouts (:mod:`lsstpipe.alerts.cutouts`). Every record is
checked field by field against the schema (:func:`complete_record`): an unknown field or a missing required
one raises :class:`AlertSchemaError` naming it; nullable fields that are absent become null; NaN in a
nullable field becomes null (not measured); values of Avro ``float`` fields are rounded to float32, so
the dict equals what a reader decodes. The whole alert is then validated with ``fastavro``.

Wire format (:func:`serialize_alert`): Confluent's — magic byte 0, the 4-byte big-endian schema id
(:meth:`lsst.alert.packet.Schema.get_schema_id`, 1101 for v11.1, what Rubin registers), then the schemaless
Avro body. Container files are written by :mod:`lsstpipe.alerts.writer`.

The alert's ``diaSource`` is the APDB's DiaSource row: :func:`lsstpipe.pipelines.association.dia_source_rows`
is the one mapping from our measurement to Rubin's DiaSource (names, units, flags; documented there), and
:func:`alert_dia_source` only converts that row to the Avro record, where Avro itself differs from the row
array: numpy scalars → Python values, ``float`` fields rounded to float32, NaN → null in nullable fields
(as the APDB stores NULL), ``0`` → null in ``diaObjectId``/``ssObjectId`` (the row arrays' "no id", stored as
NULL), the APDB's ``short`` ``detector`` → Avro ``int``. No value changes unit: for every field both have,
``apdb.yaml`` and the alert schema give the same unit (moments in arcsec², ``trailLength`` in arcsec,
``trailAngle`` in degrees, ``psfNdata``/``trailNdata``/``dipoleNdata`` in pixels), so the alert's current
``diaSource`` and the same source read back from the APDB into a later alert's ``prvDiaSources`` are equal.
:func:`dia_source_record` is the same path for a caller holding the measurement
(:data:`lsstpipe.pipelines.diasources.DIA_DTYPE` rows) and the CCD's :class:`SourceContext`.

DiaForcedSource mapping from :data:`lsstpipe.pipelines.ap.FORCED_DTYPE` (:func:`dia_forced_source_record`):
``dia_object_id`` → ``diaObjectId``, ``ra``/``dec``, ``psf_flux(_err)`` → ``psfFlux(Err)``,
``science_flux(_err)`` → ``scienceFlux(Err)``, visit/detector/midpoint/band/processing time from the context.
DiaObject, history and ssSource records arrive already in Rubin's names (the APDB's columns are Rubin's).
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import fastavro
import numpy as np
from fastavro.validation import ValidationError

__all__ = ["AlertSchemaError", "HISTORY_DAYS", "SourceContext", "alert_dia_source", "complete_record",
           "deserialize_alert", "dia_forced_source_record", "dia_source_record", "load_schema", "make_alert",
           "record_fields", "schema_id", "select_history", "serialize_alert", "ss_source_record", "validate_alert",
           "wire_header"]  # fmt: skip

#: "12 months" of history, in days: the APDB's month is 365/12 days (lsst.dax.apdb's convention).
HISTORY_DAYS = 365.0

_WIRE = struct.Struct(">bI")


class AlertSchemaError(ValueError):
    """An alert or one of its records does not fit the schema (the message names the field)."""


# --------------------------------------------------------------------------------------------- schema
def load_schema(version: str | None = None):
    """The ``lsst.alert.packet.Schema`` of ``version`` ("11.1"; None: the latest the package ships), cached."""
    from lsst.alert.packet import get_latest_schema_version

    if version is None:
        major, minor = get_latest_schema_version()
    else:
        try:
            major, minor = (int(v) for v in str(version).split("."))
        except ValueError:
            raise ValueError(f"schema version must look like '11.1', got {version!r}") from None
    return _load_schema(major, minor)


@functools.lru_cache(maxsize=8)
def _load_schema(major: int, minor: int):
    from lsst.alert.packet import Schema, get_latest_schema_version, get_schema_path

    path = f"{get_schema_path(major, minor)}/lsst.v{major}_{minor}.alert.avsc"
    if os.path.isfile(path):
        return Schema.from_file(path)
    latest = ".".join(map(str, get_latest_schema_version()))
    raise ValueError(f"lsst-alert-packet has no schema {major}.{minor} ({path}); the latest it ships is {latest}")


def schema_id(schema) -> int:
    """The schema's registry id (e.g. 1101 for v11.1)."""
    return int(schema.get_schema_id())


def _record_name(schema, name: str) -> str:
    return f"{schema.definition['name'].rsplit('.', 1)[0]}.{name}"


_FIELD_CACHE: dict[tuple[str, str], dict[str, tuple[Any, bool]]] = {}


def record_fields(schema, record: str) -> dict[str, tuple[Any, bool]]:
    """``{field: (avro type, required)}`` of the schema's record ``record`` ("diaSource", "diaObject", ...)."""
    key = (schema.definition["name"], record)
    if key not in _FIELD_CACHE:
        named = schema.definition.get("__named_schemas") or {}
        full = _record_name(schema, record)
        if full not in named:
            known = sorted(n.rsplit(".", 1)[-1] for n in named)
            raise AlertSchemaError(f"the alert schema has no record {record!r}; it has {known}")
        _FIELD_CACHE[key] = {f["name"]: (f["type"], "default" not in f) for f in named[full]["fields"]}
    return _FIELD_CACHE[key]


def _nullable(avro_type) -> bool:
    return isinstance(avro_type, list) and "null" in avro_type


def _base(avro_type):
    if isinstance(avro_type, list):
        rest = [t for t in avro_type if t != "null"]
        return rest[0] if len(rest) == 1 else rest
    return avro_type


def _convert(value, avro_type, field: str, record: str):
    """A python value of ``avro_type`` from numpy scalars etc.; NaN → None where nullable."""
    try:
        return _convert_value(value, avro_type, field, record)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, AlertSchemaError):
            raise
        raise AlertSchemaError(f"{record}.{field} must be {avro_type}, got {value!r} ({exc})") from None


def _convert_value(value, avro_type, field: str, record: str):
    if value is None:
        return None
    base = _base(avro_type)
    if isinstance(base, dict):
        base = base.get("type")
    if base in ("float", "double"):
        v = float(value)
        if math.isnan(v):
            if _nullable(avro_type):
                return None
            raise AlertSchemaError(f"{record}.{field} is NaN but the schema requires a value")
        return float(np.float32(v)) if base == "float" else v  # what a reader gets back
    if base in ("int", "long"):
        if isinstance(value, (float, np.floating)) and not float(value).is_integer():
            raise AlertSchemaError(f"{record}.{field} must be an integer, got {value!r}")
        return int(value)
    if base == "boolean":
        return bool(value)
    if base == "string":
        return str(value)
    if base == "bytes":
        return bytes(value)
    return value


def complete_record(schema, record: str, values: Mapping[str, Any] | np.void) -> dict:
    """``values`` as a schema-conformant dict of record ``record`` (see the module docstring).

    Raises
    ------
    AlertSchemaError
        For a field the schema does not know, a missing required field, or a NaN in a required one.
    """
    if isinstance(values, np.void):
        values = {n: values[n] for n in values.dtype.names or ()}
    fields = record_fields(schema, record)
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise AlertSchemaError(f"{record} has field(s) {unknown} that schema {schema.definition['name']} does "
                               f"not define; rename them to the schema's names (see lsstpipe.alerts.packet)")  # fmt: skip
    out: dict[str, Any] = {}
    for name, (avro_type, required) in fields.items():
        if name not in values or values[name] is None:
            if required:
                raise AlertSchemaError(f"{record} is missing required field {name!r} ({avro_type})")
            out[name] = None
            continue
        out[name] = _convert(values[name], avro_type, name, record)
    return out


# --------------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class SourceContext:
    """Facts of the visit and CCD that every DiaSource record of it carries.

    Attributes
    ----------
    visit, detector : int
        Visit id and detector number.
    midpoint_mjd_tai : float
        Exposure midpoint (MJD, TAI).
    time_processed_mjd_tai : float
        When the records were produced (MJD, TAI).
    band : str
        Filter band (``u``, ``g``, ``r``, ``i``, ``z``, ``y``).
    pixel_scale_arcsec : float
        The CCD's pixel scale (arcsec per pixel; from the camera or the calexp's WCS), to turn moments and
        trail lengths into arcseconds.
    psf_stamp_size : int
        Side of the PSF stamp of the PSF flux fit (odd; ``psfNdata`` = its square).
    exposure_time : float, optional
        Seconds.
    wcs : astropy.wcs.WCS, optional
        The calexp's WCS; without it ``trailAngle`` is null.
    """

    visit: int
    detector: int
    midpoint_mjd_tai: float
    time_processed_mjd_tai: float
    band: str
    pixel_scale_arcsec: float
    psf_stamp_size: int
    exposure_time: float | None = None
    wcs: Any = None

    def __post_init__(self) -> None:
        if self.band not in ("u", "g", "r", "i", "z", "y"):
            raise ValueError(f"band must be one of ugrizy, got {self.band!r}")
        for name in ("midpoint_mjd_tai", "time_processed_mjd_tai"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite MJD, got {getattr(self, name)}")
        if not (np.isfinite(self.pixel_scale_arcsec) and self.pixel_scale_arcsec > 0):
            raise ValueError(f"pixel_scale_arcsec must be finite and > 0, got {self.pixel_scale_arcsec}")
        if not (self.psf_stamp_size > 0 and self.psf_stamp_size % 2 == 1):
            raise ValueError(f"psf_stamp_size must be a positive odd number of pixels, got {self.psf_stamp_size}")


_ID_FIELDS = ("diaObjectId", "ssObjectId")


def alert_dia_source(schema, row: Mapping[str, Any] | np.void) -> dict:
    """The alert's ``diaSource`` record of one APDB DiaSource row.

    Parameters
    ----------
    schema : lsst.alert.packet.Schema
        :func:`load_schema`.
    row : numpy.void or mapping
        A :data:`lsstpipe.pipelines.association.DIA_SOURCE_ROW` row (what the APDB stores), or a DiaSource
        read back from the APDB as a mapping of Rubin's columns.

    Returns
    -------
    dict
        The row's values as the schema's types (see the module docstring); ``0``, NaN or None in
        ``diaObjectId``/``ssObjectId`` become null.

    Raises
    ------
    AlertSchemaError
        A column the alert schema lacks, a missing required one, or NaN in a required one (``ra``, ``dec``).
    """
    values = {n: row[n] for n in row.dtype.names or ()} if isinstance(row, np.void) else dict(row)
    for name in _ID_FIELDS:
        v = values.get(name)
        if v is not None and (v == 0 or (isinstance(v, (float, np.floating)) and math.isnan(v))):
            values[name] = None
    return complete_record(schema, "diaSource", values)


def dia_source_record(row: np.void, context: SourceContext, schema, *, dia_source_id: int | None = None,
                      dia_object_id: int | None = None, ss_object_id: int | None = None) -> dict:  # fmt: skip
    """The alert's ``diaSource`` of one :data:`~lsstpipe.pipelines.diasources.DIA_DTYPE` row: its APDB row
    (:func:`lsstpipe.pipelines.association.dia_source_rows` with the ``context``'s CCD facts, id
    ``dia_source_id`` or the row's ``id``, and the association's ids) through :func:`alert_dia_source`."""
    from lsstpipe.pipelines.association import dia_source_rows  # the one DiaSource mapping (a pipeline stage)

    if not (np.isfinite(row["ra"]) and np.isfinite(row["dec"])):
        raise AlertSchemaError(f"DIASource {row['id']} has no sky position (ra={row['ra']}, dec={row['dec']}); "
                               "alerts need the calexp's WCS")  # fmt: skip
    c = context
    sid = int(row["id"]) if dia_source_id is None else int(dia_source_id)
    rows = dia_source_rows(np.array([row], row.dtype), c.visit, c.detector, c.band, c.midpoint_mjd_tai,
                           c.time_processed_mjd_tai, c.pixel_scale_arcsec, psf_stamp_size=c.psf_stamp_size,
                           exposure_time=c.exposure_time, wcs=c.wcs, ids=[sid])  # fmt: skip
    rows["diaObjectId"] = dia_object_id or 0
    rows["ssObjectId"] = ss_object_id or 0
    return alert_dia_source(schema, rows[0])


def dia_forced_source_record(row: np.void, context: SourceContext, schema, dia_forced_source_id: int) -> dict:
    """Rubin's ``diaForcedSource`` record of one :data:`lsstpipe.pipelines.ap.FORCED_DTYPE` row."""
    values = {
        "diaForcedSourceId": dia_forced_source_id, "diaObjectId": row["dia_object_id"],
        "ra": row["ra"], "dec": row["dec"], "visit": context.visit, "detector": context.detector,
        "psfFlux": row["psf_flux"], "psfFluxErr": row["psf_flux_err"],
        "scienceFlux": row["science_flux"], "scienceFluxErr": row["science_flux_err"],
        "midpointMjdTai": context.midpoint_mjd_tai, "band": context.band,
        "timeProcessedMjdTai": context.time_processed_mjd_tai,
    }  # fmt: skip
    return complete_record(schema, "diaForcedSource", values)


def ss_source_record(schema, dia_source_id: int, ss_object_id: int, ra: float, dec: float, **extra) -> dict:
    """Rubin's ``ssSource`` record of a Solar System match: ecliptic and galactic coordinates are computed from
    the observed (ra, dec) with astropy; ``extra`` fields (``designation``, ``ephRa``, ...) use Rubin's names."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    c = SkyCoord(ra * u.deg, dec * u.deg, frame="icrs")
    ecl, gal = c.geocentrictrueecliptic, c.galactic
    values = {"diaSourceId": dia_source_id, "ssObjectId": ss_object_id, "eclLambda": ecl.lon.deg,
              "eclBeta": ecl.lat.deg, "galLon": gal.l.deg, "galLat": gal.b.deg, **extra}  # fmt: skip
    return complete_record(schema, "ssSource", values)


def select_history(records: Iterable[Mapping[str, Any]], midpoint_mjd_tai: float, exclude_id: int | None = None,
                   id_field: str = "diaSourceId", days: float = HISTORY_DAYS) -> list[dict]:  # fmt: skip
    """Records observed in the ``days`` before ``midpoint_mjd_tai`` (not after it), oldest first, without
    the record ``exclude_id`` (the triggering DiaSource)."""
    out = []
    for r in records:
        if isinstance(r, np.void):
            r = {n: r[n] for n in r.dtype.names or ()}
        if "midpointMjdTai" not in r:
            raise AlertSchemaError(f"history record {r.get(id_field)} is missing required field 'midpointMjdTai'")
        t = float(r["midpointMjdTai"])
        if exclude_id is not None and r.get(id_field) == exclude_id:
            continue
        if midpoint_mjd_tai - days <= t <= midpoint_mjd_tai:
            out.append(dict(r))
    out.sort(key=lambda r: float(r["midpointMjdTai"]))
    return out


def make_alert(schema, dia_source: Mapping[str, Any], *, dia_object: Mapping[str, Any] | None = None,
               prv_dia_sources: Iterable[Mapping[str, Any]] = (),
               prv_dia_forced_sources: Iterable[Mapping[str, Any]] = (),
               ss_source: Mapping[str, Any] | None = None, mpc_orbits: Mapping[str, Any] | None = None,
               cutouts=None, observation_reason: str | None = None, target_name: str | None = None,
               history_days: float = HISTORY_DAYS, validate: bool = True) -> dict:  # fmt: skip
    """One alert (a dict that validates against ``schema``) for one DiaSource.

    Parameters
    ----------
    schema : lsst.alert.packet.Schema
        :func:`load_schema`.
    dia_source : mapping
        The triggering DiaSource in Rubin's names (:func:`dia_source_record`).
    dia_object : mapping, optional
        Its DiaObject (Rubin's names; required fields include the per-band ``*_psfFluxNdata`` and
        ``nDiaSources``).
    prv_dia_sources, prv_dia_forced_sources : iterable of mapping
        The object's history; only the :data:`HISTORY_DAYS` before this DiaSource's midpoint are kept
        (:func:`select_history`), oldest first. Empty histories are sent as empty arrays.
    ss_source, mpc_orbits : mapping, optional
        The Solar System match (:func:`ss_source_record`) and the object's orbit row.
    cutouts : lsstpipe.alerts.cutouts.Cutouts, optional
        Science, template and difference FITS bytes.
    validate : bool
        Check the assembled alert with ``fastavro.validation.validate`` (raises :class:`AlertSchemaError`).
    """
    src = complete_record(schema, "diaSource", dia_source)
    t = src["midpointMjdTai"]
    prv = [complete_record(schema, "diaSource", r)
           for r in select_history(prv_dia_sources, t, src["diaSourceId"], days=history_days)]  # fmt: skip
    forced = [complete_record(schema, "diaForcedSource", r)
              for r in select_history(prv_dia_forced_sources, t, None, "diaForcedSourceId", history_days)]  # fmt: skip
    obj = complete_record(schema, "diaObject", dia_object) if dia_object is not None else None
    if obj is not None and src["diaObjectId"] is not None and obj["diaObjectId"] != src["diaObjectId"]:
        raise AlertSchemaError(f"diaSource {src['diaSourceId']} belongs to diaObject {src['diaObjectId']} but "
                               f"diaObject {obj['diaObjectId']} was given")  # fmt: skip
    alert = {
        "diaSourceId": src["diaSourceId"], "observation_reason": observation_reason, "target_name": target_name,
        "diaSource": src, "prvDiaSources": prv, "prvDiaForcedSources": forced, "diaObject": obj,
        "ssSource": complete_record(schema, "ssSource", ss_source) if ss_source is not None else None,
        "mpc_orbits": complete_record(schema, "mpc_orbits", mpc_orbits) if mpc_orbits is not None else None,
        "cutoutDifference": cutouts.difference if cutouts is not None else None,
        "cutoutScience": cutouts.science if cutouts is not None else None,
        "cutoutTemplate": cutouts.template if cutouts is not None else None,
    }  # fmt: skip
    if validate:
        validate_alert(schema, alert)
    return alert


def validate_alert(schema, alert: Mapping[str, Any]) -> None:
    """Raise :class:`AlertSchemaError` (with fastavro's field paths) unless ``alert`` fits ``schema``."""
    if fastavro.validation.validate(alert, schema.definition, raise_errors=False):
        return  # fast path: collecting fastavro's error details costs ~15 ms per alert
    try:
        fastavro.validation.validate(alert, schema.definition, raise_errors=True)
    except ValidationError as exc:
        raise AlertSchemaError(f"alert {alert.get('diaSourceId')} does not fit {schema.definition['name']}: "
                               f"{exc}") from exc  # fmt: skip


# --------------------------------------------------------------------------------------------- wire format
def wire_header(schema_id_: int) -> bytes:
    """Confluent wire-format prefix: magic byte 0 and the 4-byte big-endian schema id."""
    if not 0 <= schema_id_ < 2**32:
        raise ValueError(f"schema id must fit 4 unsigned bytes, got {schema_id_}")
    return _WIRE.pack(0, schema_id_)


def serialize_alert(schema, alert: Mapping[str, Any], schema_id_: int | None = None) -> bytes:
    """The Kafka message of one alert: :func:`wire_header` + schemaless Avro (id: :func:`schema_id`)."""
    buf = io.BytesIO()
    buf.write(wire_header(schema_id(schema) if schema_id_ is None else schema_id_))
    fastavro.schemaless_writer(buf, schema.definition, alert)
    return buf.getvalue()


def deserialize_alert(schema, message: bytes) -> tuple[int, dict]:
    """``(schema id, alert)`` of a Kafka message written by :func:`serialize_alert`."""
    if len(message) < 5 or message[0] != 0:
        raise ValueError("not a Confluent wire-format message: it must start with magic byte 0 and a 4-byte "
                         "schema id")  # fmt: skip
    _, sid = _WIRE.unpack(message[:5])
    alert = fastavro.schemaless_reader(io.BytesIO(message[5:]), schema.definition)
    if not isinstance(alert, dict):
        raise ValueError(f"the message does not hold an alert record but {type(alert).__name__}")
    return sid, alert
