"""How messages travel between the OCS and the Base DMCS: an abstract :class:`Transport` and an in-process one.

A transport carries opaque byte strings on a fixed set of :class:`Topic` s; encoding, authentication and
meaning are :mod:`lsstpipe.control.protocol`'s business. The interface is what a DDS participant offers:
``publish(topic, data)`` and ``subscribe(topic, callback)``, plus a :meth:`Transport.self_test` built on
those two alone, so any implementation gets the cold-boot test for free.

The Cyclone DDS transport (issue 4, item 3) is :class:`lsstpipe.control.dds.DDSTransport`: loopback-only
by an explicit domain configuration, one DDS topic per :class:`Topic` carrying the Codec's signed bytes,
its QoS per topic and its ordering rule are documented there. Nothing above this module changes.

Threads, not asyncio
--------------------
Cyclone DDS delivers samples on its own threads (listeners) or through blocking ``take`` with a timeout;
the install step of a configure is a timed wait that stop/abort must interrupt; the command line and the
tests are plain synchronous code. Threads fit all three without an event loop that every caller would have
to own (asyncio would need ``run_in_executor`` around DDS anyway). The rules that keep this simple:
a transport delivers each topic's messages in publication order on one delivery thread, a callback must
not block waiting for another delivery, and ``publish`` never blocks (it enqueues). The DMCS does all its
state changes under one lock per entity (see :mod:`lsstpipe.control.entity`).
"""

from __future__ import annotations

import abc
import enum
import logging
import os
import queue
import threading
from collections.abc import Callable

from lsstpipe.control.errors import BootError

log = logging.getLogger(__name__)

Callback = Callable[[bytes], None]


class Topic(enum.Enum):
    """The topics of the OCS link and of the DM event transport."""

    COMMAND = "command"
    """OCS → DMCS: a signed command with its sequence number."""

    RESPONSE = "ackcmd"
    """DMCS → OCS: the acknowledgement and the final result of each command."""

    OCS_EVENT = "ocsEvent"
    """OCS → DMCS: nextVisit, startIntegration, startReadout, startExposure."""

    SUMMARY_STATE = "summaryState"
    """DMCS → OCS: an entity's state, configuration and enabled flag, on every change."""

    ERROR = "errorEvent"
    """DMCS → OCS: failures and rejected messages."""

    TELEMETRY = "telemetry"
    """DMCS → OCS: DM telemetry samples (jobs launched, scanning, following, …)."""

    SELF_TEST = "selfTest"
    """Either direction: the cold-boot loopback test."""


class Subscription:
    """A handle returned by :meth:`Transport.subscribe`; ``cancel()`` stops the deliveries."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel

    def cancel(self) -> None:
        self._cancel()


class Subscribers:
    """The callbacks subscribed to each topic, shared by every transport: thread-safe adding, cancelling and
    in-order dispatch, where one subscriber's exception is logged and never stops the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[Topic, list[tuple[int, Callback]]] = {t: [] for t in Topic}
        self._next_id = 0

    def add(self, topic: Topic, callback: Callback) -> Subscription:
        with self._lock:
            self._next_id += 1
            sid = self._next_id
            self._subs[topic].append((sid, callback))

        def cancel() -> None:
            with self._lock:
                self._subs[topic] = [(i, c) for i, c in self._subs[topic] if i != sid]

        return Subscription(cancel)

    def dispatch(self, topic: Topic, data: bytes) -> None:
        with self._lock:
            callbacks = [c for _, c in self._subs[topic]]
        for callback in callbacks:
            try:
                callback(data)
            except Exception:  # a subscriber's bug must not stop deliveries to everyone else
                log.exception("subscriber of %s raised; delivery goes on", topic.value)


class Transport(abc.ABC):
    """Publish/subscribe of byte strings on :class:`Topic` s."""

    @abc.abstractmethod
    def publish(self, topic: Topic, data: bytes) -> None:
        """Send ``data`` to every subscriber of ``topic``; never blocks."""

    @abc.abstractmethod
    def subscribe(self, topic: Topic, callback: Callback) -> Subscription:
        """Call ``callback(data)`` for every message on ``topic`` from now on, in order, on a delivery thread."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop delivering; pending messages may be dropped."""

    def self_test(self, timeout: float = 2.0, name: str = "transport") -> None:
        """Publish a nonce on :attr:`Topic.SELF_TEST` and wait until it comes back.

        Raises
        ------
        BootError
            Nothing came back within ``timeout`` seconds.
        """
        nonce = os.urandom(16).hex().encode()
        got = threading.Event()

        def on(data: bytes) -> None:
            if data == nonce:
                got.set()

        sub = self.subscribe(Topic.SELF_TEST, on)
        try:
            self.publish(Topic.SELF_TEST, nonce)
            if not got.wait(timeout):
                raise BootError(f"self test failed: the {name} did not deliver a message to itself within "
                                f"{timeout:g} s; check that it is running and reachable, then boot again")  # fmt: skip
        finally:
            sub.cancel()


class InProcessTransport(Transport):
    """A transport inside one process: one queue, one delivery thread, the same semantics as DDS here.

    ``broken = True`` makes it drop every message (to exercise the boot self test).
    """

    def __init__(self, name: str = "in-process") -> None:
        self.name = name
        self.broken = False
        self._subs = Subscribers()
        self._queue: queue.Queue[tuple[Topic, bytes] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._deliver, name=f"transport-{name}", daemon=True)
        self._thread.start()

    def publish(self, topic: Topic, data: bytes) -> None:
        if not isinstance(topic, Topic) or not isinstance(data, bytes):
            raise TypeError("publish takes a Topic and bytes")
        if not self._closed and not self.broken:
            self._queue.put((topic, data))

    def subscribe(self, topic: Topic, callback: Callback) -> Subscription:
        return self._subs.add(topic, callback)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout=5)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything published so far has been delivered, and everything its delivery published in
        turn (a rejected command's error event, say), until the queue runs dry (tests).

        Work that a subscriber hands to threads of its own is not waited for.
        """
        done = threading.Event()
        token = b"flush " + os.urandom(8).hex().encode()

        def marker(data: bytes) -> None:
            if data != token:
                return
            with self._queue.mutex:  # subscribers run on this thread: all they published is queued by now
                pending = any(item is not None and item[0] is not Topic.SELF_TEST for item in self._queue.queue)
            if pending:
                self._queue.put((Topic.SELF_TEST, token))
            else:
                done.set()

        sub = self.subscribe(Topic.SELF_TEST, marker)
        try:
            self._queue.put((Topic.SELF_TEST, token))
            return done.wait(timeout)
        finally:
            sub.cancel()

    def _deliver(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            topic, data = item
            self._subs.dispatch(topic, data)
