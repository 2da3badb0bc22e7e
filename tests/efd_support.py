"""Three real PostgreSQL servers on loopback for the EFD tests: Summit primary → Chile standby → US standby.

:class:`PostgresChainServers` runs ``initdb`` for the Summit, ``pg_basebackup -R`` from the Summit for the
Chilean standby and from the Chilean standby for the US standby (so that the US standby's
``primary_conninfo`` names the Chilean one: cascading replication), each on a free port of 127.0.0.1 with
its unix socket inside the chain's private directory. As root the servers run as the unprivileged
``postgres`` user. Passwords: SCRAM over TCP with a random password kept in a passfile only the server
user can read; trust on the unix sockets, which only that user (and root) can reach.

The binaries are looked up under ``/usr/lib/postgresql/*/bin`` (newest first), then on ``PATH``; when they
are missing the tests are skipped — except under ``CI=true``, where they fail (the rule of
``tests/db_support.py``: CI cannot pass by skipping).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import pytest

from lsstpipe.db.efd import Site

USER, DBNAME = "lsstpipe", "efd"
_TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "psql")


def find_bindir() -> Path | None:
    """The newest PostgreSQL ``bin`` folder holding every tool the chain needs, or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: [int(x) for x in d.split("/")[-2].split(".") if x.isdigit()])  # fmt: skip
    for d in reversed(candidates):
        if all(os.access(Path(d) / t, os.X_OK) for t in _TOOLS):
            return Path(d)
    found = shutil.which("initdb")
    if found and all(shutil.which(t) for t in _TOOLS):
        return Path(os.path.realpath(found)).parent
    return None


