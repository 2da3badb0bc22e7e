"""The whole command table of issue 4: every command in every state, for every entity.

The expected outcomes are written out here, independently of ``lsstpipe.control.entity.RULES``: for each
starting situation and command, the final result and the entity's (state, configuration, enabled) after
it. Every case also checks the protocol (ACK first, then exactly one final result), that a rejection
carries a reason and changes nothing, and that the cluster's installation agrees with the entity.
"""

from __future__ import annotations

import time

import pytest

from control_support import ENTITIES, config_root, make_harness
from lsstpipe.control import RULES, Command, CommandResult, EntityName, SummaryState

C = Command
#: Starting situations: how to reach them, and the status they leave.
SETUPS: dict[str, tuple[list[tuple[Command, str | None]], tuple[str, str | None, bool]]] = {
    "offline": ([], ("OFFLINE", None, False)),
    "idle": ([(C.INIT, None)], ("IDLE", None, False)),
    "idle_configured": ([(C.INIT, None), (C.CONFIGURE, "fast")], ("IDLE", "fast", False)),
    "idle_enabled": ([(C.INIT, None), (C.CONFIGURE, "fast"), (C.ENABLE, None)], ("IDLE", "fast", True)),
    "error": ([(C.INIT, None), (C.ABORT, None)], ("ERROR", None, False)),
    "error_configured": ([(C.INIT, None), (C.CONFIGURE, "fast"), (C.ABORT, None)], ("ERROR", "fast", False)),
    "error_enabled": (
        [(C.INIT, None), (C.CONFIGURE, "fast"), (C.ENABLE, None), (C.ABORT, None)],
        ("ERROR", "fast", True),
    ),
    "offline_configured": ([(C.INIT, None), (C.CONFIGURE, "fast"), (C.RELEASE, None)], ("OFFLINE", "fast", False)),
    "configuring": ([(C.INIT, None)], ("IDLE", None, False)),  # then a 5 s configure 'slow' is left running
}
ARG = {C.CONFIGURE: "other"}
FAILED, COMPLETE, IGNORED = CommandResult.FAILED, CommandResult.COMPLETE, CommandResult.IGNORED
IDLES = {"idle", "idle_configured", "idle_enabled"}
ERRORS = {"error", "error_configured", "error_enabled"}
OFFLINES = {"offline", "offline_configured"}


def expected(setup: str, command: Command) -> tuple[CommandResult, tuple[str, str | None, bool]]:
    """The table of issue 4, case by case (``before`` is unchanged for every rejection)."""
    before = SETUPS[setup][1]
    state, config, enabled = before
    if setup == "configuring":
        if command is C.STOP:
            return COMPLETE, ("IDLE", None, False)
        if command is C.ABORT:
            return COMPLETE, ("ERROR", None, False)
        return FAILED, before  # busy
    if command is C.INIT:
        return (COMPLETE, ("IDLE", config, False)) if setup in OFFLINES else (FAILED, before)
    if command is C.CONFIGURE:
        return (COMPLETE, ("IDLE", "other", False)) if setup in IDLES else (FAILED, before)
    if command is C.ENABLE:
        if setup in IDLES and config is not None:
            return COMPLETE, ("IDLE", config, True)
        return FAILED, before
    if command is C.DISABLE:
        return (COMPLETE, ("IDLE", config, False)) if setup in IDLES else (FAILED, before)
    if command is C.RELEASE:
        return (COMPLETE, ("OFFLINE", config, False)) if setup in IDLES | ERRORS else (FAILED, before)
    if command is C.STOP:
        return IGNORED, before
    if command is C.ABORT:
        return COMPLETE, ("ERROR", config, enabled)  # an enabled entity keeps taking data
    if command is C.RESET:
        return (COMPLETE, ("IDLE", None, False)) if setup in IDLES | ERRORS else (FAILED, before)
    raise AssertionError(command)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return config_root(tmp_path_factory.mktemp("configs"))


@pytest.fixture
def harness(tmp_path, root):
    h = make_harness(tmp_path, root=root)
    yield h
    h.close()


def reach(h, entity: EntityName, setup: str) -> None:
    for command, arg in SETUPS[setup][0]:
        final = h.cmd(entity, command, arg)[-1]
        assert final.result is COMPLETE, (setup, command, final)
    if setup == "configuring":
        seq = h.send(entity, C.CONFIGURE, "slow")
        h.wait_acked(seq)
        assert h.dmcs.entities[entity].status.configuring
    assert h.status(entity) == SETUPS[setup][1]


