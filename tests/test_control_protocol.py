"""The command protocol on the wire: HMAC authentication, strict decoding, the secret file, and a DMCS that
rejects bad messages with a reason and keeps serving."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from control_support import SECRET, config_root, make_harness
from lsstpipe.control import (
    AuthenticationError,
    Codec,
    Command,
    CommandMessage,
    CommandResult,
    EntityName,
    MalformedMessage,
    Response,
    SecretFileError,
    SummaryState,
    create_secret,
    load_secret,
)
from lsstpipe.control.protocol import body_of, canonical
from lsstpipe.control.transport import InProcessTransport, Topic

A = EntityName.ARCHIVER
codec = Codec(SECRET)


def signed(body: dict, key: bytes = SECRET) -> bytes:
    return json.dumps({"body": body, "mac": Codec(key).mac(body)}).encode()


def good_body(**changes) -> dict:
    body = body_of(CommandMessage(1, A, Command.INIT))
    body.update(changes)
    return body


def test_round_trip_of_every_kind():
    msg = Response(3, A, Command.CONFIGURE, CommandResult.ACK, "", SummaryState.IDLE, None, False)
    assert codec.decode(codec.encode(msg)) == msg
    cmd = CommandMessage(4, EntityName.EFD_REPLICATOR, Command.CONFIGURE, "daytime", "ocs-2")
    assert codec.decode(codec.encode(cmd)) == cmd


def test_mac_is_over_the_canonical_body():
    body = good_body()
    reordered = dict(reversed(list(body.items())))
    assert canonical(body) == canonical(reordered)
    data = json.dumps({"mac": codec.mac(body), "body": reordered}, indent=3).encode()
    assert codec.decode(data) == CommandMessage(1, A, Command.INIT)


@pytest.mark.parametrize(
    "data, error, words",
    [
        (b"\xff\xfe", MalformedMessage, "not a JSON message"),
        (b"{not json", MalformedMessage, "not a JSON message"),
        (b"[1, 2]", MalformedMessage, "envelope"),
        (json.dumps({"body": good_body()}).encode(), AuthenticationError, "no MAC"),
        (json.dumps({"body": good_body(), "mac": "00" * 32}).encode(), AuthenticationError, "does not verify"),
        (signed(good_body(), key=b"another secret of 32 bytes......"), AuthenticationError, "does not verify"),
        (
            json.dumps({"body": good_body(seq=2), "mac": codec.mac(good_body())}).encode(),
            AuthenticationError,
            "does not verify",
        ),
        (
            json.dumps({"body": good_body(), "mac": codec.mac(good_body()), "x": 1}).encode(),
            MalformedMessage,
            "unknown envelope",
        ),
        (signed(good_body(seq="1")), MalformedMessage, "field seq: expected an integer"),
        (signed(good_body(seq=True)), MalformedMessage, "field seq: expected an integer"),
        (signed(good_body(seq=0)), MalformedMessage, "positive"),
        (signed(good_body(entity="camera")), MalformedMessage, "field entity: 'camera' is not one of"),
        (signed(good_body(command="explode")), MalformedMessage, "field command"),
        (signed(good_body(kind="mystery")), MalformedMessage, "unknown message kind"),
        (signed(good_body(extra=1)), MalformedMessage, "unknown field(s) extra"),
        (signed({k: v for k, v in good_body().items() if k != "seq"}), MalformedMessage, "needs the field 'seq'"),
        (b'{"body": {"seq": NaN}, "mac": "aa"}', MalformedMessage, "canonical form"),
        (b" " * 70000, MalformedMessage, "over the limit"),
    ],
)
def test_decode_rejects(data, error, words):
    with pytest.raises(error, match=None) as info:
        codec.decode(data)
    assert words in str(info.value)


@pytest.fixture
def harness(tmp_path_factory, tmp_path):
    h = make_harness(tmp_path, root=config_root(tmp_path_factory.mktemp("c")))
    yield h
    h.close()


#: (bytes, error code, seq echoed in the error event: only for authenticated messages)
BAD = {
    "garbage": (b"\x00\x01garbage", "MalformedMessage", None),
    "unsigned": (json.dumps({"body": good_body(seq=41)}).encode(), "AuthenticationError", None),
    "wrong-key": (signed(good_body(seq=42), key=b"x" * 32), "AuthenticationError", None),
    "unknown-entity": (signed(good_body(seq=43, entity="camera")), "MalformedMessage", 43),
    "not-a-command": (
        signed(body_of(Response(44, A, Command.INIT, CommandResult.COMPLETE, "", SummaryState.IDLE, None, True))),
        "MalformedMessage",
        44,
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_dmcs_rejects_bad_messages_and_keeps_serving(harness, case, caplog):
    data, code, seq = BAD[case]
    harness.client.send_raw(data)
    harness.settle()
    errors = [e for e in harness.client.errors if e.code == code]
    assert len(errors) == 1 and errors[0].reason and errors[0].seq == seq
    assert [r["code"] for r in harness.recorder.of_kind("rejected")] == [code]
    assert harness.recorder.of_kind("command") == [] and not any(harness.client.responses.values())
    assert any("rejected a message" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert harness.status(A) == ("OFFLINE", None, False), "no state change"
    harness.ok(A, Command.INIT)  # and it keeps serving


def test_unauthenticated_command_gets_no_echo_of_its_claimed_seq(harness):
    """A forged message must not be able to cancel a real sender's pending command by naming its seq."""
    seq = harness.client.next_seq()
    harness.client.send_raw(json.dumps({"body": body_of(CommandMessage(seq, A, Command.INIT)), "mac": "bad"}).encode())
    with pytest.raises(TimeoutError, match="same secret"):
        harness.client.wait(seq, 0.2)
    (error,) = harness.client.errors
    assert (error.code, error.seq, error.sender) == ("AuthenticationError", None, None)
    assert f"claimed seq {seq}" in error.reason
    assert harness.status(A) == ("OFFLINE", None, False)


