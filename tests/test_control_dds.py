"""The OCS link over Cyclone DDS (issue 4, items 3-4): confined to loopback, the same scripted session over DDS
(``dmcs serve`` in a second process) and in-process gives the same transcript, unauthenticated and malformed
messages are rejected while the DMCS keeps serving, and ``dmcs serve`` shuts down cleanly on SIGINT/SIGTERM.

Skipped when ``cyclonedds`` is missing, except under ``CI=true``, where that is a failure."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import cyclonedds  # noqa: F401
except ImportError:
    if os.environ.get("CI") == "true":
        pytest.fail("cyclonedds is not installed, and under CI=true the DDS tests must run: install it with "
                    "pip install -e '.[dds]' (or pip install cyclonedds)", pytrace=False)  # fmt: skip
    pytest.skip("cyclonedds is not installed (pip install -e '.[dds]')", allow_module_level=True)

from control_support import config_root, make_harness
from lsstpipe.control import Codec, Command, CommandMessage, EntityName, OCSClient, create_secret, load_secret
from lsstpipe.control.cli_control import main
from lsstpipe.control.dds import (
    DEFAULT_DOMAIN,
    MAX_DOMAIN,
    DDSTransport,
    in_sender_order,
    loopback_config,
    unique_sender,
)
from lsstpipe.control.dmcs import wait_for
from lsstpipe.control.protocol import MAX_MESSAGE_BYTES
from lsstpipe.control.script import comparable, parse_script, play
from lsstpipe.control.transport import Topic

SERVE = [sys.executable, "-m", "lsstpipe.control.cli_control", "dmcs", "serve"]

#: Far enough apart for the same outcome on both transports; stop and abort land inside the 5 s configures.
SESSION = [
    {"at": 0.0, "entity": "archiver", "command": "init"},
    {"at": 0.0, "entity": "efd_replicator", "command": "init"},
    {"at": 0.05, "entity": "archiver", "command": "configure", "config": "fast"},
    {"at": 0.05, "entity": "efd_replicator", "command": "configure", "config": "slow"},
    {"at": 0.10, "entity": "efd_replicator", "command": "enable"},
    {"at": 0.15, "entity": "efd_replicator", "command": "stop"},
    {"at": 0.15, "entity": "archiver", "command": "configure", "config": "bad name"},
    {"at": 0.20, "entity": "archiver", "command": "enable"},
    {"at": 0.25, "event": "startIntegration", "visit": 1},
    {"at": 0.25, "entity": "alert_production_cluster", "command": "enable"},
    {"at": 0.30, "entity": "efd_replicator", "command": "configure", "config": "slow"},
    {"at": 0.35, "entity": "efd_replicator", "command": "abort"},
    {"at": 0.40, "entity": "efd_replicator", "command": "reset"},
    {"at": 0.45, "entity": "archiver", "command": "release"},
    {"at": 0.45, "entity": "catchup_archiver", "command": "stop"},
]  # fmt: skip


_USED_DOMAINS = {DEFAULT_DOMAIN}


def fresh_domain() -> int:
    """A domain no other test here (nor the default) uses, random so that parallel runs are unlikely to meet."""
    rng = random.SystemRandom()
    while True:
        d = rng.randrange(1, MAX_DOMAIN + 1)
        if d not in _USED_DOMAINS:
            _USED_DOMAINS.add(d)
            return d


def child_env() -> dict[str, str]:
    """The server's environment: loopback-only CYCLONEDDS_URI as a second guard (the transport passes its own)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LSSTPIPE_DDS_DOMAIN", "LSSTPIPE_SECRET_FILE")}
    env.update(CYCLONEDDS_URI=loopback_config(), PYTHONUNBUFFERED="1")
    return env


@dataclass
class Server:
    proc: subprocess.Popen[str]
    lines: queue.Queue[str]
    domain: int
    secret: Path
    root: Path

    def wait_line(self, text: str, timeout: float) -> str:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"dmcs serve printed no {text!r} within {timeout} s") from None
            if text in line:
                return line

    def stop(self, signum: int, timeout: float = 15.0) -> tuple[int, str]:
        self.proc.send_signal(signum)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"dmcs serve did not stop within {timeout} s of signal {signum}") from None
        self.wait_line("Base DMCS stopped", 5.0)
        assert self.proc.stderr is not None
        return rc, self.proc.stderr.read()


