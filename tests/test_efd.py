"""The EFD and its replication chain Summit → Chilean DAC → US DAC, on both backends, and its EFD Replicator.

The embedded chain is three SQLite files fed by log shipping; the PostgreSQL chain is three real servers on
loopback ports (``tests/efd_support.py``: initdb, ``pg_basebackup -R``, the US standby cascading from the
Chilean one), started once for this module. Without PostgreSQL binaries those cases are skipped, except
under ``CI=true``, where they fail. Each test writes under topics of its own, so tests sharing the servers
do not see each other's records.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import efd_support
import pytest
from efd_support import PostgresChainServers, bindir_or_skip

from control_support import SECRET, config_root
from lsstpipe.control import (
    BaseDMCS,
    Codec,
    Command,
    CommandResult,
    EntityName,
    InProcessTransport,
    OCSClient,
    SimulatedCluster,
)
from lsstpipe.control.dmcs import wait_for
from lsstpipe.db import DatabaseError, EFDChain, EmbeddedEFDChain, PostgresEFDChain, Site, open_efd, ship_log
from lsstpipe.db.efd import EFDReader

EFD = EntityName.EFD_REPLICATOR
US, CHILE, SUMMIT = Site.US, Site.CHILE, Site.SUMMIT


@pytest.fixture(scope="module")
def pg_servers() -> Iterator[PostgresChainServers]:
    with PostgresChainServers(bindir_or_skip(os.environ)) as servers:
        yield servers


@dataclass
class Chain:
    """An EFD chain on one backend, with a way to stop and restart a replica."""

    efd: EFDChain
    servers: PostgresChainServers | None

    def stop(self, site: Site) -> None:
        if self.servers is not None:
            self.servers.stop_server(site)
        else:
            assert isinstance(self.efd, EmbeddedEFDChain)
            self.efd.take_offline(site.value, "stopped by the test")

    def start(self, site: Site) -> None:
        if self.servers is not None:
            self.servers.start_server(site)
        else:
            assert isinstance(self.efd, EmbeddedEFDChain)
            self.efd.bring_online(site.value)


@pytest.fixture(params=["sqlite", "postgresql"])
def chain(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chain]:
    if request.param == "sqlite":
        efd = EmbeddedEFDChain(tmp_path / "efd")
        yield Chain(efd, None)
        efd.close()
        return
    servers: PostgresChainServers = request.getfixturevalue("pg_servers")
    efd = PostgresEFDChain(servers.urls)
    try:
        yield Chain(efd, servers)
    finally:
        for site in (SUMMIT, CHILE, US):  # leave the shared servers up and replaying for the next test
            if not servers.running(site):
                servers.start_server(site)
        efd.set_following(US.value, True)
        efd.close()


def topic() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def write(efd: EFDChain, top: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        efd.summit.record_telemetry(top, "temperature", 10.0 + i)
    efd.summit.record_event(top, "shutter", {"open": True, "n": n})
    efd.summit.record_command("ocs", start + 1, "archiver", "init")


def snapshot(reader: EFDReader, top: str) -> tuple[list, list, list]:
    since = 0
    return reader.telemetry(top, since_lsn=since), reader.events(top), reader.commands(since_lsn=since)


# ---- the chain --------------------------------------------------------------------------------------------
def test_rows_written_at_the_summit_are_read_at_the_us_replica(chain: Chain) -> None:
    efd, top = chain.efd, topic()
    efd.set_following(US.value, True)
    write(efd, top, 20)
    lag = efd.wait_caught_up(US.value, 30.0)
    assert (lag.rows_behind, lag.seconds_behind, lag.bytes_behind, lag.following) == (0, 0.0, 0, True)
    got = efd.read(lambda r: snapshot(r, top))
    assert got.site is US and got.fallbacks == ()
    assert got.value == snapshot(efd.summit.reader, top)  # the same rows: lsn, time stamp and values
    samples = got.value[0]
    assert [s.value for s in samples] == [10.0 + i for i in range(20)]
    assert got.value[1][0].data == {"open": True, "n": 20}


def test_reads_fall_back_up_the_chain_and_a_stopped_replica_catches_up(
    chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    efd, top = chain.efd, topic()
    efd.set_following(US.value, True)
    write(efd, top, 5)
    efd.wait_caught_up(US.value, 30.0)
    chain.stop(US)
    with caplog.at_level(logging.WARNING, logger="lsstpipe.db.efd_replication"):
        got = efd.read(lambda r: r.telemetry(top))
    assert got.site is CHILE and len(got.value) == 5
    assert len(got.fallbacks) == 1 and got.fallbacks[0].startswith("us_dac: ")
    assert "fell back past the us_dac copy" in caplog.text
    write(efd, top, 5, start=5)  # written while the US replica is down
    efd.wait_caught_up(CHILE.value, 30.0)
    assert [s.value for s in efd.read(lambda r: r.telemetry(top)).value] == [10.0 + i for i in range(10)]
    chain.stop(CHILE)
    got = efd.read(lambda r: r.telemetry(top))
    assert got.site is SUMMIT and len(got.value) == 10
    assert [f.split(":")[0] for f in got.fallbacks] == ["us_dac", "chile_dac"]
    with pytest.raises(DatabaseError, match="chile_dac"):
        efd.ping(CHILE.value, 2.0)
    chain.start(CHILE)
    chain.start(US)
    lag = efd.wait_caught_up(US.value, 30.0)
    assert lag.rows_behind == 0
    got = efd.read(lambda r: snapshot(r, top))
    assert got.site is US and got.value == snapshot(efd.summit.reader, top)


def test_a_us_replica_not_following_lags_until_it_follows_again(chain: Chain) -> None:
    efd, top = chain.efd, topic()
    efd.set_following(US.value, True)
    write(efd, top, 3)
    efd.wait_caught_up(US.value, 30.0)
    efd.set_following(US.value, False)
    assert not efd.following
    write(efd, top, 7, start=3)
    efd.wait_caught_up(CHILE.value, 30.0)
    for _ in range(3):
        efd.sync()
    assert [s.value for s in efd.read(lambda r: r.telemetry(top)).value] == [10.0 + i for i in range(3)]
    lag = efd.lag(US.value)
    assert lag.following is False and lag.upstream is CHILE
    assert lag.rows_behind >= 9 and lag.summit_lsn - lag.applied_lsn == lag.rows_behind  # 7 samples, 1 event, 1 command
    assert lag.seconds_behind > 0 and lag.bytes_behind > 0
    assert efd.lag(CHILE.value).rows_behind == 0
    assert {k: v for k, v in lag.telemetry().items() if k.endswith("following")} == {"us_dac.following": 0.0}
    efd.set_following(US.value, True)
    efd.wait_caught_up(US.value, 30.0)
    assert len(efd.read(lambda r: r.telemetry(top)).value) == 10


def test_following_is_only_for_the_us_replica(chain: Chain) -> None:
    with pytest.raises(ValueError, match="only the US replica"):
        chain.efd.set_following(CHILE.value, False)
    with pytest.raises(ValueError, match="no replica 'mars_dac'"):
        chain.efd.ping("mars_dac", 1.0)
    chain.efd.ping(US.value, 5.0)


def test_following_cannot_be_turned_on_while_the_us_replica_is_down(chain: Chain) -> None:
    efd = chain.efd
    efd.set_following(US.value, False)
    chain.stop(US)
    with pytest.raises(DatabaseError):
        efd.set_following(US.value, True)
    assert efd.following is False  # unchanged
    try:
        efd.set_following(US.value, False)  # off is kept, and applied when the replica is back
    except DatabaseError:
        assert chain.servers is not None  # PostgreSQL says it could not pause the standby now
    assert efd.following is False
    chain.start(US)  # a restarted standby replays again, until the next sync pauses it
    top = topic()
    assert wait_for(lambda: efd.sync() is not None and efd.read(lambda r: r.last_lsn()).site is US, 30.0)
    write(efd, top, 3)
    efd.wait_caught_up(CHILE.value, 30.0)
    for _ in range(3):
        efd.sync()
    assert efd.read(lambda r: r.telemetry(top)).value == [] and efd.lag(US.value).rows_behind >= 5
    efd.set_following(US.value, True)
    efd.wait_caught_up(US.value, 30.0)


def test_the_summit_is_append_only(chain: Chain) -> None:
    top = topic()
    chain.efd.summit.record_telemetry(top, "x", 1.0)
    for statement in ("UPDATE telemetry SET value = 2", "DELETE FROM efd_log"):
        with pytest.raises(DatabaseError, match="append-only"):
            with chain.efd.summit.db.write() as tx:
                tx.execute(statement)
    assert [s.value for s in chain.efd.summit.reader.telemetry(top)] == [1.0]


def test_bad_records_are_refused_with_a_reason(tmp_path: Path) -> None:
    with EmbeddedEFDChain(tmp_path / "efd") as efd:
        for bad in (math.nan, math.inf):
            with pytest.raises(ValueError, match="must be finite"):
                efd.summit.record_telemetry("t", "x", bad)
        with pytest.raises(ValueError, match="plain JSON"):
            efd.summit.record_event("t", "x", {"when": object()})
        with pytest.raises(ValueError, match="unknown EFD table"):
            efd.summit.reader.count("commands; DROP TABLE efd_log")
        assert efd.summit.reader.last_lsn() == 0


# ---- the embedded chain's log shipping ----------------------------------------------------------------------
def test_log_shipping_is_idempotent_and_batched(tmp_path: Path) -> None:
    with EmbeddedEFDChain(tmp_path / "efd") as efd:
        top = topic()
        write(efd, top, 12)
        chile = efd._replicas[CHILE].database()
        assert ship_log(efd.summit.reader, chile, batch=5) == 5
        assert ship_log(efd.summit.reader, chile, batch=5) == 5
        assert ship_log(efd.summit.reader, chile, batch=5) == 4  # 12 samples + 1 event + 1 command
        assert ship_log(efd.summit.reader, chile) == 0
        # shipping the same records again (a retried shipment) changes nothing
        from lsstpipe.db.efd import apply_entries

        with chile.write() as tx:
            apply_entries(tx, efd.summit.reader.log(0))
        assert snapshot(EFDReader(chile), top) == snapshot(efd.summit.reader, top)
        assert EFDReader(chile).count("efd_log") == 14
        assert efd.sync() == {CHILE: 0}  # following is off: nothing shipped to the US
        assert EFDReader(efd._replicas[US].database()).last_lsn() == 0


def test_open_efd_checks_its_target(tmp_path: Path) -> None:
    with open_efd(tmp_path / "efd") as efd:
        assert isinstance(efd, EmbeddedEFDChain)
        assert sorted(p.name for p in (tmp_path / "efd").glob("*.sqlite3")) == [
            "chile_dac.sqlite3",
            "summit.sqlite3",
            "us_dac.sqlite3",
        ]
    (tmp_path / "file").write_text("")
    with pytest.raises(DatabaseError, match="is a file"):
        open_efd(tmp_path / "file")
    with pytest.raises(DatabaseError, match="replica URLs are for the PostgreSQL EFD"):
        open_efd(tmp_path / "efd", {"us_dac": "postgresql://u@127.0.0.1:1/d"})
    with pytest.raises(ValueError, match="unknown EFD replica 'mars'"):
        open_efd("postgresql://u@127.0.0.1:1/d", {"mars": "postgresql://u@127.0.0.1:2/d"})


def test_missing_postgres_binaries_skip_locally_and_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(efd_support, "find_bindir", lambda: None)
    with pytest.raises(pytest.skip.Exception):
        bindir_or_skip({})
    with pytest.raises(pytest.fail.Exception, match="CI=true but PostgreSQL server binaries"):
        bindir_or_skip({"CI": "true"})


def test_the_us_standby_cascades_from_the_chilean_one(pg_servers: PostgresChainServers) -> None:
    assert f"port={pg_servers.ports[CHILE]} " in pg_servers.upstream_of(US)
    assert f"port={pg_servers.ports[SUMMIT]} " in pg_servers.upstream_of(CHILE)
    with PostgresEFDChain(pg_servers.urls) as efd, pytest.raises(DatabaseError, match="read-only"):
        with efd._replicas[US].database().write() as tx:
            tx.execute("CREATE TABLE written_at_the_us (i INTEGER)")


# ---- the EFD Replicator drives the chain through the DMCS ---------------------------------------------------
def test_efd_replicator_enable_disable_turns_us_following_on_and_off(chain: Chain, tmp_path: Path) -> None:
    efd, top = chain.efd, topic()
    transport, codec = InProcessTransport("test"), Codec(SECRET)
    cluster = SimulatedCluster()
    dmcs = BaseDMCS(transport, codec, cluster, config_root=config_root(tmp_path), efd=efd, efd_monitor_interval=0.05)
    dmcs.boot()
    client = OCSClient(transport, codec)

    def ok(command: Command, arg: str | None = None) -> None:
        final = client.wait(client.send(EFD, command, arg), 10.0)[-1]
        assert final.result is CommandResult.COMPLETE, final

    def us_values() -> list[float] | None:
        """The samples at the US replica (None while it cannot answer: the reads went up the chain)."""
        got = efd.read(lambda r: r.telemetry(top))
        return [s.value for s in got.value] if got.site is US else None

    try:
        assert efd.following is False and cluster.following["us_dac"] is False  # attached: disabled, not following
        ok(Command.INIT)
        ok(Command.CONFIGURE, "fast")  # the prerequisite pings the real US replica
        ok(Command.ENABLE)
        assert efd.following and cluster.following["us_dac"]
        write(efd, top, 4)
        assert wait_for(lambda: us_values() == [10.0, 11.0, 12.0, 13.0], 30.0)
        ok(Command.DISABLE)
        assert not efd.following
        write(efd, top, 6, start=4)
        efd.wait_caught_up(CHILE.value, 30.0)
        n = len(client.telemetry)
        assert wait_for(lambda: len(client.telemetry) > n + 12, 10.0)  # two more monitor rounds
        assert us_values() == [10.0, 11.0, 12.0, 13.0]  # the rows written while disabled did not reach the US
        lag = {t.name: t.value for t in client.telemetry if t.entity is EFD}
        assert lag["efd.us_dac.following"] == 0.0 and lag["efd.us_dac.rows_behind"] >= 8
        assert lag["efd.us_dac.seconds_behind"] > 0 and "efd.chile_dac.rows_behind" in lag
        ok(Command.ENABLE)
        assert wait_for(lambda: us_values() == [10.0 + i for i in range(10)], 30.0)
        # everything crossing the OCS link went into the Summit EFD
        assert [c.command for c in efd.summit.reader.commands(entity=EFD.value)][-5:] == [
            "init", "configure", "enable", "disable", "enable"]  # fmt: skip
        states = efd.summit.reader.events("summaryState", EFD.value)
        assert states and states[-1].data["enabled"] is True
        assert efd.summit.reader.telemetry(EFD.value, "efd.us_dac.rows_behind")
        assert dmcs.efd_write_failures == 0
        # a US replica that does not answer: disable still disables (on PostgreSQL the pause cannot be sent
        # and is published as an error, then applied when the standby is back) ...
        chain.stop(US)
        ok(Command.DISABLE)
        assert dmcs.entities[EFD].status.enabled is False and efd.following is False
        if chain.servers is not None:
            assert wait_for(lambda: any("could not be switched off" in e.reason for e in client.errors), 5.0)
        # ... and it fails the configure's prerequisite and an enable, with the reason, changing nothing
        final = client.wait(client.send(EFD, Command.CONFIGURE, "other"), 20.0)[-1]
        assert final.result is CommandResult.FAILED and "EFD replica 'us_dac' did not answer" in final.reason
        assert dmcs.entities[EFD].status.configuration == "fast"  # nothing changed
        final = client.wait(client.send(EFD, Command.ENABLE), 20.0)[-1]
        assert final.result is CommandResult.FAILED and "could not be switched on" in final.reason
        assert dmcs.entities[EFD].status.enabled is False and efd.following is False
        chain.start(US)
    finally:
        client.close(), dmcs.close(), transport.close()


def test_a_failing_summit_efd_is_counted_never_raised_into_the_command_path(tmp_path: Path) -> None:
    efd = EmbeddedEFDChain(tmp_path / "efd")
    transport, codec = InProcessTransport("test"), Codec(SECRET)
    dmcs = BaseDMCS(transport, codec, config_root=config_root(tmp_path), efd=efd, efd_monitor_interval=10.0)
    dmcs.boot()
    client = OCSClient(transport, codec)
    try:
        efd.summit.close()  # the Summit EFD is gone
        assert client.wait(client.send(EFD, Command.INIT), 5.0)[-1].result is CommandResult.COMPLETE
        assert dmcs.efd_write_failures >= 3  # the command, its ACK and result, the state change
    finally:
        client.close(), dmcs.close(), transport.close(), efd.close()
