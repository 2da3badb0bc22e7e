"""The Base DMCS: owns the four commandable entities, serves the OCS link, honours the DM-engineering lockout.

Cold boot (:meth:`BaseDMCS.boot`): a self test of the DM event transport and of the OCS link (each must
deliver a message to itself), then the four entities start with no configuration and each publishes
OFFLINE. From then on the DMCS:

- verifies every message on the command topic (:class:`~lsstpipe.control.protocol.Codec`); a malformed,
  unauthenticated or replayed (same sender and sequence number) message is logged, recorded, answered
  with an error event, and otherwise ignored — never an exception out of the delivery thread;
- format-checks the command: a bad one gets a single FAILED response; a good one is acknowledged (ACK)
  and handed to the entity's transition function, which publishes the final result;
- hands each OCS event to the entities subscribed to it, which launch their jobs;
- with a Summit EFD (``efd``, an :class:`lsstpipe.db.EFDChain`): records every accepted command, OCS
  event, response, state change, error and telemetry sample in it, drives its replicas from the EFD
  Replicator, and publishes the replicas' lag as EFD Replicator telemetry (``efd.<replica>.<quantity>``,
  e.g. ``efd.us_dac.rows_behind``) every ``efd_monitor_interval`` seconds. A failed EFD write is logged
  and counted (:attr:`BaseDMCS.efd_write_failures`), never raised into the command path;
  :meth:`BaseDMCS.lost_records` reports it with the recorder's failed writes (``dmcs serve`` prints them
  when it stops, ``lsstpipe night`` in its manifest).

A restarted DMCS comes up OFFLINE, but reseeds the (sender, sequence number) pairs already answered from
its recorder's history (:func:`~lsstpipe.control.recorder.seen_commands`), so a replay of an old command
is still rejected as a duplicate.

The lockout is a flag file (:class:`LockoutFlag`) that DM engineering sets with
``lsstpipe dmcs lockout on``; while it exists, ``init`` fails with its reason.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsstpipe.control.cluster import Installation, SimulatedCluster, batch_label
from lsstpipe.control.config import check_argument_format
from lsstpipe.control.entity import ENTITY_CLASSES, CommandableEntity, EntityStatus, Reply
from lsstpipe.control.errors import BootError, ConfigurationError, ControlError, MalformedMessage, MessageError
from lsstpipe.control.protocol import (
    TOPIC_OF,
    Codec,
    CommandMessage,
    ErrorEvent,
    Message,
    OCSEventMessage,
    Response,
    SummaryStateEvent,
    Telemetry,
    body_of,
    message_from_body,
    peek_seq,
)
from lsstpipe.control.recorder import ControlRecorder, InMemoryRecorder, seen_commands
from lsstpipe.control.states import Command, CommandResult, EntityName
from lsstpipe.control.transport import Topic, Transport

if TYPE_CHECKING:
    from lsstpipe.db.efd import ReplicationLag
    from lsstpipe.db.efd_replication import EFDChain

log = logging.getLogger(__name__)

#: Environment variable naming the state directory (lockout flag, secret).
STATE_DIR_ENV = "LSSTPIPE_STATE_DIR"


def resolve_state_dir(explicit: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The state directory: ``explicit`` > ``$LSSTPIPE_STATE_DIR`` > ``~/.lsstpipe`` (call in entry points)."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit).expanduser()
    if env.get(STATE_DIR_ENV):
        return Path(env[STATE_DIR_ENV]).expanduser()
    return Path.home() / ".lsstpipe"


class LockoutFlag:
    """DM engineering's lockout of OCS control: a JSON flag file ``dmcs.lockout`` in the state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / "dmcs.lockout"

    def info(self) -> dict[str, Any] | None:
        """The flag's contents (since, user, reason), or None when OCS control is not locked out."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        return data if isinstance(data, dict) else {"reason": "unreadable lockout flag", "since": "?", "user": "?"}

    def reason(self) -> str | None:
        """Why OCS control is locked out, or None."""
        info = self.info()
        if info is None:
            return None
        return f"since {info.get('since')} by {info.get('user')}: {info.get('reason')}"

    def set(self, reason: str, user: str | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "user": user or getpass.getuser(), "reason": reason or "no reason given"}  # fmt: skip
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, self.path)

    def clear(self) -> bool:
        """Lift the lockout; False if there was none."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            return False
        return True