def start_server(tmp: Path, root: Path) -> Server:
    tmp.mkdir(parents=True, exist_ok=True)
    secret = tmp / "ocs.secret"
    create_secret(secret)
    assert secret.stat().st_mode & 0o777 == 0o600
    domain = fresh_domain()
    argv = [*SERVE, "--domain", str(domain), "--secret", str(secret), "--config-root", str(root),
            "--state-dir", str(tmp / "state")]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    server = Server(proc, lines, domain, secret, root)
    try:
        line = server.wait_line("serving on DDS domain", 30.0)
    except AssertionError:
        proc.kill()
        raise AssertionError(f"dmcs serve did not start: {proc.stderr.read() if proc.stderr else ''}") from None
    assert f"domain {domain} (127.0.0.1 only" in line
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One ``dmcs serve`` for the module; stopping it with SIGTERM is part of the test."""
    tmp = tmp_path_factory.mktemp("dds")
    srv = start_server(tmp / "server", config_root(tmp))
    yield srv
    if srv.proc.poll() is None:
        rc, err = srv.stop(signal.SIGTERM)
        assert rc == 0 and "Traceback" not in err, err


@pytest.fixture
def client(server):
    """An OCS client in this process on the server's domain, once the DMCS has been discovered."""
    transport = DDSTransport(server.domain, "test-ocs")
    ocs = OCSClient(transport, Codec(load_secret(server.secret)), sender=unique_sender("test"))
    try:
        transport.wait_for_peer(10.0, subscribes=(Topic.RESPONSE, Topic.ERROR))
        yield ocs
    finally:
        ocs.close()
        transport.close()


# ---- loopback only ---------------------------------------------------------------------------------------------
def test_configuration_allows_only_loopback():
    root = ET.fromstring(loopback_config())
    (domain,) = root.findall("Domain")
    interfaces = domain.findall("General/Interfaces/NetworkInterface")
    assert [i.attrib for i in interfaces] == [{"address": "127.0.0.1"}], "one interface, by the loopback address"
    assert domain.findtext("General/AllowMulticast") == "false"
    assert domain.findtext("General/DontRoute") == "true" and domain.findtext("General/Transport") == "udp"
    peers = domain.findall("Discovery/Peers/Peer")
    assert [p.attrib for p in peers] == [{"address": "127.0.0.1"}]
    assert domain.find("Discovery/Peers").get("AddLocalhost") == "false"
    assert not domain.findall(".//NetworkInterfaceAddress") and not domain.findall(".//SPDPMulticastAddress")
    assert "<Tracing>" not in loopback_config()


def test_transport_uses_lo_only_whatever_the_environment_says(tmp_path, monkeypatch):
    """The trace Cyclone writes shows the interfaces it selected; a CYCLONEDDS_URI in the environment (here a
    harmless one whose only difference is its own trace file) must not be read."""
    decoy = tmp_path / "decoy.log"
    monkeypatch.setenv("CYCLONEDDS_URI", loopback_config(decoy))
    trace = tmp_path / "trace.log"
    transport = DDSTransport(fresh_domain(), "trace", trace_file=trace)
    try:
        assert transport.config == loopback_config(trace)
        transport.self_test(5.0)
    finally:
        transport.close()
    text = trace.read_text()
    (selected,) = re.findall(r"selected interfaces: (.*)", text)
    assert re.findall(r"(\S+) \(index", selected) == ["lo"], selected
    assert re.findall(r"ownip: (\S+)", text) == ["udp/127.0.0.1"]
    assert "Domain/General/AllowMulticast/#text: false" in text and "Domain/General/DontRoute/#text: true" in text
    peers = re.findall(r"add_peer_address: add udp/([0-9.]+):", text)
    assert peers and set(peers) == {"127.0.0.1"}, peers
    assert not decoy.exists(), "the environment's CYCLONEDDS_URI was used"


def test_a_domain_opened_with_another_configuration_is_refused(tmp_path):
    domain = fresh_domain()
    first = DDSTransport(domain, "first", trace_file=tmp_path / "t.log")
    try:
        with pytest.raises(Exception, match="another configuration"):
            DDSTransport(domain, "second")
        second = DDSTransport(domain, "same", trace_file=tmp_path / "t.log")  # same configuration: shared
        second.close()
    finally:
        first.close()


def test_samples_taken_together_come_in_each_senders_order():
    def sample(origin, order, ts):
        return SimpleNamespace(origin=origin, order=order, sample_info=SimpleNamespace(source_timestamp=ts))

    # taken topic by topic: the error event (order 2) before the response (order 1) of the same sender
    batch = [(Topic.ERROR, sample("a", 2, 20)), (Topic.RESPONSE, sample("b", 1, 15)),
             (Topic.RESPONSE, sample("a", 1, 10)), (Topic.RESPONSE, sample("a", 3, 30))]  # fmt: skip
    got = [(s.origin, s.order) for _, s in in_sender_order(batch)]
    assert got == [("a", 1), ("b", 1), ("a", 2), ("a", 3)]


