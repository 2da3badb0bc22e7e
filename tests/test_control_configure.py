"""Configure, phase by phase: every failure branch leaves nothing changed; stop/abort mid-configure; enable
semantics of the four entities; the DM-engineering lockout; the cold boot."""

from __future__ import annotations

import time

import pytest

from control_support import DROP, ENTITIES, config_root, make_harness, write_config
from lsstpipe.control import (
    BaseDMCS,
    BootError,
    Codec,
    Command,
    CommandResult,
    EntityName,
    InProcessTransport,
    OCSClient,
    OCSEvent,
    SimulatedCluster,
)
from lsstpipe.control.cluster import ClusterDescription, fake_software, software_checksum
from lsstpipe.control.config import Pool

C = Command
A, CU, EFD, APC = EntityName


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return config_root(tmp_path_factory.mktemp("configs"))


@pytest.fixture
def harness(tmp_path, root):
    h = make_harness(tmp_path, root=root)
    yield h
    h.close()


def enabled_with_fast(h, entity):
    for command, arg in [(C.INIT, None), (C.CONFIGURE, "fast"), (C.ENABLE, None)]:
        h.ok(entity, command, arg)
    assert h.status(entity) == ("IDLE", "fast", True)


def _altered(cluster):
    cluster.software["w.2026.48"] = {**cluster.software["w.2026.48"], "bin/lsstpipe": b"tampered"}


def _unregistered(cluster):
    del cluster.registered["w.2026.48"]