class BaseDMCS:
    """The Base DM Control System (LDM-230 §2.1).

    Parameters
    ----------
    ocs
        The OCS link (DDS in operations, :class:`~lsstpipe.control.transport.InProcessTransport` in tests).
    codec
        Signs and verifies messages with the shared secret.
    cluster
        The simulated cluster (default: one the shipped configurations fit).
    events
        The DM event transport (default: the OCS link).
    lockout
        The DM-engineering lockout flag (default: never locked out).
    config_root
        Folder of the named configurations (default: the shipped ones).
    recorder
        Where commands, results and state changes are recorded (default: in memory). Its history, if it
        keeps one, reseeds the duplicate check at boot.
    efd
        The EFD chain to record into and whose replicas the EFD Replicator drives (default: none). The
        caller keeps ownership: :meth:`close` stops the lag monitor but does not close it.
    efd_monitor_interval
        Seconds between two replication steps and lag measurements of ``efd``.
    """

    def __init__(
        self,
        ocs: Transport,
        codec: Codec,
        cluster: SimulatedCluster | None = None,
        *,
        events: Transport | None = None,
        lockout: LockoutFlag | None = None,
        config_root: Path | None = None,
        recorder: ControlRecorder | None = None,
        self_test_timeout: float = 2.0,
        efd: EFDChain | None = None,
        efd_monitor_interval: float = 1.0,
    ) -> None:
        self.ocs = ocs
        self.events = events if events is not None else ocs
        self.codec = codec
        self.cluster = cluster if cluster is not None else SimulatedCluster()
        self.lockout = lockout
        self.config_root = config_root
        self.recorder: ControlRecorder = recorder if recorder is not None else InMemoryRecorder()
        self.self_test_timeout = self_test_timeout
        self.entities: dict[EntityName, CommandableEntity] = {}
        self._seen: set[tuple[str, int]] = set()
        self._subs: list[Any] = []
        self.efd = efd
        self.efd_monitor_interval = efd_monitor_interval
        self.efd_write_failures = 0
        self._efd_failures_lock = threading.Lock()

    # ---- life cycle -------------------------------------------------------------------------------------
    def boot(self) -> None:
        """Cold boot: self test, then every entity OFFLINE with no configuration (published).

        Raises
        ------
        BootError
            The DM event transport or the OCS link failed its self test, or the recorder's history of
            commands cannot be read (replays could not be recognised); nothing was started.
        """
        self.events.self_test(self.self_test_timeout, "DM event transport")
        self.ocs.self_test(self.self_test_timeout, "OCS link")
        try:
            self._seen = seen_commands(self.recorder)
        except Exception as exc:  # a DatabaseError or any failure of the recorder's store
            raise BootError(f"cannot read the commands already answered from the recorder ({exc}); fix the control "
                            "database and boot again (without them a replayed command would be accepted)") from None  # fmt: skip
        if self.efd is not None:
            if self.cluster.efd is not self.efd:
                self.cluster.attach_efd(self.efd)
            self.efd.start_monitor(self.efd_monitor_interval, self._publish_lag)
        lockout = self.lockout.reason if self.lockout is not None else (lambda: None)
        self.entities = {
            name: cls(self.cluster, self, lockout, self.config_root) for name, cls in ENTITY_CLASSES.items()
        }
        self._subs = [self.ocs.subscribe(Topic.COMMAND, self._on_command),
                      self.ocs.subscribe(Topic.OCS_EVENT, self._on_ocs_event)]  # fmt: skip
        for entity in self.entities.values():
            self.state(entity.name, entity.status)
        log.info("Base DMCS booted: %s OFFLINE", ", ".join(e.value for e in self.entities))

    def close(self) -> None:
        if self.efd is not None:
            self.efd.stop_monitor()
        for sub in self._subs:
            sub.cancel()
        self._subs = []
        for entity in self.entities.values():
            entity.wait_until_not_configuring(5.0)

    def lost_records(self) -> dict[str, int]:
        """Records that could not be written so far, per store: the recorder's (when it counts its
        ``write_failures``, as the control database does) and the Summit EFD's (when there is one)."""
        lost: dict[str, int] = {}
        failures = getattr(self.recorder, "write_failures", None)
        if isinstance(failures, int):
            lost["control database"] = failures
        if self.efd is not None:
            with self._efd_failures_lock:
                lost["Summit EFD"] = self.efd_write_failures
        return lost

    # ---- EntityOutput -----------------------------------------------------------------------------------
    def _publish(self, msg: Message) -> None:
        self.ocs.publish(TOPIC_OF[type(msg)], self.codec.encode(msg))
        if self.efd is None:
            return
        if isinstance(msg, Telemetry):
            self._to_efd("telemetry", lambda s: s.record_telemetry(msg.entity.value, msg.name, msg.value))
        elif isinstance(msg, Response | SummaryStateEvent | ErrorEvent):
            body = body_of(msg)
            topic = str(body.pop("kind"))
            name = msg.code if isinstance(msg, ErrorEvent) else msg.entity.value
            self._to_efd(topic, lambda s: s.record_event(topic, name, body))

    def _to_efd(self, what: str, write: Callable[[Any], object]) -> None:
        """Write one record to the Summit EFD; a failure is logged and counted, never raised."""
        assert self.efd is not None
        try:
            write(self.efd.summit)
        except Exception as exc:  # DatabaseError, or a value the EFD refuses
            with self._efd_failures_lock:
                self.efd_write_failures += 1
                lost = self.efd_write_failures
            log.error("Summit EFD: could not record a %s (%d lost so far): %s", what, lost, exc)

    def _publish_lag(self, lag: ReplicationLag) -> None:
        for name, value in lag.telemetry().items():
            self.telemetry(EntityName.EFD_REPLICATOR, f"efd.{name}", value)

    def reply(self, entity: EntityName, reply: Reply, status: EntityStatus) -> None:
        resp = Response(reply.seq, entity, reply.command, reply.result, reply.reason, status.state,
                        status.configuration, status.enabled, reply.sender)  # fmt: skip
        self._publish(resp)
        self.recorder.response_sent(resp)

    def state(self, entity: EntityName, status: EntityStatus) -> None:
        self._publish(SummaryStateEvent(entity, status.state, status.configuration, status.enabled))
        self.recorder.state_changed(entity, status.state, status.configuration, status.enabled)

    def error(self, entity: EntityName | None, exc: ControlError, seq: int | None, sender: str | None = None) -> None:
        self._publish(ErrorEvent(type(exc).__name__, str(exc), exc.retriable, entity, seq, sender))

    def telemetry(self, entity: EntityName, name: str, value: float) -> None:
        self._publish(Telemetry(entity, name, value))

    def installed(self, entity: EntityName, inst: Installation) -> None:
        self.recorder.configuration_installed(entity, inst.configuration, inst.software_version, inst.checksum)

    # ---- inbound ----------------------------------------------------------------------------------------
    def _reject(self, exc: ControlError, seq: int | None = None, sender: str | None = None) -> None:
        """Log, record and publish a rejected message; ``seq``/``sender`` only when it was authenticated."""
        log.warning("rejected a message (seq %s from %s): %s", seq, sender, exc)
        self.recorder.message_rejected(type(exc).__name__, str(exc), seq)
        self.error(None, exc, seq, sender)

    def _on_command(self, data: bytes) -> None:
        try:
            try:
                body = self.codec.verify(data)
            except MessageError as exc:  # not authenticated: whatever seq it claims may be forged, so not echoed
                claimed = peek_seq(data)
                self._reject(type(exc)(f"{exc} (claimed seq {claimed})") if claimed is not None else exc)
                return
            claimed_seq, claimed_sender = body.get("seq"), body.get("sender", "ocs")
            seq = claimed_seq if type(claimed_seq) is int and claimed_seq > 0 else None
            sender = claimed_sender if isinstance(claimed_sender, str) else None
            try:
                msg = message_from_body(body)
                if not isinstance(msg, CommandMessage):
                    raise MalformedMessage(f"a {type(msg).__name__} message on the command topic")
            except MessageError as exc:
                self._reject(exc, seq, sender)
                return
            key = (msg.sender, msg.seq)
            if key in self._seen:
                self._reject(MalformedMessage(f"duplicate sequence number {msg.seq} from {msg.sender!r}: "
                                              "a replay or a sender bug; send with a new number"), msg.seq, msg.sender)  # fmt: skip
                return
            self._seen.add(key)
            entity = self.entities[msg.entity]
            try:
                self._check_format(msg)
            except ControlError as exc:  # not acknowledged: one FAILED response, then the error event
                self.reply(msg.entity, Reply(msg.seq, msg.command, CommandResult.FAILED, str(exc), msg.sender),
                           entity.status)  # fmt: skip
                self._reject(exc, msg.seq, msg.sender)
                return
            self.recorder.command_received(msg)
            if self.efd is not None:
                self._to_efd("command", lambda s: s.record_command(msg.sender, msg.seq, msg.entity.value,
                                                                   msg.command.value, msg.arg))  # fmt: skip
            self.reply(msg.entity, Reply(msg.seq, msg.command, CommandResult.ACK, "", msg.sender), entity.status)
            entity.transition(msg.command, msg.seq, msg.arg, msg.sender)
        except Exception as exc:  # never let one message take the DMCS down
            log.exception("internal error while handling a command")
            self.error(None, ControlError(f"internal error while handling a command: {exc!r}"), None)

    @staticmethod
    def _check_format(msg: CommandMessage) -> None:
        if msg.command is Command.CONFIGURE:
            try:
                check_argument_format(msg.arg)
            except ConfigurationError as exc:
                raise MalformedMessage(str(exc)) from None
        elif msg.arg is not None:
            raise MalformedMessage(f"{msg.command.value} takes no argument (got {msg.arg!r})")

    def _on_ocs_event(self, data: bytes) -> None:
        try:
            try:
                msg = self.codec.decode(data)
                if not isinstance(msg, OCSEventMessage):
                    raise MalformedMessage(f"a {type(msg).__name__} message on the OCS event topic")
            except MessageError as exc:
                self._reject(exc)
                return
            handled = []
            for entity in self.entities.values():
                if msg.event in entity.subscriptions():
                    n = entity.jobs_for(msg.event)
                    label = batch_label(msg.event.value, msg.visit, msg.exposure)
                    # recorded first: a night's scheduler records each job's start as soon as the cluster has the
                    # batch, and a start whose batch is not recorded yet is lost ("not submitted")
                    self.recorder.jobs_submitted(entity.name, label, n)
                    self.cluster.submit(entity.name, label, n, event=msg)
                    self.telemetry(entity.name, "jobs_launched", float(n))
                    handled.append(entity.name)
            self.recorder.event_received(msg, handled)
            if self.efd is not None:
                payload = {"visit": msg.visit, "exposure": msg.exposure, "handled_by": [e.value for e in handled]}
                self._to_efd("OCS event", lambda s: s.record_event("ocs_event", msg.event.value, payload))
        except Exception as exc:
            log.exception("internal error while handling an OCS event")
            self.error(None, ControlError(f"internal error while handling an OCS event: {exc!r}"), None)


def wait_for(predicate: Any, timeout: float, interval: float = 0.005) -> bool:
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass (tests and tools)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(interval)
    return True
