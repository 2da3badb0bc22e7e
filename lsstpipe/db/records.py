"""The rows of the Alert Production control database, as frozen dataclasses.

Times are POSIX seconds (UTC). Entities, states, commands and results are the string values of the
control plane's enumerations (``"archiver"``, ``"IDLE"``, ``"configure"``, ``"COMPLETE"``): this layer
sits below the control plane and does not import it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageTransfer:
    """One attempt to move one image (or one raft of it) from ``source`` to ``destination``, good or bad.

    ``checksum`` is the checksum verified at the destination (None when the transfer failed before one
    was computed); ``nbytes`` the bytes moved; ``error`` says what went wrong and is required when
    ``ok`` is false, forbidden when it is true. ``t`` is when the attempt ended (default: when recorded).
    """

    image_id: str
    raft: str
    kind: str
    source: str
    destination: str
    checksum: str | None
    nbytes: int
    ok: bool
    error: str | None = None
    t: float | None = None

    def __post_init__(self) -> None:
        if self.ok and self.error is not None:
            raise ValueError(f"transfer of {self.image_id} marked ok but has an error: {self.error!r}")
        if not self.ok and not self.error:
            raise ValueError(f"failed transfer of {self.image_id} needs an error saying what went wrong")
        if self.nbytes < 0:
            raise ValueError(f"transfer of {self.image_id}: nbytes must be >= 0 (got {self.nbytes})")


@dataclass(frozen=True)
class CommandRecord:
    """An authenticated, well-formed command as it arrived."""

    t: float
    sender: str
    seq: int
    entity: str
    command: str
    arg: str | None
    authenticated: bool


@dataclass(frozen=True)
class ResultRecord:
    """An acknowledgement or final result sent for a command, with the entity's status after it."""

    t: float
    sender: str
    seq: int
    entity: str
    command: str
    result: str
    reason: str
    state: str
    configuration: str | None
    enabled: bool


@dataclass(frozen=True)
class StateChange:
    """An entity's status changed from ``from_state`` (None: first record ever) to ``to_state``."""

    t: float
    entity: str
    from_state: str | None
    to_state: str
    configuration: str | None
    enabled: bool


@dataclass(frozen=True)
class EntityStatusRecord:
    """The last status recorded for an entity."""

    t: float
    entity: str
    state: str
    configuration: str | None
    enabled: bool


@dataclass(frozen=True)
class InstalledConfiguration:
    """A configure completed: ``configuration`` installed with this verified software."""

    t: float
    entity: str
    configuration: str
    software_version: str
    checksum: str


@dataclass(frozen=True)
class SoftwareVersion:
    """A software version and a checksum it was verified with, first seen at ``t``."""

    t: float
    version: str
    checksum: str


@dataclass(frozen=True)
class Rejection:
    """A message rejected before it reached an entity; ``seq`` only when it was authenticated."""

    t: float
    code: str
    reason: str
    seq: int | None


@dataclass(frozen=True)
class JobRecord:
    """One job of a submission: where it ran, when it started and ended, and its result (None: not yet)."""

    index: int
    node: str | None
    rank: int | None
    started: float | None
    ended: float | None
    result: str | None
    reason: str | None


@dataclass(frozen=True)
class JobSubmission:
    """A batch of ``n_jobs`` jobs submitted for one OCS event, with the jobs that reported so far."""

    t: float
    entity: str
    label: str
    visit: int | None
    exposure: int | None
    n_jobs: int
    jobs: tuple[JobRecord, ...]

    def queue_seconds(self, job: JobRecord) -> float | None:
        """Submission to start of ``job``."""
        return None if job.started is None else job.started - self.t

    @staticmethod
    def run_seconds(job: JobRecord) -> float | None:
        """Start to end of ``job``."""
        return None if job.started is None or job.ended is None else job.ended - job.started


#: Anything :meth:`~lsstpipe.db.control.ControlDatabase.history` returns.
HistoryEntry = CommandRecord | ResultRecord | StateChange | InstalledConfiguration | JobSubmission
