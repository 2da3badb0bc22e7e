"""The Alert Production control database: what the Base DMCS commanded, decided, installed, ran and moved.

:class:`ControlDatabase` implements the control plane's ``ControlRecorder`` protocol over SQLite (the
default; WAL) or PostgreSQL with the same code (:mod:`lsstpipe.db.sql`), and answers the questions
operations ask of it: the history of an entity, its last known configuration, the transfers of an image,
the jobs of a visit. The history outlives the DMCS: a restarted DMCS comes up OFFLINE (its boot records
that as a state change) and finds everything before it still here.

Tables (schema version 1; times are POSIX seconds, UTC; ``id`` columns give the order of insertion)
--------------------------------------------------------------------------------------------------
``schema_version``  version, description — one row per migration applied.
``commands``        id, t, sender, seq, entity, command, arg, authenticated — every well-formed,
                    authenticated command the DMCS accepted (rejected messages go to ``rejections``).
``results``         id, t, sender, seq, entity, command, result, reason, state, configuration, enabled —
                    every ACK and final result sent, with the entity's status after it.
``entities``        entity, state, configuration, enabled, t — the last status of each entity (the one
                    table updated in place; ``state_changes`` holds its history).
``state_changes``   id, t, entity, from_state, to_state, configuration, enabled — every status published.
``software_versions`` version, checksum, t — each (version, checksum) pair verified or registered, first
                    time seen; a version whose checksum changed shows up twice.
``installations``   id, t, entity, configuration, software_version, checksum — every configure that
                    completed; references ``software_versions``.
``rejections``      id, t, code, reason, seq — messages rejected before reaching an entity.
``ocs_events``      id, t, event, visit, exposure, handled_by — OCS events and the entities that took them.
``job_submissions`` id, t, entity, label, visit, exposure, n_jobs — batches sent to the Orchestration Manager.
``jobs``            submission_id, job_index, node, rank, started, ended, result, reason — one row per job
                    that reported. A job started again before it ended (rescheduled after its node died,
                    rerun) moves to its new node, rank and start time; its result is written once and never
                    overwritten, and a start after it is refused.
``image_transfers`` id, t, image_id, raft, kind, source, destination, checksum, nbytes, ok, error — every
                    transfer attempt, good or bad (a failed one must say why).

Append-only: every table but ``entities`` and ``jobs`` refuses UPDATE and DELETE (a trigger), so a result
or a transfer can never be rewritten. Several processes may append at once without losing rows.

The recorder methods (``command_received`` … ``image_transferred``) are called from the DMCS's threads:
a database failure there is logged and counted in :attr:`ControlDatabase.write_failures` instead of
being raised into the command path, so the DMCS keeps serving the OCS.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

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
from lsstpipe.db.sql import DatabaseError, Migration, Store

log = logging.getLogger(__name__)

#: Environment variable naming the control database URL (read by entry points, not here).
CONTROL_DB_ENV = "LSSTPIPE_CONTROL_DB"

_COMMON = "id {id}, t DOUBLE PRECISION NOT NULL"
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "control database: commands, results, states, installations, software, jobs, image transfers",
        (
            f"CREATE TABLE commands ({_COMMON}, sender TEXT NOT NULL, seq BIGINT NOT NULL, entity TEXT NOT NULL, "
            "command TEXT NOT NULL, arg TEXT, authenticated BOOLEAN NOT NULL)",
            "CREATE INDEX commands_entity ON commands (entity, id)",
            f"CREATE TABLE results ({_COMMON}, sender TEXT NOT NULL, seq BIGINT NOT NULL, entity TEXT NOT NULL, "
            "command TEXT NOT NULL, result TEXT NOT NULL, reason TEXT NOT NULL, state TEXT NOT NULL, "
            "configuration TEXT, enabled BOOLEAN NOT NULL)",
            "CREATE INDEX results_seq ON results (sender, seq, id)",
            "CREATE INDEX results_entity ON results (entity, id)",
            "CREATE TABLE entities (entity TEXT PRIMARY KEY, state TEXT, configuration TEXT, enabled BOOLEAN, "
            "t DOUBLE PRECISION)",
            f"CREATE TABLE state_changes ({_COMMON}, entity TEXT NOT NULL REFERENCES entities (entity), "
            "from_state TEXT, to_state TEXT NOT NULL, configuration TEXT, enabled BOOLEAN NOT NULL)",
            "CREATE INDEX state_changes_entity ON state_changes (entity, id)",
            "CREATE TABLE software_versions (version TEXT NOT NULL, checksum TEXT NOT NULL, "
            "t DOUBLE PRECISION NOT NULL, PRIMARY KEY (version, checksum))",
            f"CREATE TABLE installations ({_COMMON}, entity TEXT NOT NULL, configuration TEXT NOT NULL, "
            "software_version TEXT NOT NULL, checksum TEXT NOT NULL, "
            "FOREIGN KEY (software_version, checksum) REFERENCES software_versions (version, checksum))",
            "CREATE INDEX installations_entity ON installations (entity, id)",
            f"CREATE TABLE rejections ({_COMMON}, code TEXT NOT NULL, reason TEXT NOT NULL, seq BIGINT)",
            f"CREATE TABLE ocs_events ({_COMMON}, event TEXT NOT NULL, visit BIGINT NOT NULL, "
            "exposure BIGINT NOT NULL, handled_by TEXT NOT NULL)",
            f"CREATE TABLE job_submissions ({_COMMON}, entity TEXT NOT NULL, label TEXT NOT NULL, visit BIGINT, "
            "exposure BIGINT, n_jobs BIGINT NOT NULL CHECK (n_jobs >= 0))",
            "CREATE INDEX job_submissions_label ON job_submissions (entity, label, id)",
            "CREATE INDEX job_submissions_visit ON job_submissions (visit, id)",
            "CREATE TABLE jobs (submission_id BIGINT NOT NULL REFERENCES job_submissions (id), "
            "job_index BIGINT NOT NULL CHECK (job_index >= 0), node TEXT, rank BIGINT, started DOUBLE PRECISION, "
            "ended DOUBLE PRECISION, result TEXT, reason TEXT, PRIMARY KEY (submission_id, job_index))",
            f"CREATE TABLE image_transfers ({_COMMON}, image_id TEXT NOT NULL, raft TEXT NOT NULL, "
            "kind TEXT NOT NULL, source TEXT NOT NULL, destination TEXT NOT NULL, checksum TEXT, "
            "nbytes BIGINT NOT NULL CHECK (nbytes >= 0), ok BOOLEAN NOT NULL, error TEXT, "
            "CHECK ((ok AND error IS NULL) OR (NOT ok AND error IS NOT NULL)))",
            "CREATE INDEX image_transfers_image ON image_transfers (image_id, id)",
        ),
        append_only=(
            "commands",
            "results",
            "state_changes",
            "software_versions",
            "installations",
            "rejections",
            "ocs_events",
            "job_submissions",
            "image_transfers",
        ),  # fmt: skip
    ),
)

#: Where :meth:`ControlDatabase.jobs_submitted` finds the visit in a DMCS job label, until the DMCS passes it.
_LABEL_VISIT = re.compile(r"\bvisit (\d+) exposure (\d+)\b")


class _CommandLike(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def entity(self) -> Enum: ...
    @property
    def command(self) -> Enum: ...
    @property
    def arg(self) -> str | None: ...
    @property
    def sender(self) -> str: ...


class _ResponseLike(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def entity(self) -> Enum: ...
    @property
    def command(self) -> Enum: ...
    @property
    def sender(self) -> str: ...
    @property
    def result(self) -> Enum: ...
    @property
    def reason(self) -> str: ...
    @property
    def state(self) -> Enum: ...
    @property
    def configuration(self) -> str | None: ...
    @property
    def enabled(self) -> bool: ...


class _EventLike(Protocol):
    @property
    def event(self) -> Enum: ...
    @property
    def visit(self) -> int: ...
    @property
    def exposure(self) -> int: ...


def _name(value: Enum | str) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def _bool(value: Any) -> bool:
    return bool(value)  # SQLite stores BOOLEAN as 0/1, PostgreSQL returns bool


def resolve_control_db_url(explicit: str | None, environ: Mapping[str, str], default_dir: Path) -> str:
    """The control database URL: ``explicit`` > ``$LSSTPIPE_CONTROL_DB`` > ``sqlite:///DEFAULT_DIR/control.sqlite3``."""
    if explicit:
        return explicit
    if environ.get(CONTROL_DB_ENV):
        return str(environ[CONTROL_DB_ENV])
    return f"sqlite:///{Path(default_dir).expanduser() / 'control.sqlite3'}"


