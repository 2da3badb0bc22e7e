"""The Level 1 database (APDB), written and read through Rubin's own client, ``lsst.dax.apdb``.

Which path and why: ``pip install lsst-dax-apdb`` works here (it brings ``lsst-sdm-schemas``, whose
``apdb.yaml`` defines the tables, plus ``lsst-sphgeom``, ``lsst-felis``, ``lsst-utils``, ``sqlalchemy`` and
``pandas``), so we write through ``lsst.dax.apdb.sql.ApdbSql`` instead of re-implementing the schema. That
makes the tables exactly Rubin's (DiaObject, DiaSource, DiaForcedSource, SSObject, …: names, types, units
— fluxes in nJy — nullability, the HTM ``pixelId`` spatial index), and Rubin's clients read what we store
by construction: ``Apdb.from_uri("OUT/apdb-config.yaml").getDiaObjects(region)`` is the test. Two
additions: ``ApdbSql`` defines but does not create SSObject (Rubin keeps it in a separate Solar System
database), so :func:`create_apdb` creates it from the client's own ``sso.yaml`` model with the client's
``ModelToSql`` converter (without its foreign key to the MPC's ``mpc_orbits``); and on PostgreSQL the
client is driven through ``psycopg2`` (as Rubin runs it): through psycopg 3 SQLAlchemy casts the client's
all-NULL ``validityEndMjdTai`` column to VARCHAR and the server refuses the insert.

The alternative — generating the tables ourselves from ``apdb.yaml`` on :mod:`lsstpipe.db.sql` — would
have had to re-create the client's spatial index (HTM ``pixelId``), metadata table and frozen
configuration for ``getDiaObjects`` to read it, i.e. to re-implement the client.

Append-only with validity intervals: storing a DiaObject inserts a new version with
``validityStartMjdTai`` = the visit time and sets ``validityEndMjdTai`` on the open previous version
(never deletes it); ``getDiaObjects`` returns the open versions. The primary keys (DiaObject:
``diaObjectId`` + ``validityStartMjdTai``; DiaSource: ``diaSourceId``; DiaForcedSource: ``diaObjectId`` +
``visit`` + ``detector``) make a duplicate row an error, never a second copy.

Concurrency: one :meth:`Level1Database.store_ccd` is one transaction of the client (all rows of the CCD
or none). SQLite allows one writer at a time and can refuse a lock upgrade without waiting, so on SQLite
the write is also serialised across processes by an exclusive ``flock`` on ``PATH.lock`` (a local file
system is required, as for WAL), and the database is in WAL mode so readers never block it. Under that
lock the store first asks the client whether the (visit, detector) is already stored
(``containsVisitDetector``): a retried CCD job is then a no-op, not a duplicate. On PostgreSQL the server
serialises the transactions and the primary keys refuse a concurrent duplicate.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np

from lsstpipe.db.sql import DatabaseError, parse_url, redact

__all__ = ["APDB_CONFIG_NAME", "APDB_FILE_NAME", "Level1Database", "create_apdb", "write_apdb_config"]

APDB_FILE_NAME = "apdb.sqlite3"
APDB_CONFIG_NAME = "apdb-config.yaml"

#: Columns stored as NULL where our row arrays hold 0 ("no id").
_NULL_IF_ZERO = ("diaObjectId", "ssObjectId")


def _client() -> Any:
    try:
        from lsst.dax import apdb
        from lsst.dax.apdb import sql as apdb_sql
    except ImportError as exc:
        raise DatabaseError(f"the APDB needs Rubin's client: pip install lsst-dax-apdb ({exc})") from None
    return apdb, apdb_sql


def _sqlalchemy_url(url: str | Path) -> tuple[str, Path | None]:
    """The SQLAlchemy URL of an lsstpipe database URL, and the SQLite file (None for PostgreSQL)."""
    dialect, target = parse_url(url)
    if dialect.name == "postgresql":
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            raise DatabaseError("the APDB on PostgreSQL needs psycopg2 (pip install psycopg2-binary): through "
                                "psycopg 3 SQLAlchemy types the client's NULL validity column as VARCHAR") from None  # fmt: skip
        return "postgresql+psycopg2://" + target.split("://", 1)[1], None
    path = Path(target).expanduser().resolve()
    return f"sqlite:///{path}", path


def create_apdb(url: str | Path, config_path: str | Path, *, namespace: str | None = None,
                connection_timeout: float = 60.0) -> Path:  # fmt: skip
    """Create Rubin's APDB schema at ``url`` and write the client's configuration to ``config_path``.

    Parameters
    ----------
    url
        ``sqlite:///PATH`` (or a bare path) or ``postgresql://…`` (see :mod:`lsstpipe.db.sql`).
    config_path
        Where to write the YAML that ``lsst.dax.apdb.Apdb.from_uri`` opens.
    namespace
        PostgreSQL schema for the tables (created if missing); None: the connection's default.
    connection_timeout
        Seconds a writer waits for a lock (SQLite busy timeout) or for the server.

    Returns
    -------
    pathlib.Path
        ``config_path``.

    Raises
    ------
    DatabaseError
        The client is missing or the schema could not be created.
    """
    _, apdb_sql = _client()
    sa_url, path = _sqlalchemy_url(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if namespace is not None:
            raise ValueError("namespace applies to PostgreSQL only; leave it None for SQLite")
    try:
        config = apdb_sql.ApdbSql.init_database(sa_url, namespace=namespace,
                                                connection_timeout=int(round(connection_timeout)))  # fmt: skip
        _create_ss_object_table(config)
        if path is not None:
            with sqlite3.connect(path) as conn:  # WAL is persistent: readers never block the writer
                conn.execute("PRAGMA journal_mode = WAL")
        config_path = Path(config_path)
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config.save(str(config_path))
    except Exception as exc:  # SQLAlchemy/driver errors: say which database
        raise DatabaseError(f"cannot create the APDB at {redact(str(url))}: {_short(exc)}") from exc
    return config_path


def _create_ss_object_table(config: Any) -> None:
    """Add Rubin's SSObject table (``sso.yaml``, which ``ApdbSql`` defines but does not create) to the database.

    Its foreign key to the MPC's ``mpc_orbits`` table is dropped: that table is replicated from the Minor
    Planet Center and is no part of the APDB.
    """
    import dataclasses

    import sqlalchemy
    from lsst.dax.apdb import ApdbTables
    from lsst.dax.apdb.schema_model import ForeignKeyConstraint
    from lsst.dax.apdb.sql.modelToSql import ModelToSql

    apdb, apdb_sql = _client()
    table = apdb_sql.ApdbSql(config).tableDef(ApdbTables.SSObject)
    if table is None:
        raise DatabaseError("this lsst-dax-apdb defines no SSObject table; install lsst-sdm-schemas with sso.yaml")
    constraints = [c for c in table.constraints if not isinstance(c, ForeignKeyConstraint)]
    table = dataclasses.replace(table, constraints=constraints)
    metadata = sqlalchemy.MetaData(schema=config.namespace)
    ModelToSql(metadata, prefix=config.prefix).make_tables([table])
    engine = _engine(config)
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()


def _engine(config: Any) -> Any:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(config.db_url, poolclass=NullPool)


def write_apdb_config(out_dir: str | Path) -> Path:
    """Create ``OUT/apdb.sqlite3`` with Rubin's schema (if missing) and ``OUT/apdb-config.yaml`` for it.

    Returns the configuration's path. An existing configuration is kept (the night may be restarted).
    """
    out = Path(out_dir)
    config_path = out / APDB_CONFIG_NAME
    if config_path.exists() and (out / APDB_FILE_NAME).exists():
        return config_path
    return create_apdb(out / APDB_FILE_NAME, config_path)


def _frame(rows: np.ndarray | None) -> Any:
    import pandas as pd

    if rows is None:
        return None
    frame = pd.DataFrame({name: rows[name] for name in rows.dtype.names or ()})
    for name in _NULL_IF_ZERO:
        if name in frame:
            frame[name] = frame[name].astype("Int64").mask(frame[name] == 0)
    if "band" in frame:
        frame["band"] = frame["band"].astype(object)
    return frame


def _short(exc: BaseException, limit: int = 600) -> str:
    """An exception's message, without the kilobytes of bound parameters SQLAlchemy appends."""
    root = exc
    while root.__cause__ is not None or getattr(root, "orig", None) is not None:
        root = getattr(root, "orig", None) or root.__cause__  # type: ignore[assignment]
    text = str(exc) if root is exc else f"{type(root).__name__}: {root}"
    return text if len(text) <= limit else text[:limit] + " …"