# ---- two processes -----------------------------------------------------------------------------------------------
def test_same_session_over_dds_and_in_process(server, tmp_path):
    script = tmp_path / "session.yaml"
    script.write_text(json.dumps(SESSION))  # JSON is YAML
    steps = parse_script(SESSION)
    h = make_harness(tmp_path / "inproc", root=server.root)
    try:
        in_process = comparable(play(steps, h.client))
    finally:
        h.close()
    out = tmp_path / "dds.jsonl"
    argv = ["ocs", "script", str(script), "--transcript", str(out), "--connect", "--domain", str(server.domain),
            "--secret", str(server.secret)]  # fmt: skip
    assert main(argv) == 1  # the session fails steps on purpose (two ABORTED, three FAILED): exit 1
    over_dds = comparable([json.loads(line) for line in out.read_text().splitlines()])
    assert over_dds == in_process
    # what the session exercised, so that the comparison is not vacuous
    results = {seq: [r[2] for r in rows] for seq, rows in over_dds.items()}
    assert len(results) == 14 and results[4] == ["ACK", "ABORTED"] and results[7] == ["FAILED"]
    assert results[5] == ["ACK", "FAILED"] and "busy" in over_dds[5][1][3]
    assert results[10] == ["ACK", "ABORTED"] and over_dds[11][1][4] == "ERROR"
    assert results[14] == ["ACK", "IGNORED"]
    assert server.proc.poll() is None


def test_unauthenticated_and_malformed_messages_are_rejected_and_the_dmcs_keeps_serving(server, client):
    forged = Codec(b"not-the-shared-secret-0123456789").encode(
        CommandMessage(9001, EntityName.ARCHIVER, Command.INIT, None, client.sender)
    )
    unsigned = json.dumps({"body": {"kind": "command", "seq": 9002, "entity": "archiver", "command": "init"}})
    body = {"kind": "command", "seq": 9003, "entity": "archiver", "command": "explode", "sender": client.sender}
    signed_nonsense = json.dumps({"body": body, "mac": client.codec.mac(body)})
    for data in (b"\xff not json", forged, unsigned.encode(), signed_nonsense.encode(),
                 b"x" * (MAX_MESSAGE_BYTES + 1)):  # fmt: skip
        client.send_raw(data)
    mine = [
        lambda e: e.code == "MalformedMessage" and "not a JSON message" in e.reason,
        lambda e: e.code == "AuthenticationError" and "does not verify" in e.reason and "9001" in e.reason,
        lambda e: e.code == "AuthenticationError" and "no MAC" in e.reason and "9002" in e.reason,
        lambda e: (
            e.code == "MalformedMessage" and e.seq == 9003 and e.sender == client.sender and "explode" in e.reason
        ),
        lambda e: e.code == "MalformedMessage" and "over the limit" in e.reason,
    ]
    assert wait_for(lambda: all(any(m(e) for e in list(client.errors)) for m in mine), 10.0), client.errors
    for e in client.errors:
        if "9001" in e.reason or "9002" in e.reason:
            assert e.seq is None and e.sender is None, "a claimed number of an unauthenticated message is not echoed"
    # still serving
    responses = client.wait(client.send(EntityName.CATCHUP_ARCHIVER, Command.STOP), 10.0)
    assert [r.result.value for r in responses] == ["ACK", "IGNORED"]
    assert server.proc.poll() is None


def test_cli_send_over_dds_and_its_errors(server, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("LSSTPIPE_SECRET_FILE", raising=False)
    monkeypatch.delenv("LSSTPIPE_DDS_DOMAIN", raising=False)
    connect = ["--connect", "--domain", str(server.domain), "--secret", str(server.secret)]
    assert main(["ocs", "send", "alert_production_cluster", "stop", *connect]) == 0
    assert [json.loads(x)["result"] for x in capsys.readouterr().out.splitlines()] == ["ACK", "IGNORED"]
    monkeypatch.setenv("LSSTPIPE_DDS_DOMAIN", str(server.domain))  # the environment names the domain
    assert main(["ocs", "send", "alert_production_cluster", "stop", "--connect", "--secret", str(server.secret)]) == 0
    capsys.readouterr()
    for argv, words in [
        (["ocs", "send", "archiver", "init", "--connect", "--domain", str(server.domain)], "--secret FILE"),
        (["ocs", "send", "archiver", "init", "--domain", "3"], "--domain needs --connect"),
        (["ocs", "send", "archiver", "init", *connect, "--cluster", "c.yaml"], "--cluster is for an in-process"),
        (["ocs", "send", "archiver", "init", "--connect", "--domain", str(fresh_domain()), "--secret",
          str(server.secret), "--connect-timeout", "0.3"], "no Base DMCS answered on DDS domain"),
        (["ocs", "send", "archiver", "init", "--connect", "--domain", "999", "--secret", str(server.secret)],
         "out of range"),
        (["dmcs", "serve", "--domain", "7"], "--secret FILE"),
    ]:  # fmt: skip
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv
    loose = tmp_path / "loose.secret"
    create_secret(loose)
    loose.chmod(0o644)
    assert main(["dmcs", "serve", "--secret", str(loose)]) == 2 and "chmod 600" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_shuts_down_cleanly(tmp_path, signum):
    srv = start_server(tmp_path / "srv", config_root(tmp_path))
    rc, err = srv.stop(signum)
    assert rc == 0, err
    assert "Traceback" not in err and "Base DMCS booted" in err


@pytest.mark.parametrize("argv", [["dmcs", "serve"], ["ocs", "send"], ["ocs", "script"]])
def test_help_shows_the_dds_options(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--domain" in out and ("--connect" in out or argv[0] == "dmcs")
