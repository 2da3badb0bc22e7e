"""Databases of the data-management system: the Alert Production control database and the calibration
database (SQLite or PostgreSQL).

Modules: :mod:`~lsstpipe.db.sql` (one SQL code path over both backends, URLs, migrations),
:mod:`~lsstpipe.db.records` (the rows, as frozen dataclasses) and :mod:`~lsstpipe.db.control` (the
control database the Base DMCS records into), :mod:`~lsstpipe.db.calib` (the append-only
calibration database with validity lookups), :mod:`~lsstpipe.db.efd` (the Engineering and Facilities
Database: schema, Summit writer, reads) and :mod:`~lsstpipe.db.efd_replication` (its replication chain
Summit → Chilean DAC → US DAC on SQLite log shipping or PostgreSQL streaming replication). This package sits below the control plane: it imports
nothing from it.
"""

from lsstpipe.db.calib import CalibrationDatabase, CalibrationNotFound, CalibrationRecord, CalibrationType
from lsstpipe.db.control import CONTROL_DB_ENV, MIGRATIONS, ControlDatabase, resolve_control_db_url
from lsstpipe.db.efd import EFDCommand, EFDEvent, EFDReader, ReplicationLag, Site, SummitEFD, TelemetrySample
from lsstpipe.db.efd_replication import (
    EFD_ENV,
    EFDChain,
    EmbeddedEFDChain,
    PostgresEFDChain,
    ReadResult,
    open_efd,
    resolve_efd,
    ship_log,
)
from lsstpipe.db.records import (
    CommandRecord,
    EntityStatusRecord,
    HistoryEntry,
    ImageTransfer,
    InstalledConfiguration,
    JobRecord,
    JobSubmission,
    Rejection,
    ResultRecord,
    SoftwareVersion,
    StateChange,
)
from lsstpipe.db.sql import Database, DatabaseError, Migration, parse_url, redact

__all__ = [
    "CalibrationDatabase", "CalibrationNotFound", "CalibrationRecord", "CalibrationType", "CONTROL_DB_ENV", "CommandRecord", "ControlDatabase", "Database", "DatabaseError", "EFD_ENV", "EFDChain",
    "EFDCommand", "EFDEvent", "EFDReader", "EmbeddedEFDChain", "EntityStatusRecord", "PostgresEFDChain", "ReadResult",
    "ReplicationLag", "Site", "SummitEFD", "TelemetrySample", "open_efd", "resolve_efd", "ship_log",
    "HistoryEntry", "ImageTransfer", "InstalledConfiguration", "JobRecord", "JobSubmission", "MIGRATIONS",
    "Migration", "Rejection", "ResultRecord", "SoftwareVersion", "StateChange", "parse_url", "redact",
    "resolve_control_db_url",
]  # fmt: skip
