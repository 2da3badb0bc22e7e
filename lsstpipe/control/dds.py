"""The OCS link over Eclipse Cyclone DDS (LDM-230 §2.1, issue 4 item 3), confined to the loopback interface.

:class:`DDSTransport` is a :class:`~lsstpipe.control.transport.Transport`: it carries the signed bytes of
:class:`~lsstpipe.control.protocol.Codec` unchanged, so authentication stays end to end and nothing above
this module knows which transport it runs on.

Loopback only
-------------
Cyclone DDS discovers peers by multicast on the machine's network interfaces unless told otherwise. Every
participant made here joins a domain created with :func:`loopback_config`, passed explicitly to
``dds_create_domain`` (an explicit configuration replaces ``CYCLONEDDS_URI``, so the user's environment
cannot widen it): the only network interface is ``127.0.0.1``, multicast is off, sockets do not route
(``SO_DONTROUTE``), and discovery is unicast to the one peer address ``127.0.0.1``. Cyclone still binds
its receiving sockets to all local addresses: it sends to nothing but 127.0.0.1, and whatever arrives must
pass the HMAC check. If the domain already exists in this process with another configuration (some other
code joined it first), the transport refuses to start.

Topics and QoS
--------------
One DDS topic per :class:`~lsstpipe.control.transport.Topic`, named ``lsstpipe_<value>``, of the struct
:class:`Envelope` ``{string origin; uint64 order; sequence<octet> data;}``: ``data`` is the signed message,
``origin`` and ``order`` (a random id per transport and a counter over all its topics) let a receiver put
the samples it takes together in the order one sender wrote them (below). Everything is reliable.

- OCS → DMCS (``command``, ``ocsEvent``) and ``selfTest``: keep-all, volatile. A command is never
  dropped for lack of room, and a DMCS that starts later does not replay old commands; the OCS therefore
  waits until the DMCS's readers are matched before sending (:meth:`DDSTransport.wait_for_peer`).
- DMCS → OCS (``ackcmd``, ``summaryState``, ``errorEvent``, ``telemetry``): keep-last (:data:`HISTORY_DEPTH`),
  transient-local. An OCS that connects late sees the current summary states, and an acknowledgement
  written before the DMCS had discovered the OCS's reader still reaches it. The history may hold
  responses to other senders (earlier sessions): the OCS client ignores responses not addressed to it, so
  each connecting OCS uses a sender name of its own (:func:`unique_sender`).

Writers exist from the start for every topic; a reader is made on the first subscription to its topic.

Ordering and threads
--------------------
One delivery thread per transport waits on a DDS wait set over all its readers, takes every available
sample, and calls the callbacks. Samples taken together are merged so that each origin's samples come in
the order it wrote them (across topics: a FAILED response precedes the error event about it, as on the
in-process transport), origins interleaved by source time stamp. A sample that arrives after a batch
was taken goes in the next one; Cyclone stores one sender's samples in the order its packets arrive, so
only a lost and retransmitted packet (not seen on loopback) could reorder topics. ``publish`` writes at once; with a
reliable keep-all writer it could only block if a reader lagged by more than the writer's buffer, which
on loopback does not happen at the rates of the control plane.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import threading
import time
import types
import uuid
from collections.abc import Iterable, Mapping
from typing import Any
from xml.sax.saxutils import escape

from lsstpipe.control.errors import BootError, ControlError
from lsstpipe.control.transport import Callback, Subscribers, Subscription, Topic, Transport

log = logging.getLogger(__name__)

#: Environment variable naming the DDS domain (entry points only: explicit > environment > default).
DOMAIN_ENV = "LSSTPIPE_DDS_DOMAIN"

#: Default DDS domain: not 0, the default of every other DDS application (ROS 2 among them).
DEFAULT_DOMAIN = 42

#: Largest domain id whose ports (7400 + 250·d + offsets) stay below 65536 with Cyclone's default mapping.
MAX_DOMAIN = 232

#: Depth of the transient-local history of the DMCS → OCS topics.
HISTORY_DEPTH = 1000

#: The only address the DDS stack may use, for its interface and for unicast discovery.
LOOPBACK = "127.0.0.1"

_VOLATILE_TOPICS = frozenset({Topic.COMMAND, Topic.OCS_EVENT, Topic.SELF_TEST})


class DDSUnavailable(ControlError):
    """The ``cyclonedds`` package is not installed (non-retriable until it is)."""


def loopback_config(trace_file: str | os.PathLike[str] | None = None) -> str:
    """The Cyclone DDS configuration of every participant here: loopback interface, no multicast, one peer.

    Parameters
    ----------
    trace_file
        If given, Cyclone writes its configuration and discovery trace there (used by the tests to prove
        which interfaces were selected).
    """
    tracing = ""
    if trace_file is not None:
        tracing = (f"<Tracing><Category>config,discovery</Category>"
                   f"<OutputFile>{escape(str(trace_file))}</OutputFile></Tracing>")  # fmt: skip
    return (
        '<CycloneDDS><Domain id="any"><General>'
        f'<Interfaces><NetworkInterface address="{LOOPBACK}"/></Interfaces>'
        "<AllowMulticast>false</AllowMulticast><DontRoute>true</DontRoute><Transport>udp</Transport></General>"
        "<Discovery><ParticipantIndex>auto</ParticipantIndex>"
        f'<Peers AddLocalhost="false"><Peer address="{LOOPBACK}"/></Peers></Discovery>'
        f"{tracing}</Domain></CycloneDDS>"
    )


def resolve_domain(explicit: int | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The DDS domain: ``explicit`` > ``$LSSTPIPE_DDS_DOMAIN`` > :data:`DEFAULT_DOMAIN` (call in entry points).

    Raises
    ------
    ControlError
        Not an integer in 0 … :data:`MAX_DOMAIN`.
    """
    env = os.environ if environ is None else environ
    value: Any = explicit if explicit is not None else env.get(DOMAIN_ENV) or DEFAULT_DOMAIN
    try:
        domain = int(value)
    except ValueError:
        raise ControlError(f"DDS domain {value!r} (from ${DOMAIN_ENV}) is not an integer") from None
    if not 0 <= domain <= MAX_DOMAIN:
        raise ControlError(f"DDS domain {domain} is out of range; use 0 … {MAX_DOMAIN}")
    return domain


