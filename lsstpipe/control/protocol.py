"""The asynchronous command protocol between the OCS and the Base DMCS, and its authentication.

Messages
--------
The OCS sends :class:`CommandMessage` s, each with a sequence number unique for its sender. The DMCS
answers every well-formed, authenticated command with a :class:`Response` ``ACK`` and then exactly one
final :class:`Response` (COMPLETE, FAILED with a reason, ABORTED, IGNORED); each response carries the
entity's state, configuration and enabled flag after it. A command that fails the format check (unknown
entity or command, a configure without a valid configuration argument, an argument to a command that takes
none) is not acknowledged: it gets one FAILED response and an :class:`ErrorEvent`. The DMCS also publishes
:class:`SummaryStateEvent` s on every change, :class:`ErrorEvent` s and :class:`Telemetry`; the OCS
publishes :class:`OCSEventMessage` s (nextVisit, startIntegration, …).

Wire format and authentication
------------------------------
A message is the JSON envelope ``{"body": BODY, "mac": HEX}``. ``BODY`` is a JSON object with a ``kind``
and the message's fields (enums by value). ``HEX`` is HMAC-SHA256, keyed with the shared secret, over the
canonical form of ``BODY``: ``json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)`` encoded as UTF-8. The MAC is checked (in constant time) before any field is interpreted.
Both directions are signed. The secret is read from a file that only its owner may read
(:func:`load_secret`); :func:`create_secret` makes one.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import os
import stat
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from lsstpipe.control.errors import AuthenticationError, MalformedMessage, SecretFileError
from lsstpipe.control.states import Command, CommandResult, EntityName, OCSEvent, SummaryState
from lsstpipe.control.transport import Topic

#: Largest message accepted, in bytes (anything bigger is malformed).
MAX_MESSAGE_BYTES = 64 * 1024


@dataclass(frozen=True)
class CommandMessage:
    """OCS → DMCS: one command to one entity."""

    seq: int
    entity: EntityName
    command: Command
    arg: str | None = None
    sender: str = "ocs"


@dataclass(frozen=True)
class Response:
    """DMCS → OCS: an acknowledgement or a final result, with the entity's status after it."""

    seq: int
    entity: EntityName
    command: Command
    result: CommandResult
    reason: str
    state: SummaryState
    configuration: str | None
    enabled: bool
    sender: str = "ocs"


@dataclass(frozen=True)
class SummaryStateEvent:
    """DMCS → OCS: an entity's status changed."""

    entity: EntityName
    state: SummaryState
    configuration: str | None
    enabled: bool


@dataclass(frozen=True)
class ErrorEvent:
    """DMCS → OCS: a failure; ``seq`` and ``sender`` are the command's when it was authenticated."""

    code: str
    reason: str
    retriable: bool
    entity: EntityName | None = None
    seq: int | None = None
    sender: str | None = None


@dataclass(frozen=True)
class Telemetry:
    """DMCS → OCS: one DM telemetry sample."""

    entity: EntityName
    name: str
    value: float


@dataclass(frozen=True)
class OCSEventMessage:
    """OCS → DMCS: an observatory event."""

    event: OCSEvent
    visit: int = 0
    exposure: int = 0


Message = CommandMessage | Response | SummaryStateEvent | ErrorEvent | Telemetry | OCSEventMessage

KINDS: dict[str, type] = {
    "command": CommandMessage,
    "response": Response,
    "summaryState": SummaryStateEvent,
    "error": ErrorEvent,
    "telemetry": Telemetry,
    "ocsEvent": OCSEventMessage,
}
_KIND_OF = {cls: kind for kind, cls in KINDS.items()}

#: The topic each kind of message travels on.
TOPIC_OF: dict[type, Topic] = {
    CommandMessage: Topic.COMMAND,
    Response: Topic.RESPONSE,
    SummaryStateEvent: Topic.SUMMARY_STATE,
    ErrorEvent: Topic.ERROR,
    Telemetry: Topic.TELEMETRY,
    OCSEventMessage: Topic.OCS_EVENT,
}


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes the MAC is computed over."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _to_json(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _from_json(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise MalformedMessage(f"field {name}: {value!r} is not one of {', '.join(m.value for m in tp)}") from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MalformedMessage(f"field {name}: expected an integer, got {type(value).__name__}")
    if not isinstance(value, tp):
        raise MalformedMessage(f"field {name}: expected {tp.__name__}, got {type(value).__name__}")
    return value


def body_of(msg: Message) -> dict[str, Any]:
    """The JSON body of a message (``kind`` plus its fields)."""
    body = {f.name: _to_json(getattr(msg, f.name)) for f in dataclasses.fields(msg)}
    body["kind"] = _KIND_OF[type(msg)]
    return body


