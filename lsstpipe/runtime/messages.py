"""Messages between the night's ranks: an ``IntEnum`` of tags and a frozen dataclass payload per tag.

Control messages are small pickled dataclasses (lowercase ``send``/``recv``); pixels travel as numpy
buffers with uppercase ``Send``/``Recv`` under their own tags, added with the runtime that moves them.
Every payload type has exactly one tag (:data:`TAG_OF`), so a receiver checks what arrived with
:func:`expect` instead of dispatching on strings. A worker catches every exception of a job and ships it
back in a :class:`JobResult` (:meth:`JobResult.failure`) with its traceback, so nothing deadlocks.
"""

from __future__ import annotations

import enum
import math
import traceback
from dataclasses import dataclass
from typing import Any, TypeVar

from lsstpipe.runtime.layout import Role


class Tag(enum.IntEnum):
    """MPI message tags of the night's control messages."""

    JOB = 1
    """DMCS → replicator, distributor, catch-up or worker rank: a :class:`JobAssignment`."""

    RESULT = 2
    """Any rank → DMCS: a :class:`JobResult`, success or failure with the exception's traceback."""

    HEARTBEAT = 3
    """Between paired replicators and distributors, and from every rank to the DMCS: a :class:`Heartbeat`."""

    STOP = 4
    """DMCS → any rank: a :class:`Stop` sentinel; the rank finishes its loop and returns."""


class JobKind(enum.Enum):
    """What a job does."""

    SCIENCE_RAFT = "science_raft"
    """A replicator job for one science raft (its distributor receives the same raft)."""

    WAVEFRONT = "wavefront"
    """A replicator job for the wavefront sensors."""

    CATCHUP = "catchup"
    """A catch-up replicator job for one image from the CDS buffer or the network outage buffer."""

    CCD = "ccd"
    """A worker job for one CCD or wavefront sensor of a visit."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _nonneg_int(name: str, value: object) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
             f"{name} must be an integer ≥ 0, not {value!r}")  # fmt: skip


@dataclass(frozen=True)
class JobAssignment:
    """A job for one rank: which visit, exposure, raft or detector, by when, and how urgent."""

    job_id: int
    kind: JobKind
    visit: int
    exposure: int = 0
    """Exposure (snap) number within the visit, from 0."""
    raft: str | None = None
    """Raft of a science-raft or catch-up job (``None`` for the wavefront sensors)."""
    detector: int | None = None
    """Detector id of a CCD job."""
    deadline: float = math.inf
    """``MPI.Wtime()`` after which the job is late: killed and queued for later reprocessing."""
    priority: int = 0
    """Lower runs first; a job rescheduled on a spare runs at a lower priority (a higher number)."""
    attempt: int = 1
    """1 for the first try, 2 … for reschedules."""

    def __post_init__(self) -> None:
        _nonneg_int("job_id", self.job_id)
        _nonneg_int("visit", self.visit)
        _nonneg_int("exposure", self.exposure)
        _nonneg_int("priority", self.priority)
        _require(isinstance(self.kind, JobKind), f"kind must be a JobKind, not {self.kind!r}")
        _require(isinstance(self.attempt, int) and self.attempt >= 1, f"attempt must be ≥ 1, not {self.attempt!r}")
        if self.kind is JobKind.CCD:
            _require(self.detector is not None, "a CCD job needs its detector id")
            _nonneg_int("detector", self.detector)
        if self.kind is JobKind.SCIENCE_RAFT:
            _require(bool(self.raft), "a science-raft job needs its raft name (e.g. R22)")
        _require(not math.isnan(self.deadline), "deadline must be a time or inf, not NaN")


@dataclass(frozen=True)
class JobResult:
    """What a rank reports about one job: success with its counts, or the failure with its traceback."""

    job_id: int
    rank: int
    ok: bool
    elapsed_s: float = 0.0
    error_type: str | None = None
    """Class name of the exception that failed the job."""
    message: str | None = None
    """``str()`` of that exception."""
    traceback: str | None = None
    """The formatted traceback, as printed on the failing rank."""
    retriable: bool = False
    """Whether the failure is expected to be transient (a lost rank or link, not the application)."""
    counts: tuple[tuple[str, int], ...] = ()
    """Named integer outputs of a successful job, e.g. ``(("diasources", 12), ("alerts", 3))``."""

    def __post_init__(self) -> None:
        _nonneg_int("job_id", self.job_id)
        _nonneg_int("rank", self.rank)
        _require(self.ok == (self.error_type is None), "a result has an error_type exactly when it is not ok")

    @classmethod
    def failure(cls, job_id: int, rank: int, exc: BaseException, elapsed_s: float = 0.0,
                retriable: bool = False) -> JobResult:  # fmt: skip
        """The result of a job that raised ``exc``, with its traceback."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(job_id, rank, False, elapsed_s, type(exc).__name__, str(exc), text, retriable)

    def count(self, name: str) -> int:
        """The output count ``name`` (0 when absent)."""
        return dict(self.counts).get(name, 0)