#: (entity, how to make the configure fail, expected words in the reason, error code, retriable)
FAILURES = {
    "unknown-key": (
        A,
        {"config": dict(replicator_parts=22)},
        "unknown key 'replicator_parts'",
        "ConfigurationError",
        False,
    ),
    "wrong-type": (APC, {"config": dict(workers="many")}, "workers: expected an integer", "ConfigurationError", False),
    "missing-key": (
        CU,
        {"config": dict(software_version=DROP)},
        "missing required key 'software_version'",
        "ConfigurationError",
        False,
    ),
    "mode-not-for-entity": (
        A,
        {"config": dict(mode="daytime")},
        "mode 'daytime' does not apply",
        "ConfigurationError",
        False,
    ),
    "inconsistent": (
        APC,
        {"config": dict(mode="calibration")},
        "pipeline.alerts is for science mode only",
        "ConfigurationError",
        False,
    ),
    "no-such-configuration": (EFD, {"name": "nightly"}, "no configuration file", "ConfigurationError", False),
    "other-entity-by-path": (
        A,
        {"path_of": APC},
        "configuration of the alert_production_cluster",
        "ConfigurationError",
        False,
    ),
    "software-missing": (
        A,
        {"config": dict(software_version="w.1999.01")},
        "w.1999.01 is not installed",
        "NotInstallable",
        False,
    ),
    "checksum-mismatch": (APC, {"cluster": _altered}, "fails its checksum", "NotInstallable", False),
    "checksum-unregistered": (EFD, {"cluster": _unregistered}, "no checksum registered", "NotInstallable", False),
    "too-few-pairs": (
        A,
        {"config": dict(replicator_pairs=29)},
        "needs 29 replicator/distributor pairs",
        "PrerequisiteError",
        True,
    ),
    "too-few-pairs-pool": (
        A,
        {"config": dict(pools=["local_only"])},
        "in local_only but only 4",
        "PrerequisiteError",
        True,
    ),
    "too-few-catchup-pairs": (
        CU,
        {"config": dict(catchup_pairs=5)},
        "needs 5 replicator/distributor pairs in catchup",
        "PrerequisiteError",
        True,
    ),
    "too-few-workers": (
        APC,
        {"config": dict(workers=401)},
        "needs 401 workers but only 400",
        "PrerequisiteError",
        True,
    ),
    "efd-unreachable": (
        EFD,
        {"cluster": lambda c: c.replicas.update(us_dac=False)},
        "'us_dac' did not answer",
        "PrerequisiteError",
        True,
    ),
    "efd-unknown-replica": (
        EFD,
        {"config": dict(us_replica="moon")},
        "no EFD replica 'moon'",
        "PrerequisiteError",
        True,
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failed_configure_changes_nothing(harness, tmp_path, case):
    entity, how, words, code, retriable = FAILURES[case]
    enabled_with_fast(harness, entity)
    installed_before = harness.cluster.installed[entity]
    subs_before = harness.dmcs.entities[entity].subscriptions()
    following_before = dict(harness.cluster.following)
    arg = how.get("name", "broken")
    if "config" in how:
        write_config(harness.root, entity, "broken", install_seconds=0.01, **how["config"])
    if "path_of" in how:
        arg = str(write_config(tmp_path, how["path_of"], "science", install_seconds=0.01))
    if "cluster" in how:
        how["cluster"](harness.cluster)
        arg = "other"
    responses = harness.cmd(entity, C.CONFIGURE, arg)
    assert [r.result for r in responses] == [CommandResult.ACK, CommandResult.FAILED]
    assert words in responses[-1].reason, responses[-1].reason
    assert harness.status(entity) == ("IDLE", "fast", True), "nothing changed: still enabled with the old one"
    assert harness.cluster.installed[entity] is installed_before and not harness.cluster.staged
    assert harness.dmcs.entities[entity].subscriptions() == subs_before
    assert harness.cluster.following == following_before
    harness.settle()
    errors = [e for e in harness.client.errors if e.seq == responses[-1].seq]
    assert [(e.code, e.retriable) for e in errors] == [(code, retriable)]
    assert [r["configuration"] for r in harness.recorder.of_kind("installed") if r["entity"] is entity] == ["fast"]
    # the DMCS keeps serving: the same entity still takes commands
    harness.ok(entity, C.DISABLE)


def test_configure_phases_ack_first_then_disable_then_complete(harness, root):
    write_config(root, A, "quarter", install_seconds=0.25)
    enabled_with_fast(harness, A)
    t0 = time.monotonic()
    seq = harness.send(A, C.CONFIGURE, "quarter")
    harness.wait_acked(seq)
    # the ACK came while the 0.25 s install ran: nothing else answered yet
    assert [r.result for r in harness.client.responses[seq]] == [CommandResult.ACK]
    responses = harness.client.wait(seq, 5.0)
    t_done = time.monotonic() - t0
    assert responses[0].configuration == "fast" and responses[0].enabled, "ACK before anything changed"
    assert t_done >= 0.25, t_done  # COMPLETE only after the install
    assert (responses[-1].result, responses[-1].configuration, responses[-1].enabled) == (
        CommandResult.COMPLETE,
        "quarter",
        False,
    )
    harness.settle()
    states = [(s.configuration, s.enabled) for s in harness.client.states if s.entity is A]
    assert states[-2:] == [("fast", False), ("quarter", False)], "disabled first, then installed"
    assert harness.cluster.installed[A].configuration == "quarter"
    assert harness.cluster.installed[A].checksum == software_checksum(fake_software("w.2026.48"))


@pytest.mark.parametrize("command", [C.STOP, C.ABORT], ids=lambda c: c.value)
def test_stop_or_abort_during_the_checks(harness, command, monkeypatch):
    enabled_with_fast(harness, A)
    checking = []
    real = harness.cluster.require_pairs

    def slow_pairs(*args, **kw):
        checking.append(1)
        time.sleep(0.3)
        return real(*args, **kw)

    monkeypatch.setattr(harness.cluster, "require_pairs", slow_pairs)
    seq = harness.send(A, C.CONFIGURE, "other")
    while not checking:
        time.sleep(0.002)
    harness.ok(A, command)
    assert harness.client.wait(seq, 2.0)[-1].result is CommandResult.ABORTED
    time.sleep(0.35)  # the checks end; their late outcome must change nothing
    harness.settle()
    want = ("ERROR" if command is C.ABORT else "IDLE", None, False)
    assert harness.status(A) == want
    assert A not in harness.cluster.installed and not harness.cluster.staged
    assert [r.result for r in harness.client.responses[seq]] == [CommandResult.ACK, CommandResult.ABORTED]


def test_software_altered_during_install_keeps_previous_configuration(harness, root):
    write_config(root, A, "quarter", install_seconds=0.2)
    enabled_with_fast(harness, A)
    seq = harness.send(A, C.CONFIGURE, "quarter")
    while A not in harness.cluster.staged:
        time.sleep(0.002)
    _altered(harness.cluster)
    final = harness.client.wait(seq, 5.0)[-1]
    assert final.result is CommandResult.FAILED and "previous configuration stays installed" in final.reason
    assert harness.status(A) == ("IDLE", "fast", False), "disabled as every configure ends, old configuration kept"
    assert harness.cluster.installed[A].configuration == "fast" and not harness.cluster.staged


def test_abort_while_enabled_keeps_taking_data(harness):
    enabled_with_fast(harness, A)
    harness.ok(A, C.ABORT)
    assert harness.status(A) == ("ERROR", "fast", True)
    harness.client.publish_event(OCSEvent.START_INTEGRATION, visit=7)
    harness.settle()
    assert [(r["entity"], r["n_jobs"]) for r in harness.recorder.of_kind("jobs")] == [(A, 22)]
    harness.ok(A, C.RESET)
    harness.client.publish_event(OCSEvent.START_INTEGRATION, visit=8)
    harness.settle()
    assert len(harness.recorder.of_kind("jobs")) == 1


@pytest.mark.parametrize(
    "entity, config, event, jobs",
    [
        (A, "science", OCSEvent.START_INTEGRATION, 22),
        (APC, "science", OCSEvent.NEXT_VISIT, 193),
        (APC, "calibration", OCSEvent.START_EXPOSURE, 193),
        (APC, "engineering", OCSEvent.START_EXPOSURE, 193),
        (APC, "daytime", None, 0),
        (CU, "science", None, 0),
        (EFD, "science", None, 0),
    ],
)
def test_enable_subscribes_and_disable_unsubscribes(harness, root, entity, config, event, jobs):
    write_config(root, entity, f"t-{config}", base=config, install_seconds=0.01)
    for command, arg in [(C.INIT, None), (C.CONFIGURE, f"t-{config}"), (C.ENABLE, None)]:
        harness.ok(entity, command, arg)
    assert harness.dmcs.entities[entity].subscriptions() == (frozenset({event}) if event else frozenset())
    for ev in OCSEvent:
        harness.client.publish_event(ev, visit=1)
    harness.settle()
    assert [r["n_jobs"] for r in harness.recorder.of_kind("jobs")] == ([jobs] if event else [])
    if entity is CU:
        assert harness.dmcs.entities[CU].scanning
    if entity is EFD:
        assert harness.cluster.following["us_dac"] is True
    assert harness.cluster.running(entity) == harness.cluster.batches
    harness.ok(entity, C.DISABLE)
    assert harness.dmcs.entities[entity].subscriptions() == frozenset()
    assert harness.cluster.running(entity) == harness.cluster.batches, "disable lets running jobs finish"
    harness.client.publish_event(event or OCSEvent.NEXT_VISIT, visit=2)
    harness.settle()
    assert len(harness.recorder.of_kind("jobs")) == (1 if event else 0)
    if entity is CU:
        assert not harness.dmcs.entities[CU].scanning
        assert [t.value for t in harness.client.telemetry if t.name == "scanning"] == [1.0, 0.0]
    if entity is EFD:
        assert harness.cluster.following["us_dac"] is False


def test_lockout_blocks_init_until_lifted(harness):
    harness.lockout.set("installing w.2026.49", user="dm-eng")
    final = harness.cmd(A, C.INIT)[-1]
    assert final.result is CommandResult.FAILED and "locked out by DM engineering" in final.reason
    assert "installing w.2026.49" in final.reason and "lockout off" in final.reason
    assert harness.status(A) == ("OFFLINE", None, False)
    harness.settle()
    assert [(e.code, e.retriable) for e in harness.client.errors] == [("LockedOut", True)]
    assert harness.lockout.clear()
    harness.ok(A, C.INIT)
    harness.lockout.set("again")
    harness.ok(A, C.RESET)  # the lockout blocks init only


def test_cold_boot_publishes_offline_for_every_entity(tmp_path, root):
    transport = InProcessTransport()
    codec = Codec(b"s" * 32)
    client = OCSClient(transport, codec)
    dmcs = BaseDMCS(transport, codec, config_root=root)
    dmcs.boot()
    transport.flush()
    assert [(s.entity, s.state.value, s.configuration, s.enabled) for s in client.states] == [
        (e, "OFFLINE", None, False) for e in ENTITIES
    ]
    dmcs.close()
    transport.close()


@pytest.mark.parametrize("broken", ["events", "ocs"])
def test_boot_self_test_failure_starts_nothing(broken):
    ocs, events = InProcessTransport("ocs"), InProcessTransport("events")
    (ocs if broken == "ocs" else events).broken = True
    dmcs = BaseDMCS(ocs, Codec(b"s" * 32), events=events, self_test_timeout=0.1)
    with pytest.raises(BootError, match="OCS link" if broken == "ocs" else "DM event transport"):
        dmcs.boot()
    assert dmcs.entities == {}
    ocs.close()
    events.close()


def test_cluster_description_yaml(tmp_path):
    p = tmp_path / "cluster.yaml"
    p.write_text("pairs_fully_operational: 2\nworkers: 10\naltered_versions: [w.2026.48]\n")
    c = SimulatedCluster.from_yaml(p)
    assert c.pairs[Pool.FULLY_OPERATIONAL] == 2 and c.workers == 10
    with pytest.raises(Exception, match="fails its checksum"):
        c.verify_software("w.2026.48")
    p.write_text("worker: 10\n")
    with pytest.raises(ValueError, match="unknown key 'worker'"):
        SimulatedCluster.from_yaml(p)
    assert ClusterDescription().workers == 400