def unique_sender(prefix: str = "ocs") -> str:
    """A sender name no other OCS session uses (the DMCS rejects a repeated sender and sequence number)."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _dds() -> Any:
    """Import Cyclone DDS on first use, with the fix in the error message."""
    try:
        import cyclonedds.core
        import cyclonedds.domain
        import cyclonedds.pub
        import cyclonedds.qos
        import cyclonedds.sub
        import cyclonedds.topic
        import cyclonedds.util
    except ImportError as exc:
        raise DDSUnavailable(f"the DDS transport needs Eclipse Cyclone DDS ({exc}); install it with "
                             "\"pip install 'lsstpipe[dds]'\" (or 'pip install cyclonedds')") from None  # fmt: skip
    return cyclonedds


_envelope_type: Any = None


def _envelope() -> Any:
    """The IDL struct of every topic (defined on first use so that this module imports without cyclonedds)."""
    global _envelope_type
    if _envelope_type is None:
        from cyclonedds.idl import IdlStruct
        from cyclonedds.idl.types import sequence, uint8, uint64

        # built with real types, not the strings that ``from __future__ import annotations`` would leave
        fields = {"origin": str, "order": uint64, "data": sequence[uint8]}  # type: ignore[misc]
        body = {"__annotations__": fields, "__module__": __name__, "__qualname__": "Envelope"}
        cls = types.new_class("Envelope", (IdlStruct,), {"typename": "lsstpipe.control.Envelope"},
                              lambda ns: ns.update(body))  # fmt: skip
        _envelope_type = dataclasses.dataclass(cls)
    return _envelope_type


class _Domains:
    """The DDS domains this process created, with their configuration and users (a domain is per process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, tuple[Any, str, int]] = {}

    def acquire(self, domain_id: int, config: str) -> None:
        dds = _dds()
        with self._lock:
            held = self._held.get(domain_id)
            if held is not None:
                if held[1] != config:
                    raise BootError(f"DDS domain {domain_id} is already open in this process with another "
                                    "configuration; close the other transport first or use another domain")  # fmt: skip
                self._held[domain_id] = (held[0], config, held[2] + 1)
                return
            try:
                domain = dds.domain.Domain(domain_id, config)
            except dds.core.DDSException as exc:
                raise BootError(f"cannot create DDS domain {domain_id} with the loopback-only configuration "
                                f"({exc}); something else in this process joined it first — use another "
                                "domain") from None  # fmt: skip
            self._held[domain_id] = (domain, config, 1)

    def release(self, domain_id: int) -> None:
        with self._lock:
            domain, config, users = self._held[domain_id]
            if users > 1:
                self._held[domain_id] = (domain, config, users - 1)
            else:
                del self._held[domain_id]  # the last reference: deleting the domain deletes its entities