def test_authenticated_but_malformed_command_finishes_the_senders_wait(harness):
    seq = harness.client.next_seq()
    harness.client.send_raw(signed(good_body(seq=seq, command="explode")))
    assert harness.client.wait(seq, 2.0) == []
    assert harness.client.rejections[seq].code == "MalformedMessage"


def test_format_check_failures_are_not_acknowledged(harness):
    for command, arg, words in [
        (Command.CONFIGURE, None, "configure needs a configuration"),
        (Command.CONFIGURE, "no good!", "has characters other than"),
        (Command.INIT, "now", "init takes no argument"),
    ]:
        responses = harness.cmd(A, command, arg)
        assert [r.result for r in responses] == [CommandResult.FAILED] and words in responses[0].reason
    harness.settle()
    assert [e.code for e in harness.client.errors] == ["MalformedMessage"] * 3
    harness.ok(A, Command.INIT)


def test_replayed_sequence_number_is_rejected(harness):
    data = codec.encode(CommandMessage(900, A, Command.INIT))
    harness.client.send_raw(data)
    harness.client.send_raw(data)
    harness.settle()
    assert [e.code for e in harness.client.errors] == ["MalformedMessage"]
    assert "duplicate sequence number 900" in harness.client.errors[0].reason
    assert len(harness.recorder.of_kind("command")) == 1


def test_a_crashing_handler_is_reported_not_fatal(harness, monkeypatch):
    def boom(*args, **kw):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(harness.dmcs.entities[A], "transition", boom)
    harness.client.send(A, Command.INIT)
    harness.settle()
    assert any("simulated bug" in e.reason for e in harness.client.errors)
    harness.ok(EntityName.EFD_REPLICATOR, Command.INIT)


def test_client_drops_unsigned_responses(harness):
    seq = harness.client.next_seq()
    forged = Response(seq, A, Command.INIT, CommandResult.COMPLETE, "", SummaryState.IDLE, None, False)
    harness.transport.publish(Topic.RESPONSE, Codec(b"y" * 32).encode(forged))
    harness.settle()
    assert harness.client.responses[seq] == [] and harness.client.unverified == 1


def test_secret_file_permissions(tmp_path):
    p = tmp_path / "ocs.secret"
    secret = create_secret(p)
    assert oct(p.stat().st_mode & 0o777) == "0o600" and load_secret(p) == secret
    with pytest.raises(SecretFileError, match="exists already"):
        create_secret(p)
    for mode in (0o644, 0o640, 0o604, 0o660):
        os.chmod(p, mode)
        with pytest.raises(SecretFileError, match=f"mode {mode:04o}.*chmod 600"):
            load_secret(p)
    os.chmod(p, 0o400)
    assert load_secret(p) == secret
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    short.chmod(0o600)
    with pytest.raises(SecretFileError, match="at least 16"):
        load_secret(short)
    with pytest.raises(SecretFileError, match="does not exist"):
        load_secret(tmp_path / "missing")
    with pytest.raises(SecretFileError, match="not a regular file"):
        (tmp_path / "dir").mkdir(mode=0o700)
        load_secret(tmp_path / "dir")


def test_in_process_transport_order_isolation_and_self_test():
    t = InProcessTransport()
    got: list[bytes] = []

    def bad(data: bytes) -> None:
        raise RuntimeError("subscriber bug")

    t.subscribe(Topic.TELEMETRY, bad)
    sub = t.subscribe(Topic.TELEMETRY, got.append)
    for i in range(100):
        t.publish(Topic.TELEMETRY, b"%d" % i)
    t.self_test(1.0)
    assert t.flush() and got == [b"%d" % i for i in range(100)], "in order, despite the failing subscriber"
    sub.cancel()
    t.publish(Topic.TELEMETRY, b"late")
    assert t.flush() and got[-1] == b"99"
    with pytest.raises(TypeError):
        t.publish("telemetry", b"x")  # type: ignore[arg-type]
    t.close()


def test_flush_waits_for_what_deliveries_publish_in_turn():
    """The replay test's race: the DMCS's error event is published while the command is delivered, behind the
    flush marker; flush must come back only once that event has been delivered too."""
    t = InProcessTransport()
    gate = threading.Event()
    errors: list[bytes] = []

    def dmcs(data: bytes) -> None:
        gate.wait(5)  # the delivery thread is busy until flush has queued its marker
        t.publish(Topic.ERROR, b"rejected " + data)

    def ocs(data: bytes) -> None:
        time.sleep(0.05)  # a slow subscriber: an early return from flush would find nothing yet
        errors.append(data)

    t.subscribe(Topic.COMMAND, dmcs)
    t.subscribe(Topic.ERROR, ocs)
    t.publish(Topic.COMMAND, b"1")
    t.publish(Topic.COMMAND, b"2")
    threading.Timer(0.2, gate.set).start()
    other = threading.Thread(target=t.flush)  # a second flush at the same time ends too, and does not livelock
    other.start()
    assert t.flush(5.0)
    assert errors == [b"rejected 1", b"rejected 2"]
    other.join(5)
    assert not other.is_alive()
    t.close()


def test_odd_claimed_seq_and_sender_are_not_echoed(harness):
    harness.client.send_raw(signed(good_body(seq=True, sender=3)))
    harness.settle()
    (error,) = harness.client.errors
    assert (error.code, error.seq, error.sender) == ("MalformedMessage", None, None)
    assert harness.client.unverified == 0, "the error event itself decodes"