@dataclass(frozen=True)
class Heartbeat:
    """I am alive: sender, its role, a sequence number that grows by one per beat, and the send time."""

    sender: int
    role: Role
    sequence: int
    sent_at: float
    """``MPI.Wtime()`` on the sender."""

    def __post_init__(self) -> None:
        _nonneg_int("sender", self.sender)
        _nonneg_int("sequence", self.sequence)
        _require(isinstance(self.role, Role), f"role must be a Role, not {self.role!r}")


@dataclass(frozen=True)
class Stop:
    """The stop sentinel: finish the current loop and return."""

    reason: str = "end of night"


Payload = JobAssignment | JobResult | Heartbeat | Stop
#: The tag of each payload type.
TAG_OF: dict[type, Tag] = {JobAssignment: Tag.JOB, JobResult: Tag.RESULT, Heartbeat: Tag.HEARTBEAT, Stop: Tag.STOP}
#: The payload type of each tag.
PAYLOAD_OF: dict[Tag, type] = {tag: cls for cls, tag in TAG_OF.items()}

P = TypeVar("P")


def tag_of(payload: Payload) -> Tag:
    """The tag ``payload`` travels under."""
    try:
        return TAG_OF[type(payload)]
    except KeyError:
        raise TypeError(f"{type(payload).__name__} is not a runtime message; send one of "
                        f"{', '.join(c.__name__ for c in TAG_OF)}") from None  # fmt: skip


def send(comm: Any, payload: Payload, dest: int) -> None:
    """Send ``payload`` to ``dest`` under its tag (``comm.send``)."""
    comm.send(payload, dest=dest, tag=int(tag_of(payload)))


def expect(tag: int, payload: object) -> Payload:
    """``payload`` received under ``tag``, checked to be that tag's payload type.

    Raises
    ------
    TypeError
        The tag is not a runtime tag, or the payload is not its type (a sender bug: fail loudly).
    """
    try:
        kind = PAYLOAD_OF[Tag(tag)]
    except ValueError:
        raise TypeError(f"message tag {tag} is not a runtime tag ({', '.join(t.name for t in Tag)})") from None
    if type(payload) is not kind:
        raise TypeError(f"message under tag {Tag(tag).name} carries a {type(payload).__name__}, not a {kind.__name__}")
    return payload  # type: ignore[return-value]


def recv(comm: Any, source: int, tag: int) -> tuple[Payload, int, Tag]:
    """Receive one message (``MPI.ANY_SOURCE`` / ``MPI.ANY_TAG`` allowed): ``(payload, source, tag)``, checked."""
    from mpi4py import MPI

    status = MPI.Status()
    obj = comm.recv(source=source, tag=tag, status=status)
    return expect(status.Get_tag(), obj), status.Get_source(), Tag(status.Get_tag())
