"""What the Base DMCS records: the :class:`ControlRecorder` protocol and an in-memory implementation.

The Alert Production control database (:class:`lsstpipe.db.ControlDatabase`: SQLite by default, PostgreSQL)
implements this same protocol; the DMCS, its entities, and the roles that run jobs and move images only
ever call these methods. Methods are called from the DMCS's threads, possibly concurrently, and must not
block for long.

A recorder that can also answer which commands it holds (:class:`CommandHistory`: the control database,
:class:`InMemoryRecorder`) lets a restarted DMCS know every (sender, sequence number) it has already
answered (:func:`seen_commands`), so that a replayed command is still rejected as a duplicate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lsstpipe.control.protocol import CommandMessage, OCSEventMessage, Response
from lsstpipe.control.states import EntityName, SummaryState
from lsstpipe.db.records import ImageTransfer


class ControlRecorder(Protocol):
    """The history the control database keeps."""

    def command_received(self, msg: CommandMessage) -> None:
        """A well-formed, authenticated command arrived."""

    def response_sent(self, resp: Response) -> None:
        """An acknowledgement or final result was published."""

    def state_changed(self, entity: EntityName, state: SummaryState, configuration: str | None, enabled: bool) -> None:
        """An entity's status changed."""

    def configuration_installed(
        self, entity: EntityName, configuration: str, software_version: str, checksum: str
    ) -> None:
        """A configure completed: this configuration is installed, with this verified software."""

    def message_rejected(self, code: str, reason: str, seq: int | None) -> None:
        """A message was rejected before reaching an entity (malformed, unauthenticated, duplicate)."""

    def event_received(self, event: OCSEventMessage, handled_by: list[EntityName]) -> None:
        """An OCS event arrived; ``handled_by`` lists the entities subscribed to it."""

    def jobs_submitted(self, entity: EntityName, label: str, n_jobs: int) -> None:
        """Jobs were submitted to the Orchestration Manager."""

    def job_started(self, entity: EntityName, label: str, index: int, node: str, rank: int) -> None:
        """Job ``index`` (0-based) of the latest batch ``label`` of ``entity`` started on ``node``, MPI ``rank``."""

    def job_finished(self, entity: EntityName, label: str, index: int, result: str, reason: str = "") -> None:
        """Job ``index`` of the latest batch ``label`` of ``entity`` ended with ``result`` (once per job)."""

    def image_transferred(self, transfer: ImageTransfer) -> None:
        """An image (or a raft of it) was moved, or a move failed: every attempt is recorded."""


@dataclass
class InMemoryRecorder:
    """A :class:`ControlRecorder` that keeps ``(kind, time, fields)`` rows in a list (tests, one-shot CLI runs)."""

    rows: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _add(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self.rows.append((kind, time.time(), fields))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [f for k, _, f in self.rows if k == kind]

    def command_received(self, msg: CommandMessage) -> None:
        self._add("command", msg=msg)

    def response_sent(self, resp: Response) -> None:
        self._add("response", resp=resp)

    def state_changed(self, entity: EntityName, state: SummaryState, configuration: str | None, enabled: bool) -> None:
        self._add("state", entity=entity, state=state, configuration=configuration, enabled=enabled)

    def configuration_installed(
        self, entity: EntityName, configuration: str, software_version: str, checksum: str
    ) -> None:
        self._add("installed", entity=entity, configuration=configuration, software_version=software_version,
                  checksum=checksum)  # fmt: skip

    def message_rejected(self, code: str, reason: str, seq: int | None) -> None:
        self._add("rejected", code=code, reason=reason, seq=seq)

    def event_received(self, event: OCSEventMessage, handled_by: list[EntityName]) -> None:
        self._add("event", event=event, handled_by=handled_by)

    def jobs_submitted(self, entity: EntityName, label: str, n_jobs: int) -> None:
        self._add("jobs", entity=entity, label=label, n_jobs=n_jobs)

    def job_started(self, entity: EntityName, label: str, index: int, node: str, rank: int) -> None:
        self._add("job_started", entity=entity, label=label, index=index, node=node, rank=rank)

    def job_finished(self, entity: EntityName, label: str, index: int, result: str, reason: str = "") -> None:
        self._add("job_finished", entity=entity, label=label, index=index, result=result, reason=reason)

    def image_transferred(self, transfer: ImageTransfer) -> None:
        self._add("transfer", transfer=transfer)


class _Keyed(Protocol):
    @property
    def sender(self) -> str: ...
    @property
    def seq(self) -> int: ...


@runtime_checkable
class CommandHistory(Protocol):
    """A recorder that can list the commands it received and the responses it sent (with sender and seq)."""

    def commands(self) -> Sequence[_Keyed]: ...

    def results(self) -> Sequence[_Keyed]: ...


def seen_commands(recorder: object) -> set[tuple[str, int]]:
    """Every (sender, seq) ``recorder`` holds a command or a response for (empty if it keeps no history).

    Raises whatever the recorder raises when its history cannot be read (e.g. ``DatabaseError``).
    """
    if isinstance(recorder, InMemoryRecorder):
        msgs = [f["msg"] for f in recorder.of_kind("command")] + [f["resp"] for f in recorder.of_kind("response")]
        return {(m.sender, m.seq) for m in msgs}
    if isinstance(recorder, CommandHistory):
        return {(c.sender, c.seq) for c in recorder.commands()} | {(r.sender, r.seq) for r in recorder.results()}
    return set()