@pytest.mark.parametrize("command", list(Command), ids=lambda c: c.value)
@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("entity", ENTITIES, ids=lambda e: e.value)
def test_every_command_in_every_state(harness, entity, setup, command):
    reach(harness, entity, setup)
    result, after = expected(setup, command)
    responses = harness.cmd(entity, command, ARG.get(command))
    assert [r.result for r in responses] == [CommandResult.ACK, result], responses
    final = responses[-1]
    assert (final.state.value, final.configuration, final.enabled) == after
    assert harness.status(entity) == after
    if result is not COMPLETE:
        assert final.reason, "a rejection says why"
    if result is FAILED and setup == "configuring":
        assert "busy" in final.reason
    if setup == "configuring" and result is FAILED:  # the busy rejection changed nothing; end the configure
        assert harness.dmcs.entities[entity].status.configuring
        assert harness.cmd(entity, C.STOP)[-1].result is COMPLETE
        after = ("IDLE", None, False)
    # the cluster agrees with the entity, and nothing is left staged
    assert harness.dmcs.entities[entity].wait_until_not_configuring(5.0)
    installed = harness.cluster.installed.get(entity)
    assert (installed.configuration if installed else None) == after[1]
    assert entity not in harness.cluster.staged
    # no other entity was touched
    for other in ENTITIES:
        if other is not entity:
            assert harness.status(other) == ("OFFLINE", None, False)


@pytest.mark.parametrize("command", [C.STOP, C.ABORT], ids=lambda c: c.value)
def test_configure_interrupted_gets_aborted_and_nothing_more(harness, command):
    e = EntityName.ARCHIVER
    reach(harness, e, "idle_enabled")
    seq = harness.send(e, C.CONFIGURE, "slow")
    harness.wait_acked(seq)
    harness.cmd(e, command)
    got = harness.client.wait(seq, 1.0)
    # ABORTED within the wait: stop/abort cut the 5 s install short
    assert [r.result for r in got] == [CommandResult.ACK, CommandResult.ABORTED]
    assert command.value in got[-1].reason and "no configuration" in got[-1].reason
    harness.dmcs.entities[e].wait_until_not_configuring(5.0)
    time.sleep(0.05)
    harness.settle()
    assert [r.result for r in harness.client.responses[seq]] == [CommandResult.ACK, CommandResult.ABORTED]
    assert harness.dmcs.entities[e].subscriptions() == frozenset()


def test_rules_cover_every_command_and_stop_abort_everywhere():
    assert set(RULES) == set(Command)
    for command in (C.STOP, C.ABORT):
        assert RULES[command].allowed_from == frozenset(SummaryState) and RULES[command].while_configuring
    assert [c for c, r in RULES.items() if r.while_configuring] == [C.STOP, C.ABORT]


def test_random_command_storm_keeps_the_protocol_and_the_invariants(harness, root):
    """Commands fired at random without waiting (configures of 0.01 s and 5 s, stop/abort in between):
    every command gets ACK and exactly one final result, in that order; an entity is never enabled without
    a configuration; the cluster's installation always agrees with the entity; nothing is left staged."""
    import random

    rng = random.Random(4)
    commands = list(Command)
    seqs = []
    for _ in range(400):
        entity = rng.choice(ENTITIES)
        command = rng.choice(commands)
        arg = rng.choice(["fast", "other", "slow"]) if command is C.CONFIGURE else None
        seqs.append(harness.send(entity, command, arg))
        if rng.random() < 0.1:
            time.sleep(0.005)
    for e in ENTITIES:  # end any 5 s configure
        harness.send(e, C.STOP)
    harness.client.wait_all(10.0)
    for seq in seqs:
        results = [r.result for r in harness.client.responses[seq]]
        assert results[0] is CommandResult.ACK and len(results) == 2 and results[1].is_final, (seq, results)
    seen_final = [r.result for rs in harness.client.responses.values() for r in rs]
    assert CommandResult.ABORTED in seen_final and CommandResult.IGNORED in seen_final
    for e in ENTITIES:
        assert harness.dmcs.entities[e].wait_until_not_configuring(5.0)
        state, config, enabled = harness.status(e)
        assert config is not None or not enabled
        installed = harness.cluster.installed.get(e)
        assert (installed.configuration if installed else None) == config
    harness.settle()
    assert not harness.cluster.staged
    for s in harness.client.states:
        assert s.configuration is not None or not s.enabled