class ControlDatabase(Store):
    """The Alert Production control database (a ``ControlRecorder``), on SQLite or PostgreSQL.

    Parameters
    ----------
    url
        ``sqlite:///PATH`` (or a bare path) or ``postgresql://user@host:port/db``; the schema is created
        or migrated on open.
    busy_timeout
        Seconds a SQLite writer waits for another process's write before failing.
    connect_timeout
        Seconds to wait for a PostgreSQL server.
    clock
        Returns the time recorded with each row (POSIX seconds).

    Raises
    ------
    DatabaseError
        The database cannot be opened, or its schema is newer than this code.
    """

    def __init__(self, url: str | Path, *, busy_timeout: float = 30.0, connect_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        super().__init__(url, MIGRATIONS, busy_timeout=busy_timeout, connect_timeout=connect_timeout, clock=clock)
        self.write_failures = 0
        self._failures_lock = threading.Lock()

    @contextmanager
    def _recording(self, what: str) -> Iterator[None]:
        try:
            yield
        except DatabaseError as exc:
            with self._failures_lock:
                self.write_failures += 1
                lost = self.write_failures
            log.error("control database: could not record %s (%d lost so far): %s", what, lost, exc)

    # ---- ControlRecorder ----------------------------------------------------------------------------------
    def command_received(self, msg: _CommandLike) -> None:
        with self._recording(f"command {msg.seq}"), self.db.write() as tx:
            tx.execute("INSERT INTO commands (t, sender, seq, entity, command, arg, authenticated) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (self.clock(), msg.sender, msg.seq, _name(msg.entity),
                                                        _name(msg.command), msg.arg, True))  # fmt: skip

    def response_sent(self, resp: _ResponseLike) -> None:
        with self._recording(f"result of {resp.seq}"), self.db.write() as tx:
            tx.execute("INSERT INTO results (t, sender, seq, entity, command, result, reason, state, configuration, "
                       "enabled) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (self.clock(), resp.sender, resp.seq, _name(resp.entity), _name(resp.command),
                        _name(resp.result), resp.reason, _name(resp.state), resp.configuration,
                        bool(resp.enabled)))  # fmt: skip

    def state_changed(self, entity: Enum | str, state: Enum | str, configuration: str | None, enabled: bool) -> None:
        name, to_state, now = _name(entity), _name(state), self.clock()
        with self._recording(f"state of {name}"), self.db.write() as tx:
            tx.execute("INSERT INTO entities (entity) VALUES (?) ON CONFLICT (entity) DO NOTHING", (name,))
            row = tx.execute("SELECT state FROM entities WHERE entity = ?" + tx.dialect.for_update, (name,)).fetchone()
            from_state = row[0] if row else None
            tx.execute("UPDATE entities SET state = ?, configuration = ?, enabled = ?, t = ? WHERE entity = ?",
                       (to_state, configuration, bool(enabled), now, name))  # fmt: skip
            tx.execute("INSERT INTO state_changes (t, entity, from_state, to_state, configuration, enabled) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (now, name, from_state, to_state, configuration, bool(enabled)))  # fmt: skip

    def configuration_installed(self, entity: Enum | str, configuration: str, software_version: str,
                                checksum: str) -> None:  # fmt: skip
        now = self.clock()
        with self._recording(f"installation of {configuration}"), self.db.write() as tx:
            self._software(tx, software_version, checksum, now)
            tx.execute("INSERT INTO installations (t, entity, configuration, software_version, checksum) "
                       "VALUES (?, ?, ?, ?, ?)", (now, _name(entity), configuration, software_version, checksum))  # fmt: skip

    def message_rejected(self, code: str, reason: str, seq: int | None) -> None:
        with self._recording(f"rejection {code}"), self.db.write() as tx:
            tx.execute("INSERT INTO rejections (t, code, reason, seq) VALUES (?, ?, ?, ?)",
                       (self.clock(), code, reason, seq))  # fmt: skip

    def event_received(self, event: _EventLike, handled_by: Sequence[Enum | str]) -> None:
        with self._recording(f"event {_name(event.event)}"), self.db.write() as tx:
            tx.execute("INSERT INTO ocs_events (t, event, visit, exposure, handled_by) VALUES (?, ?, ?, ?, ?)",
                       (self.clock(), _name(event.event), event.visit, event.exposure,
                        " ".join(_name(e) for e in handled_by)))  # fmt: skip

    def jobs_submitted(self, entity: Enum | str, label: str, n_jobs: int, *, visit: int | None = None,
                       exposure: int | None = None) -> None:  # fmt: skip
        """A batch of jobs was submitted; ``visit``/``exposure`` default to those named in ``label``."""
        if visit is None and (m := _LABEL_VISIT.search(label)):
            visit, exposure = int(m.group(1)), int(m.group(2))
        with self._recording(f"jobs {label}"), self.db.write() as tx:
            tx.execute("INSERT INTO job_submissions (t, entity, label, visit, exposure, n_jobs) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (self.clock(), _name(entity), label, visit, exposure, n_jobs))  # fmt: skip

    def job_started(self, entity: Enum | str, label: str, index: int, node: str, rank: int) -> None:
        """Job ``index`` of the latest batch ``label`` of ``entity`` started on ``node``, MPI rank ``rank``
        (again, elsewhere, if it had started and not ended; refused once it ended)."""
        with self._recording(f"start of job {index} of {label}"), self.db.write() as tx:
            tx.execute("INSERT INTO jobs (submission_id, job_index, node, rank, started) "
                       "SELECT id, ?, ?, ?, ? FROM job_submissions WHERE entity = ? AND label = ? AND ? < n_jobs "
                       "ORDER BY id DESC LIMIT 1 "
                       "ON CONFLICT (submission_id, job_index) DO UPDATE SET node = excluded.node, "
                       "rank = excluded.rank, started = excluded.started WHERE jobs.ended IS NULL",
                       (index, node, rank, self.clock(), _name(entity), label, index))  # fmt: skip
            if tx.rowcount != 1:
                raise DatabaseError(f"job {index} of {label!r} ({_name(entity)}): not submitted, or already ended")

    def job_finished(self, entity: Enum | str, label: str, index: int, result: str, reason: str = "") -> None:
        """Job ``index`` of the latest batch ``label`` ended with ``result``; a second report is refused."""
        with self._recording(f"end of job {index} of {label}"), self.db.write() as tx:
            tx.execute("INSERT INTO jobs (submission_id, job_index, ended, result, reason) "
                       "SELECT id, ?, ?, ?, ? FROM job_submissions WHERE entity = ? AND label = ? AND ? < n_jobs "
                       "ORDER BY id DESC LIMIT 1 "
                       "ON CONFLICT (submission_id, job_index) DO UPDATE SET ended = excluded.ended, "
                       "result = excluded.result, reason = excluded.reason WHERE jobs.ended IS NULL",
                       (index, self.clock(), result, reason, _name(entity), label, index))  # fmt: skip
            if tx.rowcount != 1:
                raise DatabaseError(f"job {index} of {label!r} ({_name(entity)}): not submitted, or already ended")

    def image_transferred(self, transfer: ImageTransfer) -> None:
        """Record one transfer attempt, good or bad."""
        x = transfer
        with self._recording(f"transfer of {x.image_id}"), self.db.write() as tx:
            tx.execute("INSERT INTO image_transfers (t, image_id, raft, kind, source, destination, checksum, nbytes, "
                       "ok, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (self.clock() if x.t is None else x.t, x.image_id, x.raft, x.kind, x.source, x.destination,
                        x.checksum, x.nbytes, bool(x.ok), x.error))  # fmt: skip

    def software_registered(self, version: str, checksum: str) -> None:
        """System management registered ``checksum`` for ``version``."""
        with self._recording(f"software {version}"), self.db.write() as tx:
            self._software(tx, version, checksum, self.clock())

    @staticmethod
    def _software(tx: Any, version: str, checksum: str, now: float) -> None:
        tx.execute("INSERT INTO software_versions (version, checksum, t) VALUES (?, ?, ?) "
                   "ON CONFLICT (version, checksum) DO NOTHING", (version, checksum, now))  # fmt: skip

    # ---- queries -----------------------------------------------------------------------------------------
    def _rows(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        with self.db.read() as tx:
            return tx.execute(statement, params).fetchall()

    def commands(self, entity: Enum | str | None = None) -> list[CommandRecord]:
        """Commands received, oldest first (of one entity, or all)."""
        where, params = ("WHERE entity = ?", (_name(entity),)) if entity is not None else ("", ())
        rows = self._rows("SELECT t, sender, seq, entity, command, arg, authenticated FROM commands "
                          f"{where} ORDER BY id", params)  # fmt: skip
        return [CommandRecord(r[0], r[1], r[2], r[3], r[4], r[5], _bool(r[6])) for r in rows]

    def results(
        self, seq: int | None = None, sender: str = "ocs", entity: Enum | str | None = None
    ) -> list[ResultRecord]:
        """Results sent, oldest first: of one command (``seq`` from ``sender``), of one entity, or all."""
        clauses, params = [], []
        if seq is not None:
            clauses, params = ["sender = ?", "seq = ?"], [sender, seq]
        if entity is not None:
            clauses.append("entity = ?")
            params.append(_name(entity))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._rows("SELECT t, sender, seq, entity, command, result, reason, state, configuration, enabled "
                          f"FROM results {where} ORDER BY id", params)  # fmt: skip
        return [ResultRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], _bool(r[9])) for r in rows]

    def state_changes(self, entity: Enum | str) -> list[StateChange]:
        rows = self._rows("SELECT t, entity, from_state, to_state, configuration, enabled FROM state_changes "
                          "WHERE entity = ? ORDER BY id", (_name(entity),))  # fmt: skip
        return [StateChange(r[0], r[1], r[2], r[3], r[4], _bool(r[5])) for r in rows]

    def status(self, entity: Enum | str) -> EntityStatusRecord | None:
        """The last status recorded for ``entity`` (None if never seen)."""
        rows = self._rows("SELECT t, entity, state, configuration, enabled FROM entities WHERE entity = ?",
                          (_name(entity),))  # fmt: skip
        if not rows:
            return None
        r = rows[0]
        return EntityStatusRecord(r[0], r[1], r[2], r[3], _bool(r[4]))

    def installations(self, entity: Enum | str | None = None) -> list[InstalledConfiguration]:
        where, params = ("WHERE entity = ?", (_name(entity),)) if entity is not None else ("", ())
        rows = self._rows("SELECT t, entity, configuration, software_version, checksum FROM installations "
                          f"{where} ORDER BY id", params)  # fmt: skip
        return [InstalledConfiguration(*r) for r in rows]

    def last_configuration(self, entity: Enum | str) -> InstalledConfiguration | None:
        """The configuration ``entity`` last installed, with its software (survives restarts; None if never)."""
        found = self.installations(entity)
        return found[-1] if found else None

    def software_versions(self) -> list[SoftwareVersion]:
        return [
            SoftwareVersion(*r) for r in self._rows("SELECT t, version, checksum FROM software_versions ORDER BY t")
        ]

    def rejections(self) -> list[Rejection]:
        return [Rejection(*r) for r in self._rows("SELECT t, code, reason, seq FROM rejections ORDER BY id")]

    def transfers(self, image_id: str) -> list[ImageTransfer]:
        """Every transfer attempt of ``image_id``, oldest first."""
        rows = self._rows("SELECT image_id, raft, kind, source, destination, checksum, nbytes, ok, error, t "
                          "FROM image_transfers WHERE image_id = ? ORDER BY id", (image_id,))  # fmt: skip
        return [ImageTransfer(r[0], r[1], r[2], r[3], r[4], r[5], r[6], _bool(r[7]), r[8], r[9]) for r in rows]

    def count(self, table: str) -> int:
        """Rows in one of the tables of the module docstring."""
        if table not in _TABLES:
            raise ValueError(f"unknown table {table!r}; one of {', '.join(sorted(_TABLES))}")
        return int(self._rows(f"SELECT COUNT(*) FROM {table}")[0][0])

    def _submissions(self, where: str, params: Sequence[Any]) -> list[JobSubmission]:
        with self.db.read() as tx:
            subs: list[Any] = tx.execute(f"SELECT id, t, entity, label, visit, exposure, n_jobs FROM job_submissions {where} "
                              "ORDER BY id", params).fetchall()  # fmt: skip
            jobs: list[Any] = tx.execute("SELECT j.submission_id, j.job_index, j.node, j.rank, j.started, j.ended, j.result, "
                              "j.reason FROM jobs j JOIN job_submissions s ON s.id = j.submission_id "
                              f"{where.replace('WHERE ', 'WHERE s.')} ORDER BY j.submission_id, j.job_index",
                              params).fetchall()  # fmt: skip
        by_sub: dict[int, list[JobRecord]] = {}
        for r in jobs:
            by_sub.setdefault(r[0], []).append(JobRecord(*r[1:]))
        return [JobSubmission(s[1], s[2], s[3], s[4], s[5], s[6], tuple(by_sub.get(s[0], ()))) for s in subs]

    def jobs_of_visit(self, visit: int) -> list[JobSubmission]:
        """The job batches submitted for ``visit`` (all entities), each with the jobs that reported."""
        return self._submissions("WHERE visit = ?", (visit,))

    def jobs_of(self, entity: Enum | str) -> list[JobSubmission]:
        return self._submissions("WHERE entity = ?", (_name(entity),))

    def history(self, entity: Enum | str) -> list[HistoryEntry]:
        """Everything recorded about ``entity`` — commands, results, state changes, installations, job
        batches — in time order."""
        entries: list[HistoryEntry] = [*self.commands(entity), *self.results(entity=entity),
                                       *self.state_changes(entity), *self.installations(entity), *self.jobs_of(entity)]  # fmt: skip
        return sorted(entries, key=lambda e: e.t)


_TABLES = frozenset({"commands", "results", "entities", "state_changes", "software_versions", "installations",
                     "rejections", "ocs_events", "job_submissions", "jobs", "image_transfers", "schema_version"})  # fmt: skip
