"""The calibration database: an append-only register of every master calibration and its validity.

Calibration Products Production certifies each master it writes (bias, dark, flat, fringe, crosstalk,
defects, bandpass) for one detector, one filter where the type depends on it, and a validity interval
``[valid_start, valid_end)`` in MJD (``valid_end`` may be open). Instrument signature removal asks
:meth:`CalibrationDatabase.lookup` for *the* calibration valid at a time: of the records whose interval
contains it, the one certified last. A new run therefore supersedes earlier ones by validity alone; no
record is ever modified or deleted (the table's triggers refuse UPDATE and DELETE on both backends).

The same code runs over SQLite (the default) and PostgreSQL through :mod:`lsstpipe.db.sql`. The
calibration database has its own schema history, so it needs its own SQLite file (or PostgreSQL
database/schema): opening a control database as a calibration database is refused.

Table (schema version 1)
------------------------
``calibrations``  id, created (POSIX seconds, UTC), run, calib_type, detector, filter_name,
                  valid_start, valid_end (MJD; NULL = open-ended), path, checksum (sha256, 64 hex),
                  inputs (input exposure ids, JSON list), software_version, parameters (JSON object).
                  ``id`` gives the order of certification.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from lsstpipe.db.sql import DatabaseError, Migration, Store


class CalibrationType(str, Enum):
    """The kinds of master calibration."""

    BIAS = "bias"
    """Overscan-corrected, sigma-clipped combination of zero-second exposures."""
    DARK = "dark"
    """Bias-removed dark current, per second."""
    FLAT = "flat"
    """Normalised pixel response, per filter."""
    FRINGE = "fringe"
    """Fringe pattern of the red filters, per filter."""
    CROSSTALK = "crosstalk"
    """16x16 amplifier-to-amplifier coefficients."""
    DEFECTS = "defects"
    """Bad columns and hot pixels."""
    BANDPASS = "bandpass"
    """Throughput model (pre-DRP mode), per filter."""


#: Types that exist once per filter: ``filter`` is required for these and refused for the others.
FILTER_DEPENDENT = frozenset({CalibrationType.FLAT, CalibrationType.FRINGE, CalibrationType.BANDPASS})

_CHECKSUM = re.compile(r"[0-9a-f]{64}")
_DESCRIPTION = "calibration database: certified master calibrations with validity intervals"

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        _DESCRIPTION,
        (
            "CREATE TABLE calibrations (id {id}, created DOUBLE PRECISION NOT NULL, run TEXT NOT NULL, "
            "calib_type TEXT NOT NULL, detector TEXT NOT NULL, filter_name TEXT, "
            "valid_start DOUBLE PRECISION NOT NULL, valid_end DOUBLE PRECISION, path TEXT NOT NULL, "
            "checksum TEXT NOT NULL, inputs TEXT NOT NULL, software_version TEXT NOT NULL, parameters TEXT NOT NULL, "
            "CHECK (valid_end IS NULL OR valid_start < valid_end), CHECK (length(checksum) = 64))",
            "CREATE INDEX calibrations_lookup ON calibrations (calib_type, detector, filter_name, id)",
        ),
        append_only=("calibrations",),
    ),
)


class CalibrationNotFound(LookupError):
    """No certified calibration is valid for the requested type, detector, filter and time."""


@dataclass(frozen=True)
class CalibrationRecord:
    """One certified master calibration (a row of ``calibrations``)."""

    id: int
    calib_type: CalibrationType
    detector: str
    filter: str | None
    valid_start: float
    valid_end: float | None
    path: str
    checksum: str
    inputs: tuple[int, ...]
    software_version: str
    parameters: Mapping[str, Any]
    created: float
    run: str

    def contains(self, mjd: float) -> bool:
        """Whether ``mjd`` lies in ``[valid_start, valid_end)``."""
        return self.valid_start <= mjd and (self.valid_end is None or mjd < self.valid_end)

    def interval(self) -> str:
        end = "open" if self.valid_end is None else str(self.valid_end)
        return f"[{self.valid_start}, {end})"


_COLUMNS = (
    "id, calib_type, detector, filter_name, valid_start, valid_end, path, checksum, inputs, software_version, "
    "parameters, created, run"
)


def _record(r: tuple[Any, ...]) -> CalibrationRecord:
    return CalibrationRecord(int(r[0]), CalibrationType(r[1]), r[2], r[3], float(r[4]),
                             None if r[5] is None else float(r[5]), r[6], r[7], tuple(json.loads(r[8])), r[9],
                             json.loads(r[10]), float(r[11]), r[12])  # fmt: skip


def _calib_type(value: CalibrationType | str) -> CalibrationType:
    try:
        return CalibrationType(value)
    except ValueError:
        known = ", ".join(t.value for t in CalibrationType)
        raise ValueError(f"unknown calibration type {value!r}; one of {known}") from None


def _filter(calib_type: CalibrationType, filter: str | None) -> str | None:
    if calib_type in FILTER_DEPENDENT and not filter:
        raise ValueError(f"a {calib_type.value} is made per filter: give its filter")
    if calib_type not in FILTER_DEPENDENT and filter is not None:
        raise ValueError(f"a {calib_type.value} does not depend on the filter: pass filter=None (got {filter!r})")
    return filter


def _mjd(name: str, value: float) -> float:
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite MJD (got {value!r})")
    return x


class CalibrationDatabase(Store):
    """The calibration database, on SQLite or PostgreSQL.

    Parameters
    ----------
    url
        ``sqlite:///PATH`` (or a bare path) or ``postgresql://user@host:port/db``; the schema is created or
        migrated on open. Not the control database's URL: each database keeps its own schema history.
    busy_timeout
        Seconds a SQLite writer waits for another process's write before failing.
    connect_timeout
        Seconds to wait for a PostgreSQL server.
    clock
        Returns the certification time recorded with each row (POSIX seconds).

    Raises
    ------
    DatabaseError
        The database cannot be opened, its schema is newer than this code, or it is another kind of
        lsstpipe database.
    """

    def __init__(self, url: str | Path, *, busy_timeout: float = 30.0, connect_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        super().__init__(url, MIGRATIONS, busy_timeout=busy_timeout, connect_timeout=connect_timeout, clock=clock)

    def _check_schema(self) -> None:
        with self.db.read() as tx:
            row = tx.execute("SELECT description FROM schema_version WHERE version = 1").fetchone()
        if row is None or row[0] != _DESCRIPTION:
            raise DatabaseError(f"{self.db.url} is not a calibration database (its schema is {row and row[0]!r}); "
                                "give the calibration database its own file or database")  # fmt: skip

    def certify(self, calib_type: CalibrationType | str, detector: str, filter: str | None, valid_start: float,
                valid_end: float | None, *, path: str | Path, checksum: str, inputs: Iterable[int],
                software_version: str, parameters: Mapping[str, Any], run: str) -> CalibrationRecord:  # fmt: skip
        """Append one master calibration, valid over ``[valid_start, valid_end)`` (MJD; ``None``: open-ended).

        Parameters
        ----------
        calib_type
            One of :class:`CalibrationType` (or its value, e.g. ``"flat"``).
        detector
            The detector's name, e.g. ``"R22_S11"``.
        filter
            The filter for :data:`FILTER_DEPENDENT` types; ``None`` for the others.
        path, checksum
            Where the master lies and its sha256 (64 hex digits).
        inputs, software_version, parameters, run
            Provenance: the input exposure ids, the software that made it, its parameters (JSON-serialisable)
            and the run/collection label.

        Returns
        -------
        CalibrationRecord
            The record as stored; it supersedes earlier records wherever its interval overlaps theirs.

        Raises
        ------
        ValueError
            A bad argument (the message says which and why); nothing was written.
        DatabaseError
            The database refused or failed the write.
        """
        kind = _calib_type(calib_type)
        flt = _filter(kind, filter)
        if not detector:
            raise ValueError("give the detector's name")
        start = _mjd("valid_start", valid_start)
        end = None if valid_end is None else _mjd("valid_end", valid_end)
        if end is not None and not start < end:
            raise ValueError(f"valid_start must be before valid_end (got [{start}, {end}))")
        digest = str(checksum).lower()
        if not _CHECKSUM.fullmatch(digest):
            raise ValueError(f"checksum must be a sha256: 64 hexadecimal digits (got {checksum!r})")
        if not run or not software_version:
            raise ValueError("give the run label and the software version (provenance is required)")
        exposures = [int(i) for i in inputs]
        try:
            params = json.dumps(dict(parameters), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"parameters must be JSON-serialisable: {exc}") from None
        with self.db.write() as tx:
            row = tx.execute(f"INSERT INTO calibrations (created, run, calib_type, detector, filter_name, valid_start, "
                             "valid_end, path, checksum, inputs, software_version, parameters) "
                             f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {_COLUMNS}",
                             (self.clock(), run, kind.value, detector, flt, start, end, str(path), digest,
                              json.dumps(exposures), software_version, params)).fetchone()  # fmt: skip
        assert row is not None
        return _record(row)

    def history(self, calib_type: CalibrationType | str, detector: str, filter: str | None = None
                ) -> list[CalibrationRecord]:  # fmt: skip
        """Every record of ``calib_type`` for ``detector`` (of one filter, or all), in certification order."""
        kind = _calib_type(calib_type)
        where, params = "calib_type = ? AND detector = ?", [kind.value, detector]
        if filter is not None:
            where, params = f"{where} AND filter_name = ?", [*params, filter]
        with self.db.read() as tx:
            rows = tx.execute(f"SELECT {_COLUMNS} FROM calibrations WHERE {where} ORDER BY id", params).fetchall()
        return [_record(r) for r in rows]

    def lookup(self, calib_type: CalibrationType | str, detector: str, filter: str | None,
               mjd: float) -> CalibrationRecord:  # fmt: skip
        """The calibration valid at ``mjd``: the last certified record whose interval contains it.

        Raises
        ------
        ValueError
            An unknown type, or a filter given/missing where the type does not/does need one.
        CalibrationNotFound
            None is valid then; the message lists what exists for this detector and type.
        """
        kind = _calib_type(calib_type)
        flt = _filter(kind, filter)
        t = _mjd("mjd", mjd)
        where, params = "calib_type = ? AND detector = ?", [kind.value, detector]
        where, params = (f"{where} AND filter_name IS NULL", params) if flt is None else (
            f"{where} AND filter_name = ?", [*params, flt])  # fmt: skip
        with self.db.read() as tx:
            row = tx.execute(f"SELECT {_COLUMNS} FROM calibrations WHERE {where} AND valid_start <= ? "
                             "AND (valid_end IS NULL OR ? < valid_end) ORDER BY id DESC LIMIT 1",
                             [*params, t, t]).fetchone()  # fmt: skip
        if row is not None:
            return _record(row)
        raise CalibrationNotFound(self._not_found(kind, detector, flt, t))

    def _not_found(self, kind: CalibrationType, detector: str, flt: str | None, t: float) -> str:
        what = f"no {kind.value} for detector {detector!r}{f' filter {flt!r}' if flt else ''} valid at MJD {t}"
        existing = self.history(kind, detector)
        if not existing:
            return f"{what}: none is certified for this detector; run calibration products production for it"
        shown = [f"{r.interval()}{f' filter {r.filter!r}' if r.filter else ''} run {r.run!r}" for r in existing[-10:]]
        more = f" (the last 10 of {len(existing)})" if len(existing) > 10 else ""
        return f"{what}; certified{more}: " + "; ".join(shown)
