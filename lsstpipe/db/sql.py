"""One SQL code path over two backends: SQLite (the default, embedded) and PostgreSQL (psycopg 3).

A database is named by a URL: ``sqlite:///PATH`` (everything after the third slash is the path, so
``sqlite:////abs/control.sqlite3`` is absolute and ``sqlite:///control.sqlite3`` relative; a bare path
means the same), or ``postgresql://user[:password]@host:port/dbname`` (``postgres://`` too).

Statements are written once, with ``?`` placeholders and SQL that both backends run: ``RETURNING``,
``INSERT … ON CONFLICT``, ``DOUBLE PRECISION``, ``BOOLEAN``. What differs lives in a :class:`Dialect`
value — the placeholder, the identity column type, how a write transaction begins, row locking, the
trigger syntax of the append-only guard — never in ``if backend`` branches in the callers.

SQLite is opened in WAL mode (readers never block the writer), with a busy timeout (a writer waits for
another process's write instead of failing), foreign keys on and ``synchronous=FULL`` (a committed row
survives a power cut). Every write transaction begins ``IMMEDIATE``, so that two processes never both
read and then fail to upgrade to a write lock. PostgreSQL runs in autocommit mode with explicit
transactions. One connection serves one :class:`Database`; a lock serialises its threads. Do not share a
:class:`Database` across ``fork``: open one per process.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

#: Oldest SQLite with ``RETURNING`` (3.35) and upserts.
MIN_SQLITE = (3, 35, 0)


class DatabaseError(RuntimeError):
    """A database could not be opened, migrated, read or written (either backend); the message says why."""


@dataclass(frozen=True)
class Dialect:
    """What differs between the backends, as data."""

    name: str
    placeholder: str
    id_column: str
    begin_write: str
    begin_read: str
    for_update: str
    setup_ddl: tuple[str, ...]
    append_only_ddl: tuple[str, ...]
    migration_lock: str | None

    def sql(self, statement: str) -> str:
        """``statement`` with its ``?`` placeholders in this backend's style."""
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def ddl(self, statement: str) -> str:
        return statement.replace("{id}", self.id_column)

    def append_only(self, table: str) -> list[str]:
        """Statements that make ``table`` refuse UPDATE and DELETE."""
        return [s.format(table=table) for s in self.append_only_ddl]


SQLITE = Dialect(
    name="sqlite",
    placeholder="?",
    id_column="INTEGER PRIMARY KEY AUTOINCREMENT",
    begin_write="BEGIN IMMEDIATE",
    begin_read="BEGIN",  # a read transaction in WAL mode sees one snapshot
    for_update="",  # BEGIN IMMEDIATE already holds the database's write lock
    setup_ddl=(),
    append_only_ddl=(
        "CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
        "BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END",
        "CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
        "BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END",
    ),
    migration_lock=None,
)

POSTGRES = Dialect(
    name="postgresql",
    placeholder="%s",
    id_column="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    begin_write="BEGIN",
    begin_read="BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",  # one snapshot for all its statements
    for_update=" FOR UPDATE",
    setup_ddl=(
        "CREATE OR REPLACE FUNCTION lsstpipe_append_only() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$",
    ),
    append_only_ddl=(
        "CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION lsstpipe_append_only()",
    ),
    # Serialises concurrent first opens (CREATE TABLE IF NOT EXISTS alone races in PostgreSQL).
    migration_lock="SELECT pg_advisory_xact_lock(7310251)",
)


def parse_url(url: str | Path) -> tuple[Dialect, str]:
    """The dialect and the connection target (a file path or a libpq URL) of a database URL.

    Raises
    ------
    DatabaseError
        The URL names another backend, or no path.
    """
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return POSTGRES, text
    if text.startswith("sqlite:///"):
        path = text[len("sqlite:///") :]
    elif "://" in text:
        raise DatabaseError(f"unsupported database URL {redact(text)!r}: use sqlite:///PATH or postgresql://…")
    else:
        path = text
    if not path or path == ":memory:":
        raise DatabaseError(f"{text!r}: give a file path (an in-memory database would not keep the history)")
    return SQLITE, path


def redact(url: str) -> str:
    """``url`` without its password (for logs and error messages)."""
    return re.sub(r"(://[^/:@]+):[^/@]*@", r"\1:***@", url)


class Transaction:
    """The statements of one transaction, in the common ``?`` style."""

    def __init__(self, cursor: Any, dialect: Dialect) -> None:
        self._cur = cursor
        self.dialect = dialect

    def execute(self, statement: str, params: Sequence[Any] = ()) -> Transaction:
        self._cur.execute(self.dialect.sql(statement), tuple(params))
        return self

    def executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cur.executemany(self.dialect.sql(statement), [tuple(r) for r in rows])

    def ddl(self, statement: str) -> None:
        self._cur.execute(self.dialect.ddl(statement))

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cur.fetchone()
        return None if row is None else tuple(row)

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._cur.fetchall()]

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)


@dataclass(frozen=True)
class Migration:
    """One step of a schema: ``version`` n is applied to a database at version n-1, in one transaction.

    ``statements`` may use ``{id}`` for the identity column; ``append_only`` tables get the guard triggers.
    """

    version: int
    description: str
    statements: tuple[str, ...]
    append_only: tuple[str, ...] = ()


def _switch_to_wal(conn: sqlite3.Connection, busy_timeout: float) -> str:
    """Put a SQLite database in WAL mode, waiting up to *busy_timeout* for other processes opening it.

    The switch from the rollback journal takes an exclusive lock, and SQLite answers "database is locked"
    without calling the busy handler while another process holds it in the middle of the same switch (the
    first opens of a new database by several ranks at once): retry here until the timeout instead.
    """
    deadline = time.monotonic() + busy_timeout
    pause = 0.001
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.05)


