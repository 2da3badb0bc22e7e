"""A Base DMCS restarted on the same control database: OFFLINE, history kept, replayed commands still rejected.

Also: what ``lsstpipe dmcs serve`` records into (the control database and the Summit EFD) and how it finds
them. The control database runs on SQLite and on PostgreSQL (``tests/db_support.py``: skipped locally
without ``$LSSTPIPE_TEST_PG_URL``, failed under ``CI=true``); the EFD here is the embedded chain.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from control_support import SECRET, config_root
from db_support import BACKENDS, backend_url
from lsstpipe.control import (
    BaseDMCS,
    BootError,
    Codec,
    Command,
    CommandMessage,
    CommandResult,
    EntityName,
    InMemoryRecorder,
    InProcessTransport,
    OCSClient,
    SimulatedCluster,
    SummaryState,
    cli_control,
)
from lsstpipe.control.dmcs import wait_for
from lsstpipe.control.recorder import seen_commands
from lsstpipe.db import ControlDatabase, DatabaseError, EFDChain, EmbeddedEFDChain

APC, ARCHIVER = EntityName.ALERT_PRODUCTION_CLUSTER, EntityName.ARCHIVER


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from backend_url(request.param, tmp_path, "control.sqlite3")


@dataclass
class Session:
    transport: InProcessTransport
    dmcs: BaseDMCS
    client: OCSClient
    database: ControlDatabase
    efd: EFDChain

    def close(self) -> None:
        self.client.close(), self.dmcs.close(), self.transport.close(), self.database.close(), self.efd.close()


def start(url: str, tmp_path: Path, sender: str = "ocs") -> Session:
    transport, codec, database = InProcessTransport("test"), Codec(SECRET), ControlDatabase(url)
    efd = EmbeddedEFDChain(tmp_path / "efd")
    dmcs = BaseDMCS(transport, codec, SimulatedCluster(job_seconds=0.01), config_root=tmp_path / "configs",
                    recorder=database, efd=efd, efd_monitor_interval=0.05)  # fmt: skip
    dmcs.boot()
    return Session(transport, dmcs, OCSClient(transport, codec, sender=sender), database, efd)


def send_keeping_bytes(s: Session, entity: EntityName, command: Command, arg: str | None = None) -> tuple[int, bytes]:
    """Send a command as the OCS would and keep its bytes (to replay them later)."""
    seq = s.client.next_seq()
    data = s.client.codec.encode(CommandMessage(seq, entity, command, arg, s.client.sender))
    s.client.send_raw(data)
    return seq, data


def test_restarted_dmcs_is_offline_keeps_its_history_and_rejects_replays(url: str, tmp_path: Path) -> None:
    config_root(tmp_path)
    s = start(url, tmp_path)
    try:
        sent = {}
        for command, arg in ((Command.INIT, None), (Command.CONFIGURE, "fast"), (Command.ENABLE, None)):
            seq, data = send_keeping_bytes(s, APC, command, arg)
            assert s.client.wait(seq, 5.0)[-1].result is CommandResult.COMPLETE
            sent[command] = data
        # a command refused at the format check: answered (FAILED) but never acknowledged nor run
        seq, bad = send_keeping_bytes(s, ARCHIVER, Command.ENABLE, "unexpected-argument")
        assert [r.result for r in s.client.wait(seq, 5.0)] == [CommandResult.FAILED]
        before = s.database.history(APC)
        efd_commands = s.efd.summit.reader.commands()
    finally:
        s.close()

    s = start(url, tmp_path, sender="ocs")  # the restart, on the same control database and EFD
    try:
        assert all(e.status.state is SummaryState.OFFLINE and not e.status.enabled for e in s.dmcs.entities.values())
        assert s.database.history(APC)[: len(before)] == before  # nothing lost
        assert [c.command for c in s.database.commands(APC)] == ["init", "configure", "enable"]
        assert s.efd.summit.reader.commands()[: len(efd_commands)] == efd_commands
        n_results = s.database.count("results")
        for data, seq in ((sent[Command.INIT], 1), (sent[Command.ENABLE], 3), (bad, 4)):
            s.client.send_raw(data)  # a byte-for-byte replay, correctly signed
            assert wait_for(lambda seq=seq: any(e.seq == seq and "duplicate sequence number" in e.reason
                                                for e in s.client.errors), 5.0)  # fmt: skip
        s.transport.flush()
        assert s.dmcs.entities[APC].status.state is SummaryState.OFFLINE  # the replayed init did nothing
        assert len(s.database.commands(APC)) == 3 and s.database.count("results") == n_results
        assert [r.seq for r in s.database.rejections() if "duplicate" in r.reason] == [1, 3, 4]
        # a new OCS session (a sender of its own) is served as usual, and recorded after the old history
        fresh = OCSClient(s.transport, s.client.codec, sender="ocs-after-restart")
        try:
            assert fresh.wait(fresh.send(APC, Command.INIT), 5.0)[-1].result is CommandResult.COMPLETE
        finally:
            fresh.close()
        assert s.dmcs.entities[APC].status.state is SummaryState.IDLE
        assert [c.sender for c in s.database.commands(APC)][-1] == "ocs-after-restart"
        assert s.efd.summit.reader.commands()[-1].sender == "ocs-after-restart"
        assert s.database.write_failures == 0 and s.dmcs.efd_write_failures == 0
    finally:
        s.close()


def test_boot_refuses_a_history_it_cannot_read(tmp_path: Path) -> None:
    database = ControlDatabase(tmp_path / "control.sqlite3")
    database.close()  # its history can no longer be read: replays could not be recognised
    dmcs = BaseDMCS(InProcessTransport("test"), Codec(SECRET), recorder=database)
    with pytest.raises(BootError, match="cannot read the commands already answered"):
        dmcs.boot()


def test_seen_commands_of_each_recorder(tmp_path: Path) -> None:
    memory = InMemoryRecorder()
    memory.command_received(CommandMessage(5, APC, Command.INIT, sender="a"))
    assert seen_commands(memory) == {("a", 5)}
    assert seen_commands(object()) == set()  # a recorder without history reseeds nothing
    with ControlDatabase(tmp_path / "control.sqlite3") as database:
        database.command_received(CommandMessage(7, APC, Command.INIT, sender="b"))
        assert seen_commands(database) == {("b", 7)}


# ---- lsstpipe dmcs serve: where it records -------------------------------------------------------------------
def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lsstpipe")
    cli_control.add_parsers(parser.add_subparsers(dest="command"))
    return parser.parse_args(["dmcs", "serve", *argv])


def test_dmcs_serve_records_into_the_control_database_and_the_efd(tmp_path: Path) -> None:
    state = tmp_path / "state"
    control, efd = cli_control.open_stores(serve_args("--state-dir", str(state)), {})
    try:  # defaults: both under the state directory
        assert control.db.url == f"sqlite:///{state / 'control.sqlite3'}"
        assert isinstance(efd, EmbeddedEFDChain) and efd.directory == state / "efd"
    finally:
        control.close(), efd.close()
    assert (state / "control.sqlite3").exists() and (state / "efd" / "us_dac.sqlite3").exists()
    env = {"LSSTPIPE_CONTROL_DB": str(tmp_path / "env.sqlite3"), "LSSTPIPE_EFD": str(tmp_path / "env-efd")}
    control, efd = cli_control.open_stores(serve_args("--state-dir", str(state)), env)
    control.close(), efd.close()
    assert (tmp_path / "env.sqlite3").exists() and (tmp_path / "env-efd" / "summit.sqlite3").exists()
    args = serve_args("--control-db", f"sqlite:///{tmp_path / 'flag.sqlite3'}", "--efd", str(tmp_path / "flag-efd"))
    control, efd = cli_control.open_stores(args, env)  # flags win over the environment
    control.close(), efd.close()
    assert (tmp_path / "flag.sqlite3").exists() and (tmp_path / "flag-efd" / "chile_dac.sqlite3").exists()
    with pytest.raises(ValueError, match="write SITE=URL"):
        cli_control.open_stores(serve_args("--state-dir", str(state), "--efd-replica", "us_dac"), {})
    with pytest.raises(DatabaseError, match="replica URLs are for the PostgreSQL EFD"):
        cli_control.open_stores(serve_args("--state-dir", str(state), "--efd-replica", "us_dac=postgresql://u@h/d"), {})
    with pytest.raises(ValueError, match="--efd-interval must be > 0"):
        cli_control.open_stores(serve_args("--state-dir", str(state), "--efd-interval", "0"), {})