def message_from_body(body: Any) -> Message:
    """Rebuild a message from a (verified) body; :class:`MalformedMessage` if anything is off."""
    if not isinstance(body, dict):
        raise MalformedMessage("the message body is not a JSON object")
    kind = body.get("kind")
    cls = KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MalformedMessage(f"unknown message kind {kind!r}; kinds are {', '.join(KINDS)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(body) - set(fields) - {"kind"})
    if unknown:
        raise MalformedMessage(f"unknown field(s) {', '.join(unknown)} in a {kind} message")
    kwargs = {}
    for name, f in fields.items():
        if name not in body:
            if f.default is dataclasses.MISSING:
                raise MalformedMessage(f"a {kind} message needs the field {name!r}")
            continue
        kwargs[name] = _from_json(body[name], hints[name], name)
    if "seq" in kwargs and kwargs["seq"] is not None and kwargs["seq"] < 1:
        raise MalformedMessage(f"field seq: must be a positive integer, got {kwargs['seq']}")
    return typing.cast(Message, cls(**kwargs))


class Codec:
    """Encode and sign, verify and decode messages with a shared secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise SecretFileError("the shared secret must be at least 16 bytes")
        self._secret = secret

    def mac(self, body: dict[str, Any]) -> str:
        return hmac.new(self._secret, canonical(body), hashlib.sha256).hexdigest()

    def encode(self, msg: Message) -> bytes:
        body = body_of(msg)
        return json.dumps({"body": body, "mac": self.mac(body)}, ensure_ascii=False).encode()

    def verify(self, data: bytes) -> dict[str, Any]:
        """The authenticated body of ``data`` (not yet validated as a message).

        Raises
        ------
        MalformedMessage
            Not a JSON envelope ``{"body": {...}, "mac": "..."}``, or too large.
        AuthenticationError
            No MAC or a MAC that does not verify with the shared secret.
        """
        if len(data) > MAX_MESSAGE_BYTES:
            raise MalformedMessage(f"message of {len(data)} bytes is over the limit of {MAX_MESSAGE_BYTES}")
        try:
            env = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MalformedMessage(f"not a JSON message: {exc}") from None
        if not isinstance(env, dict) or not isinstance(env.get("body"), dict):
            raise MalformedMessage('not a message envelope {"body": {...}, "mac": "..."}')
        if set(env) - {"body", "mac"}:
            raise MalformedMessage(f"unknown envelope field(s) {', '.join(sorted(set(env) - {'body', 'mac'}))}")
        mac = env.get("mac")
        if not isinstance(mac, str) or not mac:
            raise AuthenticationError("unauthenticated message: no MAC; sign messages with the shared secret")
        try:
            expected = self.mac(env["body"])
        except ValueError as exc:  # NaN or infinity in the body
            raise MalformedMessage(f"body cannot be put in canonical form: {exc}") from None
        if not hmac.compare_digest(mac, expected):
            raise AuthenticationError("unauthenticated message: the MAC does not verify; check that sender "
                                      "and DMCS use the same secret file")  # fmt: skip
        return typing.cast(dict[str, Any], env["body"])

    def decode(self, data: bytes) -> Message:
        """Verify, then rebuild the message (see :meth:`verify` and :func:`message_from_body`)."""
        return message_from_body(self.verify(data))


def peek_seq(data: bytes) -> int | None:
    """The sequence number a message claims, if it has a readable one (for log lines only: it may be forged)."""
    try:
        seq = json.loads(data.decode())["body"]["seq"]
    except Exception:
        return None
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def load_secret(path: str | os.PathLike[str]) -> bytes:
    """Read the shared secret, refusing a file that anyone but its owner can read or write.

    Raises
    ------
    SecretFileError
        Missing, not a regular file, not owned by this user, group/other permissions, or empty.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise SecretFileError(f"secret file {p} does not exist; create one with 'lsstpipe ocs secret {p}' "
                              "(or point --secret at the right file)") from None  # fmt: skip
    if not stat.S_ISREG(st.st_mode):
        raise SecretFileError(f"secret file {p} is not a regular file")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise SecretFileError(f"secret file {p} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & 0o077:
        raise SecretFileError(f"secret file {p} can be accessed by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); make it private with 'chmod 600 {p}'")  # fmt: skip
    secret = p.read_bytes().strip()
    if len(secret) < 16:
        raise SecretFileError(f"secret file {p} holds {len(secret)} bytes; it needs at least 16 "
                              "(create a new one with 'lsstpipe ocs secret')")  # fmt: skip
    return secret


def create_secret(path: str | os.PathLike[str]) -> bytes:
    """Write a new random secret (64 hex digits) to ``path``, readable only by its owner; refuses to overwrite."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(32).hex().encode()
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretFileError(f"secret file {p} exists already; remove it first to make a new one") from None
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return secret