def _mjd_tai(mjd: float) -> Any:
    import astropy.time

    if not (np.isfinite(mjd) and 40000 < mjd < 100000):
        raise ValueError(f"visit time must be an MJD (TAI) between 40000 and 100000, got {mjd}")
    return astropy.time.Time(mjd, format="mjd", scale="tai")


def circle(ra_deg: float, dec_deg: float, radius_deg: float) -> Any:
    """An ``lsst.sphgeom`` circle region (what ``getDiaObjects``/``getDiaSources`` take)."""
    from lsst.sphgeom import Angle, Circle, LonLat, UnitVector3d

    if not (0 < radius_deg <= 180) or abs(dec_deg) > 90:
        raise ValueError(f"need |dec| ≤ 90 and 0 < radius ≤ 180 degrees, got dec={dec_deg}, radius={radius_deg}")
    return Circle(UnitVector3d(LonLat.fromDegrees(ra_deg, dec_deg)), Angle.fromDegrees(radius_deg))


class Level1Database:
    """One process's connection to the APDB, opened from the client's configuration file.

    Parameters
    ----------
    config_path
        The YAML written by :func:`create_apdb` / :func:`write_apdb_config`.
    """

    def __init__(self, config_path: str | Path) -> None:
        apdb, _ = _client()
        self.config_path = Path(config_path)
        if not self.config_path.is_file():
            raise DatabaseError(f"no APDB configuration at {self.config_path}: create it with write_apdb_config()")
        try:
            self.apdb = apdb.Apdb.from_uri(str(self.config_path))
        except Exception as exc:
            raise DatabaseError(f"cannot open the APDB of {self.config_path}: {_short(exc)}") from exc
        url = self.apdb.getConfig().db_url
        self._lock_path: Path | None = None
        if url.startswith("sqlite"):
            database = unquote(url.split("///", 1)[1].split("?", 1)[0]).removeprefix("file:")
            self._lock_path = Path(database).with_name(Path(database).name + ".lock")

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        if self._lock_path is None:
            yield
            return
        with open(self._lock_path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def store_ccd(self, visit: int, detector: int, visit_time_mjd_tai: float, objects: np.ndarray,
                  sources: np.ndarray, forced_sources: np.ndarray | None = None) -> bool:  # fmt: skip
        """Store one CCD's rows in one transaction; False (and nothing written) if it was already stored.

        Parameters
        ----------
        visit, detector
            The CCD; every row of ``sources``/``forced_sources`` must carry them.
        visit_time_mjd_tai
            Exposure midpoint: the new DiaObject versions' ``validityStartMjdTai``.
        objects, sources, forced_sources
            Row arrays of :mod:`lsstpipe.pipelines.association` (``DIA_OBJECT_ROW``, ``DIA_SOURCE_ROW``,
            ``FORCED_SOURCE_ROW``).
        """
        for name, rows in (("sources", sources), ("forced_sources", forced_sources)):
            if (
                rows is not None
                and len(rows)
                and not (np.all(rows["visit"] == visit) and np.all(rows["detector"] == detector))
            ):
                raise ValueError(f"{name} contain rows of another visit/detector than ({visit}, {detector})")
        time = _mjd_tai(visit_time_mjd_tai)
        with self._write_lock():
            try:
                if self.apdb.containsVisitDetector(int(visit), int(detector)):
                    return False
                self.apdb.store(time, _frame(objects), _frame(sources), _frame(forced_sources))
            except Exception as exc:
                # On PostgreSQL two jobs may store the same CCD at once (a retry racing the original): the
                # store is one transaction, so the loser's rows are all rolled back by the primary keys.
                try:
                    stored = self.apdb.containsVisitDetector(int(visit), int(detector))
                except Exception:  # noqa: BLE001 (report the original failure)
                    stored = False
                message = str(exc).lower()
                if stored and ("duplicate" in message or "unique" in message):
                    return False
                raise DatabaseError(f"storing visit {visit} detector {detector} in the APDB failed: "
                                    f"{_short(exc)}") from exc  # fmt: skip
        return True

    def dia_objects(self, ra_deg: float, dec_deg: float, radius_deg: float) -> Any:
        """The current (open-validity) DiaObjects in a cone, as a pandas DataFrame."""
        return self.apdb.getDiaObjects(circle(ra_deg, dec_deg, radius_deg))

    def dia_sources(self, ra_deg: float, dec_deg: float, radius_deg: float, visit_time_mjd_tai: float,
                    object_ids: Any = None) -> Any:  # fmt: skip
        """DiaSources of the last ``read_sources_months`` before the visit: in a cone, or of ``object_ids``."""
        ids = None if object_ids is None else [int(i) for i in object_ids]
        frame = self.apdb.getDiaSources(circle(ra_deg, dec_deg, radius_deg), ids, _mjd_tai(visit_time_mjd_tai))
        if frame is None:
            import pandas as pd

            return pd.DataFrame()
        return frame

    def store_ss_objects(self, ss_objects: Any) -> None:
        """Append SSObject rows (a DataFrame or structured array with Rubin's SSObject columns)."""
        import pandas as pd

        frame = ss_objects if isinstance(ss_objects, pd.DataFrame) else _frame(ss_objects)
        config = self.apdb.getConfig()
        engine = _engine(config)
        try:
            with self._write_lock(), engine.begin() as conn:
                frame.to_sql(f"{config.prefix}SSObject", conn, schema=config.namespace, if_exists="append", index=False)
        except Exception as exc:
            raise DatabaseError(f"storing {len(frame)} SSObjects failed: {_short(exc)}") from exc
        finally:
            engine.dispose()

    def ss_objects(self) -> Any:
        """All SSObject rows, as a pandas DataFrame."""
        import pandas as pd

        config = self.apdb.getConfig()
        engine = _engine(config)
        try:
            with engine.connect() as conn:
                return pd.read_sql_table(f"{config.prefix}SSObject", conn, schema=config.namespace)
        finally:
            engine.dispose()

    def snapshot(self, destination: str | Path, day_obs: int) -> str:
        """A consistent, read-only copy of the APDB as it is now, for the day's statistical queries.

        SQLite: an online backup (``sqlite3``'s backup API, consistent while CCD jobs keep writing) into
        ``destination/apdb-{day_obs}.sqlite3``, written to a temporary name then renamed; returns its path.
        PostgreSQL: the tables copied in one REPEATABLE READ transaction into a new schema
        ``apdb_snapshot_{day_obs}`` of the same database (``destination`` is unused); returns the schema.
        A snapshot is never overwritten: a second one for the same day raises :class:`DatabaseError`.
        """
        day = int(day_obs)
        config = self.apdb.getConfig()
        tables = [f"{config.prefix}{t}" for t in ("DiaObject", "DiaSource", "DiaForcedSource", "SSObject")]
        if self._lock_path is not None:
            source = self._lock_path.with_name(self._lock_path.name.removesuffix(".lock"))
            out = Path(destination) / f"apdb-{day}.sqlite3"
            if out.exists():
                raise DatabaseError(f"the APDB snapshot {out} exists already; snapshots are never overwritten")
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
            src, dst = sqlite3.connect(f"file:{source}?mode=ro", uri=True), sqlite3.connect(tmp)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                dst.close()
                src.close()
            os.replace(tmp, out)
            return str(out)
        import sqlalchemy

        schema = f"apdb_snapshot_{day}"
        qualified = f'"{config.namespace}".' if config.namespace else ""
        engine = _engine(config)
        try:
            with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
                exists = conn.execute(sqlalchemy.text("SELECT 1 FROM information_schema.schemata WHERE schema_name = :s"),
                                      {"s": schema}).first()  # fmt: skip
                if exists:
                    raise DatabaseError(f"the APDB snapshot schema {schema} exists already; snapshots are never "
                                        "overwritten")  # fmt: skip
                conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
                for t in tables:
                    conn.execute(sqlalchemy.text(f'CREATE TABLE "{schema}"."{t}" AS SELECT * FROM {qualified}"{t}"'))
        finally:
            engine.dispose()
        return schema

    def row_counts(self) -> dict[str, int]:
        """Rows per table (DiaObject counts every version)."""
        return {str(k): int(v) for k, v in self.apdb.tableRowCount().items()}
