"""The EFD replication chain: Summit → Chilean DAC → US DAC, lag, following, and reads that fall back.

Two backends, one interface (:class:`EFDChain`):

- **Embedded** (:class:`EmbeddedEFDChain`, the default): three SQLite files in one directory
  (``summit.sqlite3``, ``chile_dac.sqlite3``, ``us_dac.sqlite3``). The replicas are fed by *shipping*
  the Summit's append-only log (:func:`ship_log`): the records with an lsn above the replica's newest are
  copied in one transaction, idempotently, so a shipment interrupted or repeated changes nothing.
  :meth:`EFDChain.sync` ships Summit → Chile, and Chile → US while the US follows; the monitor thread
  (:meth:`EFDChain.start_monitor`) does it periodically. A replica can be taken out of service
  (:meth:`EmbeddedEFDChain.take_offline`) and brought back; it catches up from its own newest lsn.
- **PostgreSQL** (:class:`PostgresEFDChain`): PostgreSQL's own streaming replication. The Summit is the
  primary, the Chilean replica a hot standby of it, the US replica a *cascading* hot standby whose
  ``primary_conninfo`` names the Chilean standby. Following on/off for the US replica is
  ``pg_wal_replay_resume()`` / ``pg_wal_replay_pause()`` on the US standby. The choice: pausing replay
  keeps the US standby connected and receiving WAL (nothing is lost, the Chilean standby need not keep
  WAL for it, and resuming is instant), while the data the US users see stays where it was — which is
  what "the US replica does not follow" means to them. A pause does not survive a restart of the US
  server: :meth:`EFDChain.sync` (called by the monitor) pauses it again, so a restarted US standby may
  replay for up to one monitor interval before it is paused. ``tests/efd_support.py`` starts such a
  three-server chain on loopback (initdb, ``pg_basebackup -R``) for the tests.

Lag (:class:`~lsstpipe.db.efd.ReplicationLag`) is measured against the Summit for each replica and handed
to a callback (the Base DMCS publishes it as telemetry). Reads (:meth:`EFDChain.read`) go to the nearest
copy — the US replica — and fall back up the chain (US → Chile → Summit) when one fails, logging why.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from lsstpipe.db.efd import CHAIN, UPSTREAM, EFDReader, ReplicationLag, Site, SummitEFD, apply_entries
from lsstpipe.db.sql import Database, DatabaseError, parse_url

log = logging.getLogger(__name__)

#: Environment variable naming the EFD (a directory for the embedded chain, or the Summit's PostgreSQL URL).
EFD_ENV = "LSSTPIPE_EFD"

_T = TypeVar("_T")


def ship_log(upstream: EFDReader, downstream: Database, batch: int = 5000) -> int:
    """Copy the log records ``downstream`` lacks from ``upstream``, in one transaction; how many were applied.

    Idempotent: the replica's newest lsn is read again inside the write transaction, and records already
    present are left alone, so two shippers or a repeated shipment apply nothing twice.
    """
    applied = EFDReader(downstream).last_lsn()
    entries = upstream.log(applied, batch)
    if not entries:
        return 0
    with downstream.write() as tx:
        row = tx.execute("SELECT COALESCE(MAX(lsn), 0) FROM efd_log").fetchone()
        now_applied = int(row[0]) if row else 0
        todo = [e for e in entries if e.lsn > now_applied]
        apply_entries(tx, todo)
    return len(todo)


@dataclass(frozen=True)
class ReadResult(Generic[_T]):
    """What a read returned, which copy answered it, and why nearer copies did not."""

    site: Site
    value: _T
    fallbacks: tuple[str, ...] = ()


class _Replica:
    """A connection to one replica, opened on first use and reopened after a failure."""

    def __init__(self, site: Site, url: str, connect_timeout: float, migrate: bool) -> None:
        self.site, self.url, self.connect_timeout, self.migrate = site, url, connect_timeout, migrate
        self.offline_reason: str | None = None
        self._db: Database | None = None
        self._lock = threading.Lock()

    def database(self) -> Database:
        with self._lock:
            if self.offline_reason is not None:
                raise DatabaseError(f"the {self.site.value} EFD replica is offline: {self.offline_reason}")
            if self._db is None:
                if self.migrate:  # an embedded replica: same schema as the Summit, written by shipping only
                    self._db = SummitEFD(self.url, connect_timeout=self.connect_timeout).db
                else:  # a hot standby: read-only, its schema arrives with the WAL
                    self._db = Database(self.url, connect_timeout=self.connect_timeout)
            return self._db

    def reader(self) -> EFDReader:
        return EFDReader(self.database())

    def drop(self) -> None:
        """Forget the connection (after a failure, or to go offline); the next use reconnects."""
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except Exception:  # a connection that already broke has nothing left to close
                log.debug("closing the %s EFD connection", self.site.value, exc_info=True)


class EFDChain:
    """The Summit EFD and its two replicas (base of the embedded and the PostgreSQL chains).

    Attributes
    ----------
    summit
        The Summit EFD (the writer).
    """

    def __init__(self, summit: SummitEFD, replicas: Mapping[Site, _Replica], clock: Callable[[], float]) -> None:
        self.summit = summit
        self._replicas = dict(replicas)
        self.clock = clock
        self._following = False
        self._lock = threading.RLock()
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._failing: set[tuple[Site, str]] = set()

    def _report(self, site: Site, what: str, exc: DatabaseError | None) -> None:
        """Log a replica's failure at ``what`` once when it starts and once when it ends (not at every step)."""
        key = (site, what)
        if exc is not None and key not in self._failing:
            self._failing.add(key)
            log.warning("EFD: %s of the %s replica failed (retried at every step; logged again when it works): %s",
                        what, site.value, exc)  # fmt: skip
        elif exc is None and key in self._failing:
            self._failing.discard(key)
            log.warning("EFD: %s of the %s replica works again", what, site.value)

    # ---- what the EFD Replicator controls -----------------------------------------------------------------
    def replica_names(self) -> tuple[str, ...]:
        """The replicas this chain has (``chile_dac``, ``us_dac``)."""
        return tuple(s.value for s in self._replicas)

    @property
    def following(self) -> bool:
        """Whether the US replica follows the Chilean one."""
        return self._following

    def _site(self, name: str) -> Site:
        try:
            site = Site(name)
        except ValueError:
            site = None
        if site not in self._replicas:
            raise ValueError(f"the EFD has no replica {name!r} (replicas: {', '.join(self.replica_names())})")
        assert site is not None
        return site

    def set_following(self, name: str, on: bool) -> None:
        """Turn the US replica's following on or off (the Chilean replica always follows the Summit).

        Raises
        ------
        ValueError
            ``name`` is not the US replica.
        DatabaseError
            The US replica could not be reached. Turning following on then changes nothing; turning it off
            is remembered and applied by :meth:`sync` when the replica is back.
        """
        site = self._site(name)
        if site is not Site.US:
            raise ValueError(f"only the US replica's following can be turned on or off, not {name!r}'s")
        with self._lock:
            before, self._following = self._following, bool(on)
            try:
                self._apply_following()
            except DatabaseError:
                self._following = before if on else False
                raise
        log.info("EFD: the US replica %s the Chilean replica", "follows" if on else "no longer follows")

    def ping(self, name: str, timeout: float) -> None:
        """Raise :class:`DatabaseError` unless replica ``name`` answers a query within ``timeout`` seconds."""
        replica = self._replicas[self._site(name)]
        try:
            self._ping(replica, timeout)
        except DatabaseError as exc:
            replica.drop()
            raise DatabaseError(f"the {name} EFD replica does not answer: {exc}") from exc

    # ---- replication and lag ------------------------------------------------------------------------------
    def sync(self) -> dict[Site, int]:
        """One replication step; per replica, the records applied (embedded) or 0 (streaming replicates itself).

        A replica that fails is skipped (and logged); the next step retries it.
        """
        return {}

    def lag(self, name: str | Site) -> ReplicationLag:
        """How far replica ``name`` is behind the Summit.

        Raises
        ------
        DatabaseError
            The Summit or the replica did not answer.
        """
        site = name if isinstance(name, Site) else self._site(name)
        replica = self._replicas[site]
        try:
            applied = replica.reader().last_lsn()
            summit_lsn, rows, nbytes, oldest = self.summit.reader.backlog(applied)
            nbytes = self._bytes_behind(replica, nbytes)
        except DatabaseError:
            replica.drop()
            raise
        seconds = max(0.0, self.clock() - oldest) if oldest is not None else 0.0
        following = True if site is Site.CHILE else self._following
        return ReplicationLag(site, UPSTREAM[site], following, applied, summit_lsn, rows, seconds, nbytes)

    def lags(self) -> list[ReplicationLag]:
        """The lag of every replica that answers (one that does not is logged and left out)."""
        out = []
        for site in self._replicas:
            try:
                out.append(self.lag(site))
            except DatabaseError as exc:
                self._report(site, "lag measurement", exc)
                continue
            self._report(site, "lag measurement", None)
        return out

    def wait_caught_up(
        self, name: str, timeout: float, lsn: int | None = None, interval: float = 0.05
    ) -> ReplicationLag:
        """Sync until replica ``name`` holds every record up to ``lsn`` (default: the Summit's newest now).

        Returns the replica's lag then (records written meanwhile may still be on their way).

        Raises
        ------
        TimeoutError
            Not there after ``timeout`` seconds (the message gives the last lag, or why it was unknown).
        """
        target = self.summit.reader.last_lsn() if lsn is None else lsn
        end, last = time.monotonic() + timeout, "never measured"
        while True:
            self.sync()
            try:
                lag = self.lag(name)
                if lag.applied_lsn >= target:
                    return lag
                last = f"at lsn {lag.applied_lsn} of {target}, {lag.seconds_behind:.2f} s behind"
            except DatabaseError as exc:
                last = str(exc)
            if time.monotonic() > end:
                raise TimeoutError(f"the {name} EFD replica did not catch up within {timeout:g} s ({last})")
            time.sleep(interval)

    def start_monitor(self, interval: float, publish: Callable[[ReplicationLag], None]) -> None:
        """Every ``interval`` seconds, in a thread: :meth:`sync`, then ``publish`` each replica's lag."""
        if interval <= 0:
            raise ValueError(f"the EFD monitor interval must be > 0 seconds (got {interval})")
        self.stop_monitor()
        self._stop.clear()

        def run() -> None:
            while True:
                try:
                    self.sync()
                    for lag in self.lags():
                        publish(lag)
                except Exception:  # the monitor must outlive one bad step (a callback bug, a lost server)
                    log.exception("EFD monitor step failed; retrying in %g s", interval)
                if self._stop.wait(interval):
                    return

        self._monitor = threading.Thread(target=run, name="efd-monitor", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(10.0)
            self._monitor = None

    # ---- reads --------------------------------------------------------------------------------------------
    def read(self, query: Callable[[EFDReader], _T], start: Site = Site.US) -> ReadResult[_T]:
        """Run ``query`` on the nearest copy from ``start`` up the chain; a copy that fails is logged and skipped.

        Raises
        ------
        DatabaseError
            No copy answered (the message lists why each failed).
        """
        why: list[str] = []
        for site in CHAIN[CHAIN.index(start) :]:
            if site is not Site.SUMMIT and site not in self._replicas:
                why.append(f"{site.value}: this EFD has no such replica")
                continue
            try:
                value = query(self.summit.reader if site is Site.SUMMIT else self._replicas[site].reader())
            except DatabaseError as exc:
                if site is not Site.SUMMIT:
                    self._replicas[site].drop()
                log.warning("EFD read fell back past the %s copy (%s)", site.value, exc)
                why.append(f"{site.value}: {exc}")
                continue
            return ReadResult(site, value, tuple(why))
        raise DatabaseError(f"no EFD copy answered: {'; '.join(why)}")

    def close(self) -> None:
        self.stop_monitor()
        for replica in self._replicas.values():
            replica.drop()
        self.summit.close()

    def __enter__(self) -> EFDChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what differs between the backends ----------------------------------------------------------------
    def _apply_following(self) -> None:
        """Make the US replica follow (or not) as :attr:`following` says (under the lock)."""

    def _ping(self, replica: _Replica, timeout: float) -> None:
        replica.reader().last_lsn()

    def _bytes_behind(self, replica: _Replica, log_bytes: int) -> int:
        return log_bytes


class EmbeddedEFDChain(EFDChain):
    """Three SQLite copies in ``directory``, fed by shipping the Summit's log (see the module docstring)."""

    def __init__(self, directory: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        root = Path(directory).expanduser()
        if root.exists() and not root.is_dir():
            raise DatabaseError(f"{root} is a file; the embedded EFD needs a directory for its three SQLite copies")
        root.mkdir(parents=True, exist_ok=True)
        self.directory = root
        summit = SummitEFD(f"sqlite:///{root / 'summit.sqlite3'}", clock=clock)
        replicas: dict[Site, _Replica] = {s: _Replica(s, f"sqlite:///{root / f'{s.value}.sqlite3'}", 10.0, migrate=True)
                    for s in (Site.CHILE, Site.US)}  # fmt: skip
        super().__init__(summit, replicas, clock)
        for replica in replicas.values():  # create the copies now; one that fails is retried at each use
            try:
                replica.database()
            except DatabaseError as exc:
                log.warning("EFD: the %s replica cannot be opened yet: %s", replica.site.value, exc)

    def sync(self) -> dict[Site, int]:
        applied: dict[Site, int] = {}
        with self._lock:
            hops = [(Site.CHILE, Site.SUMMIT)] + ([(Site.US, Site.CHILE)] if self._following else [])
            for site, source in hops:
                try:
                    upstream = self.summit.reader if source is Site.SUMMIT else self._replicas[source].reader()
                    applied[site] = ship_log(upstream, self._replicas[site].database())
                except DatabaseError as exc:
                    self._report(site, f"log shipping from {source.value}", exc)
                    applied[site] = 0
                    continue
                self._report(site, f"log shipping from {source.value}", None)
        return applied

    def _apply_following(self) -> None:
        if self._following:  # shipping starts at the next sync; the replica must be there to take it
            self._replicas[Site.US].reader().last_lsn()

    def take_offline(self, name: str, reason: str = "taken out of service") -> None:
        """Take a replica out of service: reads fall back past it and shipping to it stops until
        :meth:`bring_online`."""
        replica = self._replicas[self._site(name)]
        replica.drop()
        replica.offline_reason = reason

    def bring_online(self, name: str) -> None:
        """Put a replica back in service; the next syncs catch it up from its own newest record."""
        self._replicas[self._site(name)].offline_reason = None


class PostgresEFDChain(EFDChain):
    """The Summit PostgreSQL primary and its standbys (see the module docstring).

    Parameters
    ----------
    urls
        ``postgresql://…`` of the Summit primary and of the replicas it has (``Site.CHILE``, ``Site.US``).
        The US standby's ``primary_conninfo`` must name the Chilean standby (cascading replication).
    """

    def __init__(self, urls: Mapping[Site, str], *, connect_timeout: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:  # fmt: skip
        if Site.SUMMIT not in urls:
            raise ValueError("the PostgreSQL EFD needs the Summit primary's URL")
        for site, url in urls.items():
            if parse_url(url)[0].name != "postgresql":
                raise DatabaseError(f"the {site.value} EFD copy must be a postgresql:// URL on the PostgreSQL "
                                    "chain (use a directory for the embedded EFD)")  # fmt: skip
        summit = SummitEFD(urls[Site.SUMMIT], connect_timeout=connect_timeout, clock=clock)
        replicas: dict[Site, _Replica] = {
            s: _Replica(s, u, connect_timeout, migrate=False) for s, u in urls.items() if s is not Site.SUMMIT
        }
        super().__init__(summit, replicas, clock)

    def sync(self) -> dict[Site, int]:
        with self._lock:
            if Site.US in self._replicas:
                try:
                    self._apply_following()  # a restarted US standby comes back replaying: pause it again
                except DatabaseError as exc:
                    self._report(Site.US, "replay control", exc)
                else:
                    self._report(Site.US, "replay control", None)
        return {}

    def _apply_following(self) -> None:
        replica = self._replicas.get(Site.US)
        if replica is None:
            return
        try:
            with replica.database().write() as tx:
                paused = tx.execute("SELECT pg_is_wal_replay_paused()").fetchone()
                if paused is not None and bool(paused[0]) == self._following:
                    tx.execute("SELECT pg_wal_replay_resume()" if self._following else "SELECT pg_wal_replay_pause()")
        except DatabaseError:
            replica.drop()
            raise

    def _ping(self, replica: _Replica, timeout: float) -> None:
        db = Database(replica.url, connect_timeout=timeout)
        try:
            with db.read() as tx:
                row = tx.execute("SELECT pg_is_in_recovery()").fetchone()
        finally:
            db.close()
        if not (row and row[0]):
            raise DatabaseError(f"{db.url} is not a standby (pg_is_in_recovery() is false); it cannot be the "
                                f"{replica.site.value} replica")  # fmt: skip

    def _bytes_behind(self, replica: _Replica, log_bytes: int) -> int:
        with self.summit.db.read() as tx:
            row = tx.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        with replica.database().read() as tx:
            diff = tx.execute("SELECT pg_wal_lsn_diff(?::pg_lsn, pg_last_wal_replay_lsn())", (row[0],)).fetchone()
        return max(0, int(diff[0])) if diff and diff[0] is not None else 0


def open_efd(target: str | Path, replicas: Mapping[str, str] | None = None) -> EFDChain:
    """The EFD at ``target``: a directory (the embedded chain) or the Summit's ``postgresql://`` URL.

    ``replicas`` maps ``chile_dac``/``us_dac`` to the standbys' URLs (PostgreSQL only).

    Raises
    ------
    DatabaseError
        The EFD cannot be opened; ``replicas`` given for the embedded chain.
    ValueError
        A replica name is not ``chile_dac`` or ``us_dac``.
    """
    text = str(target)
    if text.startswith(("postgresql://", "postgres://")):
        urls = {Site.SUMMIT: text}
        for name, url in (replicas or {}).items():
            site = Site(name) if name in (Site.CHILE.value, Site.US.value) else None
            if site is None:
                raise ValueError(f"unknown EFD replica {name!r}: use chile_dac or us_dac")
            urls[site] = url
        return PostgresEFDChain(urls)
    if replicas:
        raise DatabaseError("replica URLs are for the PostgreSQL EFD; the embedded EFD keeps its replicas in "
                            f"{text} itself")  # fmt: skip
    return EmbeddedEFDChain(text[len("sqlite:///") :] if text.startswith("sqlite:///") else text)


def resolve_efd(explicit: str | None, environ: Mapping[str, str], default_dir: Path) -> str:
    """The EFD target: ``explicit`` > ``$LSSTPIPE_EFD`` > ``DEFAULT_DIR/efd`` (the embedded chain)."""
    if explicit:
        return explicit
    if environ.get(EFD_ENV):
        return str(environ[EFD_ENV])
    return str(Path(default_dir).expanduser() / "efd")
