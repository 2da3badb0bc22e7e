"""The Engineering and Facilities Database (EFD): every OCS command, event and telemetry sample, time-stamped.

The Summit EFD is written by the observatory (here: the Base DMCS records what crosses the OCS link) and is
read through its replicas at the Chilean DAC and the US DAC (:mod:`lsstpipe.db.efd_replication` keeps them
in step and routes reads). This module holds what every copy shares: the schema, the rows, the Summit's
writer (:class:`SummitEFD`) and the read queries (:class:`EFDReader`).

Tables (schema version 1; times are POSIX seconds, UTC)
------------------------------------------------------
``efd_log``    lsn, t, kind, body — the append-only log: one row per record, ``lsn`` (log sequence number)
               increasing in commit order on the Summit; ``kind`` is ``command``, ``event`` or
               ``telemetry`` and ``body`` the record's fields as JSON. It is what the embedded replicas
               ship, and what replication lag is counted in.
``commands``   lsn, t, sender, seq, entity, command, arg — every OCS command the DMCS accepted.
``events``     lsn, t, topic, name, payload — every event (``payload`` is a JSON object).
``telemetry``  lsn, t, topic, name, value — every telemetry sample.

All four are append-only (a trigger refuses UPDATE and DELETE). A record is written to ``efd_log`` and to
its table in one transaction, with the same ``lsn``, so a copy that applies the log up to some lsn holds
exactly the records up to it. On SQLite every write transaction holds the database's write lock, so lsn
order is commit order; on PostgreSQL the replicas are physical standbys and never read the log for
shipping (concurrent writers there may commit lsns out of order, which streaming replication does not mind).
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsstpipe.db.sql import Database, Migration, Store, Transaction

_LOG = "lsn {id}, t DOUBLE PRECISION NOT NULL"
_ROW = "lsn BIGINT PRIMARY KEY, t DOUBLE PRECISION NOT NULL"
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "EFD: the append-only log and its commands, events and telemetry",
        (
            f"CREATE TABLE efd_log ({_LOG}, kind TEXT NOT NULL CHECK (kind IN ('command', 'event', 'telemetry')), "
            "body TEXT NOT NULL)",
            f"CREATE TABLE commands ({_ROW}, sender TEXT NOT NULL, seq BIGINT NOT NULL, entity TEXT NOT NULL, "
            "command TEXT NOT NULL, arg TEXT)",
            f"CREATE TABLE events ({_ROW}, topic TEXT NOT NULL, name TEXT NOT NULL, payload TEXT NOT NULL)",
            "CREATE INDEX events_topic ON events (topic, name, lsn)",
            f"CREATE TABLE telemetry ({_ROW}, topic TEXT NOT NULL, name TEXT NOT NULL, value DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX telemetry_topic ON telemetry (topic, name, lsn)",
        ),
        append_only=("efd_log", "commands", "events", "telemetry"),
    ),
)

#: The record tables, with their columns after ``lsn, t``, in the order the JSON body lists them.
COLUMNS: dict[str, tuple[str, ...]] = {
    "command": ("sender", "seq", "entity", "command", "arg"),
    "event": ("topic", "name", "payload"),
    "telemetry": ("topic", "name", "value"),
}
_TABLE = {"command": "commands", "event": "events", "telemetry": "telemetry"}
TABLES = frozenset({"efd_log", *_TABLE.values()})


class Site(enum.Enum):
    """Where a copy of the EFD lives, in replication order (each copy follows the one before it)."""

    SUMMIT = "summit"
    """The Summit EFD: the one copy that is written."""

    CHILE = "chile_dac"
    """The Chilean DAC replica: follows the Summit at all times."""

    US = "us_dac"
    """The US DAC replica: follows the Chilean replica while the EFD Replicator is enabled."""


#: The replication chain, nearest the US user first (reads fall back along it).
CHAIN: tuple[Site, ...] = (Site.US, Site.CHILE, Site.SUMMIT)

#: The copy each replica follows.
UPSTREAM: dict[Site, Site] = {Site.CHILE: Site.SUMMIT, Site.US: Site.CHILE}


@dataclass(frozen=True)
class EFDCommand:
    """An OCS command as recorded at the Summit."""

    lsn: int
    t: float
    sender: str
    seq: int
    entity: str
    command: str
    arg: str | None


@dataclass(frozen=True)
class EFDEvent:
    """An event: ``topic`` (e.g. ``summary_state``), ``name`` (e.g. the entity) and a JSON payload."""

    lsn: int
    t: float
    topic: str
    name: str
    payload: str

    @property
    def data(self) -> Any:
        """The payload, decoded."""
        return json.loads(self.payload)


@dataclass(frozen=True)
class TelemetrySample:
    """One telemetry sample: ``value`` of ``name`` on ``topic`` at ``t``."""

    lsn: int
    t: float
    topic: str
    name: str
    value: float


@dataclass(frozen=True)
class LogEntry:
    """One row of ``efd_log``: what replication ships."""

    lsn: int
    t: float
    kind: str
    body: str


@dataclass(frozen=True)
class ReplicationLag:
    """How far one replica is behind the Summit.

    ``rows_behind`` counts the Summit's log records the replica lacks; ``seconds_behind`` is how long the
    oldest of them has waited (0 when none); ``bytes_behind`` is WAL bytes not yet replayed on PostgreSQL
    and log-record bytes not yet applied on the embedded (SQLite) EFD. ``following`` is False while the
    replica is deliberately not following (the US replica with the EFD Replicator disabled).
    """

    site: Site
    upstream: Site
    following: bool
    applied_lsn: int
    summit_lsn: int
    rows_behind: int
    seconds_behind: float
    bytes_behind: int

    def telemetry(self) -> dict[str, float]:
        """The lag as telemetry samples, named ``<site>.<quantity>``."""
        s = self.site.value
        return {f"{s}.seconds_behind": float(self.seconds_behind), f"{s}.rows_behind": float(self.rows_behind),
                f"{s}.bytes_behind": float(self.bytes_behind), f"{s}.following": float(self.following)}  # fmt: skip


def _where(clauses: Sequence[tuple[str, Any]]) -> tuple[str, list[Any]]:
    used = [(c, v) for c, v in clauses if v is not None]
    return (f"WHERE {' AND '.join(c for c, _ in used)}" if used else ""), [v for _, v in used]


class EFDReader:
    """The read queries of one copy of the EFD (any site, either backend; nothing here writes).

    Every method raises :class:`~lsstpipe.db.sql.DatabaseError` when the copy cannot answer.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    def _rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.db.read() as tx:
            return tx.execute(statement, params).fetchall()

    def last_lsn(self) -> int:
        """The newest record this copy holds (0: none)."""
        return int(self._rows("SELECT COALESCE(MAX(lsn), 0) FROM efd_log")[0][0])

    def commands(self, *, entity: str | None = None, since_lsn: int = 0) -> list[EFDCommand]:
        where, params = _where([("lsn > ?", since_lsn), ("entity = ?", entity)])
        rows = self._rows(
            f"SELECT lsn, t, sender, seq, entity, command, arg FROM commands {where} ORDER BY lsn", params
        )
        return [EFDCommand(*r) for r in rows]

    def events(self, topic: str | None = None, name: str | None = None, *, since_lsn: int = 0) -> list[EFDEvent]:
        where, params = _where([("lsn > ?", since_lsn), ("topic = ?", topic), ("name = ?", name)])
        rows = self._rows(f"SELECT lsn, t, topic, name, payload FROM events {where} ORDER BY lsn", params)
        return [EFDEvent(*r) for r in rows]

    def telemetry(
        self, topic: str | None = None, name: str | None = None, *, since_lsn: int = 0
    ) -> list[TelemetrySample]:
        where, params = _where([("lsn > ?", since_lsn), ("topic = ?", topic), ("name = ?", name)])
        rows = self._rows(f"SELECT lsn, t, topic, name, value FROM telemetry {where} ORDER BY lsn", params)
        return [TelemetrySample(*r) for r in rows]

    def log(self, since_lsn: int = 0, limit: int | None = None) -> list[LogEntry]:
        """Log records after ``since_lsn``, oldest first (at most ``limit``)."""
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        rows = self._rows(f"SELECT lsn, t, kind, body FROM efd_log WHERE lsn > ? ORDER BY lsn{tail}", (since_lsn,))
        return [LogEntry(*r) for r in rows]

    def backlog(self, after_lsn: int) -> tuple[int, int, int, float | None]:
        """Of the records after ``after_lsn``: the newest lsn here, how many, their body bytes, the oldest ``t``."""
        with self.db.read() as tx:
            last = tx.execute("SELECT COALESCE(MAX(lsn), 0) FROM efd_log").fetchone()
            row = tx.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0), MIN(t) FROM efd_log WHERE lsn > ?",
                             (after_lsn,)).fetchone()  # fmt: skip
        assert last is not None and row is not None
        return int(last[0]), int(row[0]), int(row[1]), None if row[2] is None else float(row[2])

    def count(self, table: str) -> int:
        if table not in TABLES:
            raise ValueError(f"unknown EFD table {table!r}; one of {', '.join(sorted(TABLES))}")
        return int(self._rows(f"SELECT COUNT(*) FROM {table}")[0][0])


