"""Shared helpers of the control-plane tests: a booted in-process DMCS with an OCS client, fast configurations."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from lsstpipe.control import (
    BaseDMCS,
    Codec,
    Command,
    CommandResult,
    EntityName,
    InMemoryRecorder,
    InProcessTransport,
    LockoutFlag,
    OCSClient,
    Response,
    SimulatedCluster,
)
from lsstpipe.control.config import shipped_root

SECRET = b"0123456789abcdef0123456789abcdef"
ENTITIES = list(EntityName)

#: Pass as a value to :func:`write_config` to remove that key.
DROP = object()

#: A configuration of every entity whose mode applies to it (the shipped science one, except where noted).
BASE = {e: "science" for e in EntityName}


def write_config(root: Path, entity: EntityName, name: str, base: str | None = None, **changes) -> Path:
    """Copy a shipped configuration of ``entity`` to ``root/entity/name.yaml`` with ``changes`` applied."""
    data = yaml.safe_load((shipped_root() / entity.value / f"{base or BASE[entity]}.yaml").read_text())
    for key, value in changes.items():
        if value is DROP:
            data.pop(key, None)
        else:
            data[key] = value
    path = root / entity.value / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def config_root(tmp_path: Path) -> Path:
    """Per entity: ``fast`` and ``other`` (install 0.01 s) and ``slow`` (install 5 s, for stop/abort)."""
    root = tmp_path / "configs"
    for e in EntityName:
        write_config(root, e, "fast", install_seconds=0.01)
        write_config(root, e, "other", install_seconds=0.01)
        write_config(root, e, "slow", install_seconds=5.0)
    return root


@dataclass
class Harness:
    transport: InProcessTransport
    codec: Codec
    cluster: SimulatedCluster
    dmcs: BaseDMCS
    client: OCSClient
    recorder: InMemoryRecorder
    lockout: LockoutFlag
    root: Path

    def send(self, entity: EntityName, command: Command, arg: str | None = None) -> int:
        return self.client.send(entity, command, arg)

    def cmd(self, entity: EntityName, command: Command, arg: str | None = None, timeout: float = 5.0) -> list[Response]:
        """Send and wait for the final result; returns all responses (ACK first)."""
        return self.client.wait(self.send(entity, command, arg), timeout)

    def ok(self, entity: EntityName, command: Command, arg: str | None = None) -> None:
        final = self.cmd(entity, command, arg)[-1]
        assert final.result is CommandResult.COMPLETE, final

    def status(self, entity: EntityName) -> tuple[str, str | None, bool]:
        s = self.dmcs.entities[entity].status
        return s.state.value, s.configuration, s.enabled

    def settle(self) -> None:
        self.transport.flush()

    def wait_acked(self, seq: int, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while not self.client.responses.get(seq):
            assert time.monotonic() < end, f"no ACK for {seq}"
            time.sleep(0.002)

    def close(self) -> None:
        for e in self.dmcs.entities.values():
            if e.status.configuring:
                self.client.send(e.name, Command.STOP)
        self.client.close()
        self.dmcs.close()
        self.transport.close()


def make_harness(tmp_path: Path, cluster: SimulatedCluster | None = None, root: Path | None = None) -> Harness:
    transport = InProcessTransport("test")
    codec = Codec(SECRET)
    cluster = cluster or SimulatedCluster()
    recorder = InMemoryRecorder()
    lockout = LockoutFlag(tmp_path / "state")
    root = root or config_root(tmp_path)
    client = OCSClient(transport, codec)
    dmcs = BaseDMCS(transport, codec, cluster, lockout=lockout, config_root=root, recorder=recorder)
    dmcs.boot()
    return Harness(transport, codec, cluster, dmcs, client, recorder, lockout, root)