class Database:
    """A connection to one database, its transactions and its schema migrations.

    Parameters
    ----------
    url
        ``sqlite:///PATH`` or ``postgresql://…`` (see the module docstring).
    busy_timeout
        Seconds a SQLite writer waits for another process's write lock before failing.
    connect_timeout
        Seconds to wait for a PostgreSQL server.
    """

    def __init__(self, url: str | Path, *, busy_timeout: float = 30.0, connect_timeout: float = 10.0) -> None:
        self.dialect, target = parse_url(url)
        self.url = redact(str(url))
        self._lock = threading.RLock()
        self._errors: tuple[type[BaseException], ...]
        if self.dialect is SQLITE:
            self._conn: Any = self._open_sqlite(target, busy_timeout)
            self._errors = (sqlite3.Error,)
        else:
            self._conn = self._open_postgres(target, connect_timeout)
            import psycopg

            self._errors = (psycopg.Error,)

    def _open_sqlite(self, path: str, busy_timeout: float) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise DatabaseError(f"SQLite {sqlite3.sqlite_version} is too old: the control database needs "
                                f"{'.'.join(map(str, MIN_SQLITE))} or newer (a newer Python brings one)")  # fmt: skip
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(Path(path).expanduser(), timeout=busy_timeout, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            mode = _switch_to_wal(conn, busy_timeout)
            if str(mode).lower() != "wal":
                raise DatabaseError(
                    f"{path}: SQLite refused WAL mode ({mode}); put the database on a local file system"
                )
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open the SQLite database {path}: {exc}") from exc
        return conn

    def _open_postgres(self, url: str, connect_timeout: float) -> Any:
        try:
            import psycopg
        except ImportError:
            raise DatabaseError("PostgreSQL needs psycopg 3: pip install 'lsstpipe[postgres]'") from None
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(connect_timeout)))
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to {redact(url)}: {exc}; is the server up?") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """A write transaction: committed when the block ends, rolled back if it raises."""
        with self._transaction(self.dialect.begin_write) as tx:
            yield tx

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        """A read transaction: one consistent snapshot."""
        with self._transaction(self.dialect.begin_read) as tx:
            yield tx

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[Transaction]:
        with self._lock:
            try:
                cur = self._conn.cursor()
            except self._errors as exc:  # closed, or the server went away
                raise DatabaseError(f"{self.url}: {exc}") from exc
            try:
                cur.execute(begin)
                yield Transaction(cur, self.dialect)
                cur.execute("COMMIT")
            except self._errors as exc:
                self._rollback(cur)
                raise DatabaseError(f"{self.url}: {exc}".strip()) from exc
            except BaseException:
                self._rollback(cur)
                raise
            finally:
                with suppress(*self._errors):
                    cur.close()

    def _rollback(self, cur: Any) -> None:
        try:
            cur.execute("ROLLBACK")
        except self._errors:
            pass  # the connection is gone or no transaction is open: nothing to undo

    def migrate(self, migrations: Sequence[Migration]) -> int:
        """Bring the schema up to the last of ``migrations`` (each in its own transaction); the version reached.

        Raises
        ------
        DatabaseError
            The database's schema is newer than this code: upgrade lsstpipe instead of downgrading the data.
        """
        latest = 0
        for m in migrations:
            if m.version != latest + 1:
                raise ValueError(f"migrations must be numbered 1, 2, … in order (got {m.version} after {latest})")
            latest = m.version
        with self.write() as tx:
            self._lock_schema(tx)
            version = self._version(tx)
        if version > latest:
            raise DatabaseError(f"{self.url} has schema version {version} but this lsstpipe knows only up to {latest}; "
                                "upgrade lsstpipe")  # fmt: skip
        for m in migrations[version:]:
            with self.write() as tx:
                self._lock_schema(tx)
                if self._version(tx) >= m.version:  # another process applied it meanwhile
                    continue
                for statement in self.dialect.setup_ddl if m.append_only else ():
                    tx.ddl(statement)
                for statement in m.statements:
                    tx.ddl(statement)
                for table in m.append_only:
                    for statement in self.dialect.append_only(table):
                        tx.ddl(statement)
                tx.execute("INSERT INTO schema_version (version, description) VALUES (?, ?)",
                           (m.version, m.description))  # fmt: skip
        return max(version, latest)

    def _lock_schema(self, tx: Transaction) -> None:
        if self.dialect.migration_lock:
            tx.execute(self.dialect.migration_lock).fetchone()
        tx.ddl("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT PRIMARY KEY, description TEXT NOT NULL)")

    @staticmethod
    def _version(tx: Transaction) -> int:
        row = tx.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def schema_version(self) -> int:
        with self.read() as tx:
            return self._version(tx)


_S = TypeVar("_S", bound="Store")


class Store:
    """What every lsstpipe database shares: open the URL, migrate its schema (closing the connection if that
    fails), name the backend, close, and work as a context manager. Subclasses add their tables' API and may
    check the schema they opened in :meth:`_check_schema`."""

    def __init__(self, url: str | Path, migrations: Sequence[Migration], *, busy_timeout: float = 30.0,
                 connect_timeout: float = 10.0, clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        self.db = Database(url, busy_timeout=busy_timeout, connect_timeout=connect_timeout)
        self.clock = clock
        try:
            self.schema_version = self.db.migrate(migrations)
            self._check_schema()
        except BaseException:
            self.db.close()
            raise

    def _check_schema(self) -> None:
        """Raise DatabaseError if the opened database is not of this kind (default: accept)."""

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.db.dialect.name

    def close(self) -> None:
        self.db.close()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