def insert_record(tx: Transaction, kind: str, lsn: int, t: float, fields: Mapping[str, Any]) -> None:
    """Insert one record into its table (idempotent: a record already there is left as it is)."""
    columns = COLUMNS[kind]
    missing = [c for c in columns if c not in fields]
    if missing:
        raise ValueError(f"an EFD {kind} record needs {', '.join(missing)}")
    names = ", ".join(("lsn", "t", *columns))
    marks = ", ".join("?" * (len(columns) + 2))
    tx.execute(f"INSERT INTO {_TABLE[kind]} ({names}) VALUES ({marks}) ON CONFLICT (lsn) DO NOTHING",
               (lsn, t, *(fields[c] for c in columns)))  # fmt: skip


def apply_entries(tx: Transaction, entries: Sequence[LogEntry]) -> None:
    """Apply shipped log records to a replica: the log row and its record, same lsn (idempotent)."""
    for e in entries:
        tx.execute("INSERT INTO efd_log (lsn, t, kind, body) VALUES (?, ?, ?, ?) ON CONFLICT (lsn) DO NOTHING",
                   (e.lsn, e.t, e.kind, e.body))  # fmt: skip
        insert_record(tx, e.kind, e.lsn, e.t, json.loads(e.body))


class SummitEFD(Store):
    """The Summit EFD: the written copy (schema created or migrated on open).

    Parameters
    ----------
    url
        ``sqlite:///PATH`` (or a bare path) or ``postgresql://…`` (the primary of the replication chain).
    clock
        Time stamp of records written without one (POSIX seconds).

    Raises
    ------
    DatabaseError
        The database cannot be opened, or its schema is newer than this code.
    """

    def __init__(self, url: str | Path, *, busy_timeout: float = 30.0, connect_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        super().__init__(url, MIGRATIONS, busy_timeout=busy_timeout, connect_timeout=connect_timeout, clock=clock)
        self.reader = EFDReader(self.db)

    def _append(self, kind: str, t: float | None, fields: dict[str, Any]) -> int:
        stamp = self.clock() if t is None else float(t)
        body = json.dumps(fields, sort_keys=True, allow_nan=False)
        with self.db.write() as tx:
            row = tx.execute("INSERT INTO efd_log (t, kind, body) VALUES (?, ?, ?) RETURNING lsn",
                             (stamp, kind, body)).fetchone()  # fmt: skip
            assert row is not None
            lsn = int(row[0])
            insert_record(tx, kind, lsn, stamp, fields)
        return lsn

    def record_command(self, sender: str, seq: int, entity: str, command: str, arg: str | None = None,
                       *, t: float | None = None) -> int:  # fmt: skip
        """Record an OCS command; returns its lsn."""
        return self._append("command", t, {"sender": sender, "seq": int(seq), "entity": entity, "command": command,
                                           "arg": arg})  # fmt: skip

    def record_event(self, topic: str, name: str, payload: Mapping[str, Any] | None = None,
                     *, t: float | None = None) -> int:  # fmt: skip
        """Record an event with a JSON-serialisable ``payload``; returns its lsn."""
        try:
            text = json.dumps(dict(payload or {}), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"EFD event {topic}/{name}: the payload must be plain JSON data ({exc})") from None
        return self._append("event", t, {"topic": topic, "name": name, "payload": text})

    def record_telemetry(self, topic: str, name: str, value: float, *, t: float | None = None) -> int:
        """Record one telemetry sample (a finite number); returns its lsn."""
        v = float(value)
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError(f"EFD telemetry {topic}/{name}: value must be finite (got {value!r})")
        return self._append("telemetry", t, {"topic": topic, "name": name, "value": v})