_DOMAINS = _Domains()


class DDSTransport(Transport):
    """Publish/subscribe of signed messages over Cyclone DDS on the loopback interface.

    Parameters
    ----------
    domain_id
        The DDS domain (0 … :data:`MAX_DOMAIN`); OCS and DMCS must use the same one.
    name
        For thread names and messages.
    trace_file
        Write Cyclone's configuration/discovery trace there (diagnostics and tests).

    Raises
    ------
    DDSUnavailable
        ``cyclonedds`` is not installed.
    BootError
        The domain could not be created with the loopback-only configuration.
    """

    def __init__(
        self, domain_id: int = DEFAULT_DOMAIN, name: str = "dds", *, trace_file: str | os.PathLike[str] | None = None
    ) -> None:
        if not 0 <= domain_id <= MAX_DOMAIN:
            raise ControlError(f"DDS domain {domain_id} is out of range; use 0 … {MAX_DOMAIN}")
        dds = _dds()
        self.name = name
        self.domain_id = domain_id
        self.config = loopback_config(trace_file)
        self.origin = uuid.uuid4().hex
        self._dds = dds
        self._envelope = _envelope()
        _DOMAINS.acquire(domain_id, self.config)
        self._closed = False
        self._lock = threading.Lock()  # callbacks, readers, the write counter
        self._order = 0
        self._subs = Subscribers()
        try:
            self._participant = dds.domain.DomainParticipant(domain_id)
            self._topics = {t: dds.topic.Topic(self._participant, f"lsstpipe_{t.value}", self._envelope) for t in Topic}
            self._writers = {t: dds.pub.DataWriter(self._participant, self._topics[t], qos=self._qos(t)) for t in Topic}
            self._readers: dict[Topic, Any] = {}
            self._waitset = dds.core.WaitSet(self._participant)
        except Exception:
            _DOMAINS.release(domain_id)
            raise
        self._thread = threading.Thread(target=self._deliver, name=f"transport-{name}", daemon=True)
        self._thread.start()

    def _qos(self, topic: Topic) -> Any:
        policy = self._dds.qos.Policy
        reliable = policy.Reliability.Reliable(max_blocking_time=self._dds.util.duration(seconds=1))
        if topic in _VOLATILE_TOPICS:
            return self._dds.qos.Qos(reliable, policy.History.KeepAll, policy.Durability.Volatile)
        keep = policy.History.KeepLast(HISTORY_DEPTH)
        # Cyclone keeps a transient-local writer's history by the durability-service depth (default 1)
        service = policy.DurabilityService(cleanup_delay=0, history=keep, max_samples=-1, max_instances=-1,
                                           max_samples_per_instance=-1)  # fmt: skip
        return self._dds.qos.Qos(reliable, keep, policy.Durability.TransientLocal, service)

    # ---- Transport --------------------------------------------------------------------------------------
    def publish(self, topic: Topic, data: bytes) -> None:
        if not isinstance(topic, Topic) or not isinstance(data, bytes):
            raise TypeError("publish takes a Topic and bytes")
        with self._lock:  # one counter over all topics, in write order
            if self._closed:
                return
            self._order += 1
            self._writers[topic].write(self._envelope(self.origin, self._order, data))

    def subscribe(self, topic: Topic, callback: Callback) -> Subscription:
        with self._lock:
            if topic not in self._readers and not self._closed:
                reader = self._dds.sub.DataReader(self._participant, self._topics[topic], qos=self._qos(topic))
                condition = self._dds.core.ReadCondition(reader, self._dds.core.SampleState.Any
                                                         | self._dds.core.ViewState.Any
                                                         | self._dds.core.InstanceState.Any)  # fmt: skip
                self._readers[topic] = (reader, condition)
                self._waitset.attach(condition)
        return self._subs.add(topic, callback)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._waitset.set_trigger(True)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        for writer in self._writers.values():  # let the last acknowledgements and results reach their readers
            try:
                writer.wait_for_acks(self._dds.util.duration(milliseconds=500))
            except self._dds.core.DDSException:
                pass
        self._readers.clear()
        self._writers.clear()
        self._topics.clear()
        del self._waitset, self._participant
        _DOMAINS.release(self.domain_id)

    # ---- the OCS side -----------------------------------------------------------------------------------
    def remote_matches(self) -> dict[str, int]:
        """How many readers/writers of other participants each of our writers/readers is matched with."""
        own = self._participant.guid
        out: dict[str, int] = {}

        def count(handles, data) -> int:
            # cyclonedds sizes the handle list, then reads it: a match that goes away in between raises
            # IndexError inside the binding (seen under load). It is only a count: ask again.
            for _ in range(5):
                try:
                    return sum(1 for h in handles() if (d := data(h)) is not None and d.participant_key != own)
                except IndexError:
                    continue
            return 0

        for topic, writer in list(self._writers.items()):
            out[f"writer {topic.value}"] = count(writer.get_matched_subscriptions,
                                                 writer.get_matched_subscription_data)  # fmt: skip
        for topic, (reader, _) in list(self._readers.items()):
            out[f"reader {topic.value}"] = count(reader.get_matched_publications,
                                                 reader.get_matched_publication_data)  # fmt: skip
        return out

    def wait_for_peer(
        self,
        timeout: float = 10.0,
        publishes: Iterable[Topic] = (Topic.COMMAND, Topic.OCS_EVENT),
        subscribes: Iterable[Topic] = (Topic.RESPONSE,),
    ) -> None:
        """Wait until another participant reads each of ``publishes`` and writes each of ``subscribes``.

        The default is what an OCS needs before its first command: a Base DMCS that reads commands and
        events and writes responses. Subscribe to ``subscribes`` first.

        Raises
        ------
        BootError
            Not matched within ``timeout`` seconds.
        """
        wanted = [f"writer {t.value}" for t in publishes] + [f"reader {t.value}" for t in subscribes]
        end = time.monotonic() + timeout
        while True:
            matches = self.remote_matches()
            missing = [w for w in wanted if matches.get(w, 0) < 1]
            if not missing:
                return
            if time.monotonic() > end:
                raise BootError(f"no Base DMCS answered on DDS domain {self.domain_id} (loopback) within "
                                f"{timeout:g} s (unmatched: {', '.join(missing)}); start one with 'lsstpipe dmcs "
                                f"serve --domain {self.domain_id}', or use the domain it serves on")  # fmt: skip
            time.sleep(0.01)

    # ---- delivery ---------------------------------------------------------------------------------------
    def _take_all(self) -> list[tuple[Topic, Any]]:
        with self._lock:
            readers = list(self._readers.items())
        taken: list[tuple[Topic, Any]] = []
        for topic, (reader, _) in readers:
            while True:
                samples = reader.take(N=256)
                taken.extend((topic, s) for s in samples if isinstance(s, self._envelope))
                if len(samples) < 256:
                    break
        return taken

    def _deliver(self) -> None:
        wait = self._dds.util.duration(milliseconds=200)
        while not self._closed:
            try:
                self._waitset.wait(wait)
                self._waitset.set_trigger(False)
                batch = self._take_all()
            except Exception:
                if self._closed:
                    return
                log.exception("DDS transport %s: taking samples failed; delivery goes on", self.name)
                continue
            for topic, sample in in_sender_order(batch):
                self._subs.dispatch(topic, bytes(sample.data))  # sequence<octet> arrives as a list of ints


def in_sender_order(batch: list[tuple[Topic, Any]]) -> list[tuple[Topic, Any]]:
    """Each origin's samples by its write counter; origins merged by the time stamps of their samples."""
    per_origin: dict[str, list[tuple[Topic, Any]]] = {}
    for item in batch:
        per_origin.setdefault(item[1].origin, []).append(item)
    runs = [sorted(items, key=lambda item: item[1].order) for items in per_origin.values()]
    return list(heapq.merge(*runs, key=lambda item: item[1].sample_info.source_timestamp))