def bindir_or_skip(environ: Mapping[str, str]) -> Path:
    """The PostgreSQL binaries; skip without them, fail without them under CI=true."""
    found = find_bindir()
    if found is not None:
        return found
    message = (f"PostgreSQL server binaries ({', '.join(_TOOLS)}) not found under /usr/lib/postgresql/*/bin or on "
               "PATH: install PostgreSQL (e.g. apt-get install postgresql) to run the EFD replication cases")  # fmt: skip
    if environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {message}; CI must not skip them", pytrace=False)
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresChainServers:
    """Summit primary, Chilean hot standby (of the Summit) and US hot standby (of the Chilean one).

    Use as a context manager, or call :meth:`start` and :meth:`close`. :attr:`urls` gives the
    ``postgresql://`` URL of each site; :meth:`stop_server` / :meth:`start_server` stop and restart one.
    """

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.owner: str | None = None
        if os.geteuid() == 0:  # the server refuses to run as root: the users .ci/postgres.sh uses
            for user in ("postgres", "lsstpipe-pg"):
                try:
                    pwd.getpwnam(user)
                except KeyError:
                    continue
                self.owner = user
                break
            else:
                raise RuntimeError("as root, the EFD servers run as the unprivileged user 'postgres' (or "
                                   "'lsstpipe-pg'), and neither exists: useradd --system postgres") from None  # fmt: skip
        # Not under pytest's tmp_path: the server user must reach it (LSSTPIPE_PG_PARENT as in .ci/postgres.sh).
        self.root = Path(tempfile.mkdtemp(prefix="lsstpipe-efd-pg.", dir=os.environ.get("LSSTPIPE_PG_PARENT", "/tmp")))
        self.password = secrets.token_hex(16)
        self.ports: dict[Site, int] = {}
        self._running: set[Site] = set()

    # ---- plumbing --------------------------------------------------------------------------------------------
    def _run(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        cmd = [*(["runuser", "-u", self.owner, "--"] if self.owner else []), "env", f"PGPASSFILE={self.root / 'pgpass'}", *args]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def _tool(self, name: str) -> str:
        return str(self.bindir / name)

    def data(self, site: Site) -> Path:
        return self.root / site.value

    def _conninfo(self, site: Site) -> str:
        return f"host=127.0.0.1 port={self.ports[site]} user={USER} passfile={self.root / 'pgpass'}"

    @property
    def urls(self) -> dict[Site, str]:
        return {s: f"postgresql://{USER}:{self.password}@127.0.0.1:{p}/{DBNAME}" for s, p in self.ports.items()}

    def _options(self, site: Site) -> str:
        return (f"-c listen_addresses=127.0.0.1 -c port={self.ports[site]} -c unix_socket_directories={self.root / 'socket'} "
                "-c fsync=off -c synchronous_commit=off -c wal_level=replica -c max_wal_senders=8 -c hot_standby=on "
                "-c wal_receiver_status_interval=1s -c wal_retrieve_retry_interval=100ms -c wal_keep_size=64MB "
                "-c max_connections=40 -c shared_buffers=16MB -c checkpoint_timeout=30s")  # fmt: skip

    def start_server(self, site: Site) -> None:
        """Start ``site``'s server (again) on its port."""
        for attempt in range(5):
            if site not in self.ports or attempt:
                self.ports[site] = _free_port()
            proc = self._run(self._tool("pg_ctl"), "-D", str(self.data(site)), "-l", str(self.root / f"{site.value}.log"),
                             "-w", "-t", "60", "-o", self._options(site), "start", check=False)  # fmt: skip
            if proc.returncode == 0:
                self._running.add(site)
                return
        log = (self.root / f"{site.value}.log").read_text()[-2000:]
        raise RuntimeError(f"could not start the {site.value} PostgreSQL server: {log}")

    def running(self, site: Site) -> bool:
        """Whether ``site``'s server was started and not stopped since."""
        return site in self._running

    def stop_server(self, site: Site) -> None:
        """Stop ``site``'s server (fast shutdown)."""
        self._run(self._tool("pg_ctl"), "-D", str(self.data(site)), "-m", "fast", "-w", "stop", check=False)
        self._running.discard(site)

    def _sql(self, site: Site, statement: str) -> str:
        proc = self._run(self._tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.root / "socket"),
                         "-p", str(self.ports[site]), "-U", USER, "-d", DBNAME, "-c", statement)  # fmt: skip
        return proc.stdout.strip()

    def _standby(self, site: Site, source: Site) -> None:
        self._run(self._tool("pg_basebackup"), "-D", str(self.data(site)), "-R", "-X", "stream", "-c", "fast",
                  "-d", self._conninfo(source))  # fmt: skip
        # -R wrote standby.signal and a primary_conninfo naming ``source``; name this standby in it too.
        with open(self.data(site) / "postgresql.auto.conf", "a") as f:
            f.write(f"primary_conninfo = '{self._conninfo(source)} application_name={site.value}'\n")
        self.ports[site] = _free_port()
        self.start_server(site)

    # ---- life cycle ------------------------------------------------------------------------------------------
    def start(self) -> PostgresChainServers:
        try:
            (self.root / "socket").mkdir()
            pwfile, passfile = self.root / "pwfile", self.root / "pgpass"
            pwfile.write_text(self.password + "\n")
            passfile.write_text(f"127.0.0.1:*:*:{USER}:{self.password}\n")
            os.chmod(pwfile, 0o600), os.chmod(passfile, 0o600), os.chmod(self.root, 0o700)
            if self.owner:
                subprocess.run(["chown", "-R", self.owner, str(self.root)], check=True)
            self._run(self._tool("initdb"), "-D", str(self.data(Site.SUMMIT)), "-U", USER, f"--pwfile={pwfile}",
                      "--auth-host=scram-sha-256", "--auth-local=trust", "-E", "UTF8", "--locale=C.UTF-8")  # fmt: skip
            pwfile.unlink()
            self.start_server(Site.SUMMIT)
            self._sql_db("postgres", f"CREATE DATABASE {DBNAME}")
            self._standby(Site.CHILE, Site.SUMMIT)
            # A base backup from a standby starts at its next restartpoint: give it a checkpoint to replay.
            self._sql(Site.SUMMIT, "CHECKPOINT")
            self._wait_replayed(Site.CHILE, 60.0)
            self._standby(Site.US, Site.CHILE)
        except BaseException:
            self.close()
            raise
        return self

    def _sql_db(self, db: str, statement: str) -> None:
        self._run(self._tool("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", str(self.root / "socket"),
                  "-p", str(self.ports[Site.SUMMIT]), "-U", USER, "-d", db, "-c", statement)  # fmt: skip

    def _wait_replayed(self, site: Site, timeout: float) -> None:
        target = self._sql(Site.SUMMIT, "SELECT pg_current_wal_lsn()")
        end = time.monotonic() + timeout
        while self._sql(site, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn") != "t":
            if time.monotonic() > end:
                raise RuntimeError(f"the {site.value} standby did not replay up to {target} in {timeout:g} s")
            time.sleep(0.05)

    def upstream_of(self, site: Site) -> str:
        """The ``primary_conninfo`` ``site``'s standby runs with (as the server reports it)."""
        return self._sql(site, "SHOW primary_conninfo")

    def close(self) -> None:
        for site in (Site.US, Site.CHILE, Site.SUMMIT):
            if site in self._running:
                self.stop_server(site)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresChainServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
