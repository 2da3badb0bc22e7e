"""The OCS side of the link: send commands and events, collect acknowledgements, results and events.

:class:`OCSClient` numbers its commands (1, 2, …), never waits for a result unless asked to
(:meth:`OCSClient.wait`), verifies everything the DMCS publishes with the shared secret, and keeps the
responses per sequence number. A command the DMCS rejected before acknowledging it (malformed,
unauthenticated, duplicate) is finished by the :class:`~lsstpipe.control.protocol.ErrorEvent` that
carries its sequence number.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lsstpipe.control.errors import MessageError
from lsstpipe.control.protocol import (
    Codec,
    CommandMessage,
    ErrorEvent,
    OCSEventMessage,
    Response,
    SummaryStateEvent,
    Telemetry,
)
from lsstpipe.control.states import Command, EntityName, OCSEvent
from lsstpipe.control.transport import Topic, Transport

log = logging.getLogger(__name__)

Listener = Callable[[Response | ErrorEvent, float], None]


class OCSClient:
    """Commands out, responses and events in (thread-safe)."""

    def __init__(
        self, transport: Transport, codec: Codec, sender: str = "ocs", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.transport = transport
        self.codec = codec
        self.sender = sender
        self.clock = clock
        self._seq = 0
        self._cond = threading.Condition()
        self.responses: dict[int, list[Response]] = {}
        self.rejections: dict[int, ErrorEvent] = {}
        self.errors: list[ErrorEvent] = []
        self.states: list[SummaryStateEvent] = []
        self.telemetry: list[Telemetry] = []
        self.unverified = 0
        self.listeners: list[Listener] = []
        self._subs = [transport.subscribe(Topic.RESPONSE, self._on_response),
                      transport.subscribe(Topic.ERROR, self._on_error),
                      transport.subscribe(Topic.SUMMARY_STATE, self._on_state),
                      transport.subscribe(Topic.TELEMETRY, self._on_telemetry)]  # fmt: skip

    def close(self) -> None:
        for s in self._subs:
            s.cancel()

    # ---- out ----------------------------------------------------------------------------------------------
    def next_seq(self) -> int:
        with self._cond:
            self._seq += 1
            self.responses[self._seq] = []
            return self._seq

    def send(self, entity: EntityName, command: Command, arg: str | None = None) -> int:
        """Send a command; returns its sequence number at once."""
        seq = self.next_seq()
        self.send_numbered(seq, entity, command, arg)
        return seq

    def send_numbered(self, seq: int, entity: EntityName, command: Command, arg: str | None = None) -> None:
        """Send a command with a number from :meth:`next_seq` (register what it is for first)."""
        self.transport.publish(Topic.COMMAND, self.codec.encode(CommandMessage(seq, entity, command, arg, self.sender)))

    def send_raw(self, data: bytes) -> None:
        """Put arbitrary bytes on the command topic (tests of the DMCS's defences)."""
        self.transport.publish(Topic.COMMAND, data)

    def publish_event(self, event: OCSEvent, visit: int = 0, exposure: int = 0) -> None:
        self.transport.publish(Topic.OCS_EVENT, self.codec.encode(OCSEventMessage(event, visit, exposure)))

    # ---- in -----------------------------------------------------------------------------------------------
    def _verified(self, data: bytes) -> object | None:
        try:
            return self.codec.decode(data)
        except MessageError as exc:
            self.unverified += 1
            log.warning("dropped a message from the DMCS: %s", exc)
            return None

    def _notify(self, item: Response | ErrorEvent) -> None:
        t = self.clock()
        for listener in list(self.listeners):
            listener(item, t)

    def _on_response(self, data: bytes) -> None:
        msg = self._verified(data)
        if not isinstance(msg, Response) or msg.sender != self.sender:
            return
        with self._cond:
            self.responses.setdefault(msg.seq, []).append(msg)
            self._cond.notify_all()
        self._notify(msg)

    def _on_error(self, data: bytes) -> None:
        msg = self._verified(data)
        if not isinstance(msg, ErrorEvent):
            return
        with self._cond:
            self.errors.append(msg)
            if msg.sender == self.sender and msg.seq in self.responses and not self.responses[msg.seq]:
                self.rejections[msg.seq] = msg
                self._cond.notify_all()
                notify = True
            else:
                notify = False
        if notify:
            self._notify(msg)

    def _on_state(self, data: bytes) -> None:
        msg = self._verified(data)
        if isinstance(msg, SummaryStateEvent):
            with self._cond:
                self.states.append(msg)

    def _on_telemetry(self, data: bytes) -> None:
        msg = self._verified(data)
        if isinstance(msg, Telemetry):
            with self._cond:
                self.telemetry.append(msg)

    # ---- waiting ------------------------------------------------------------------------------------------
    def finished(self, seq: int) -> bool:
        with self._cond:
            return seq in self.rejections or any(r.result.is_final for r in self.responses.get(seq, []))

    def wait(self, seq: int, timeout: float = 10.0) -> list[Response]:
        """The responses of command ``seq`` once its final result (or its rejection) is in.

        Raises
        ------
        TimeoutError
            No final result within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self.finished(seq), timeout):
                raise TimeoutError(
                    f"no final result for command {seq} within {timeout:g} s; is the DMCS running, "
                    "with the same secret?"
                )
            return list(self.responses.get(seq, []))

    def wait_all(self, timeout: float = 10.0) -> None:
        """Wait until every command sent so far has finished."""
        end = time.monotonic() + timeout
        with self._cond:
            seqs = list(self.responses)
        for seq in seqs:
            self.wait(seq, max(0.0, end - time.monotonic()))
