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

from lsstpipe.db.records import ImageTransfer
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

    EXPECT = 5
    """Replicator → distributor: an :class:`Expect` (the visit, exposure and raft of its next images)."""

    READOUT = 6
    """DMCS → replicator: :class:`ReadoutStarted` (the camera reads the exposure out: fetch it)."""

    IMAGE = 7
    """Replicator → distributor: an :class:`ImageData` header; its bytes follow under :attr:`DATA`."""

    ARCHIVED = 8
    """Distributor → DMCS (→ replicator): :class:`Archived`, the stored copy read back and verified (or not)."""

    PUBLISHED = 9
    """Distributor → Archive DMCS: :class:`RaftPublished` (it holds this raft of this exposure)."""

    LOCATE = 10
    """Worker → Archive DMCS: :class:`LocateRaft`; answered by :class:`RaftLocation` when the raft is there."""

    LOCATION = 11
    """Archive DMCS → worker: a :class:`RaftLocation`."""

    CCD_REQUEST = 12
    """Worker → distributor: a :class:`CcdRequest`; answered by :class:`CcdData` and its pixels."""

    CCD_DATA = 13
    """Distributor → worker: a :class:`CcdData` header; the segments follow under :attr:`DATA`."""

    TELEMETRY = 14
    """Worker → DMCS: :class:`TelemetryReport` (SDQA, WCS, PSF) that the DMCS publishes to the OCS."""

    LINK = 16
    """Replicator → DMCS: :class:`LinkStatus` (its link to its distributor went down or came back)."""

    FAULT = 17
    """DMCS → rank: a :class:`FaultOrder` (fault injection of a simulated night)."""

    TRANSFER = 18
    """Replicator or distributor → DMCS: an :class:`~lsstpipe.db.records.ImageTransfer` to record."""

    REDUCE = 19
    """DMCS → the workers of a visit's string: :class:`FocalPlaneReduce` (combine the visit's values)."""

    DATA = 15
    """Raw bytes (``Send``/``Recv`` of a uint8 buffer) right after an :class:`ImageData` or :class:`CcdData`
    header from the same sender."""


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
    """Raft of a science-raft or catch-up job (``None`` for the wavefront sensors: see ``rafts``)."""
    detector: int | None = None
    """Detector id of a CCD job."""
    deadline: float = math.inf
    """``MPI.Wtime()`` after which the job is late: killed and queued for later reprocessing."""
    priority: int = 0
    """Lower runs first; a job rescheduled on a spare runs at a lower priority (a higher number)."""
    attempt: int = 1
    """1 for the first try, 2 … for reschedules."""
    image_ids: tuple[str, ...] = ()
    """The images (OBSIDs) of the job: the exposure's for a replicator job, every snap's for a CCD job."""
    rafts: tuple[str, ...] = ()
    """The corner rafts of a wavefront job: one replicator job moves every wavefront sensor's images
    (LDM-230: one job per science raft plus one for the wavefront sensors)."""
    mode: str = "science"
    """The mode of the entity that launched the job (science, calibration, engineering, catchup)."""
    from_raw_cache: bool = False
    """Read the images from the Archive's raw image cache, not from a distributor (a rescheduled job)."""
    difference_imaging: bool = True
    """A CCD job of the Alert Production Cluster's installed configuration (``pipeline``): subtract the
    template and detect DIASources (False: ISR only, as in calibration and engineering modes), ..."""
    detection_threshold_sigma: float = 5.0
    """... at this threshold (σ), ..."""
    alerts: bool = True
    """... and issue alerts (False: associate and store only)."""

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
        if self.kind is JobKind.WAVEFRONT:
            _require(bool(self.rafts) and self.raft is None,
                     "a wavefront job names its corner rafts in rafts (e.g. ('R00', 'R44')), not in raft")  # fmt: skip
        else:
            _require(not self.rafts, f"only a wavefront job moves several rafts, not a {self.kind.value} job")
        _require(not math.isnan(self.deadline), "deadline must be a time or inf, not NaN")
        _require(math.isfinite(self.detection_threshold_sigma) and self.detection_threshold_sigma > 0,
                 f"detection_threshold_sigma must be > 0, not {self.detection_threshold_sigma!r}")  # fmt: skip

    @property
    def moved_rafts(self) -> tuple[str, ...]:
        """The rafts whose images a replicator job moves: a wavefront job's corner rafts, else its raft."""
        return self.rafts or ((self.raft,) if self.raft else ())


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
    skip_finalize: bool = False
    """A rank died during the night: MPI_Finalize would wait for it forever (MPICH), so exit without it."""


@dataclass(frozen=True)
class Expect:
    """A replicator tells its distributor which images come next (LDM-230 §2.2.1, step 1)."""

    job_id: int
    visit: int
    exposure: int
    image_id: str
    raft: str
    replicator: int


@dataclass(frozen=True)
class ReadoutStarted:
    """The camera started reading ``image_id`` out (the OCS's startReadout): replicators may fetch it."""

    visit: int
    exposure: int
    image_id: str


@dataclass(frozen=True)
class ImageData:
    """Header of one raft image's bytes (a CDS raft-image file, zlib-compressed when ``compressed``)."""

    job_id: int
    visit: int
    exposure: int
    image_id: str
    raft: str
    kind: str
    checksum: str
    """Content checksum of the image (:meth:`lsstpipe.cds.image.RaftImage.verify`)."""
    sha256: str
    """SHA-256 of the raft file's bytes as the replicator read them and verified their content (before
    compression): what arrives is checked against it."""
    nbytes: int
    """Bytes that follow under :attr:`Tag.DATA`."""
    compressed: bool
    mode: str
    """Archiver mode the image is tagged with (science, calibration, engineering, catchup)."""
    telemetry: tuple[tuple[str, float], ...] = ()
    """The exposure's telemetry from the EFD replica, sent with the image."""
    sent_at: float = 0.0
    """``time.time()`` when the replicator sent it."""


@dataclass(frozen=True)
class Archived:
    """What became of one image at the Archive: stored, read back and verified — or why not."""

    job_id: int
    image_id: str
    raft: str
    kind: str
    ok: bool
    where: str
    """``tape`` (raw images) or ``raw_cache`` (crosstalk-corrected ones)."""
    checksum: str | None
    distributor: int
    nbytes: int = 0
    error: str | None = None
    to_base: bool = False
    """False from the distributor to the DMCS; True on the DMCS's copy to the replicator (release the outage
    buffer's copy, or send the image again when ``error`` asks for it)."""


@dataclass(frozen=True)
class RaftPublished:
    """A distributor holds ``raft`` of ``image_id`` and serves its CCDs (to the Archive DMCS)."""

    visit: int
    exposure: int
    image_id: str
    raft: str
    distributor: int


@dataclass(frozen=True)
class LocateRaft:
    """Which distributor holds ``raft`` of ``image_id``? (worker → Archive DMCS)."""

    image_id: str
    raft: str


@dataclass(frozen=True)
class RaftLocation:
    """The answer to :class:`LocateRaft`: a distributor rank, or None with the reason (read the raw cache)."""

    image_id: str
    raft: str
    distributor: int | None
    reason: str = ""


@dataclass(frozen=True)
class CcdRequest:
    """Send me ``detector`` of ``image_id`` (worker → distributor)."""

    image_id: str
    detector: str


@dataclass(frozen=True)
class CcdData:
    """Header of one CCD's segments (int32, ``shape``) and its primary header; ``error`` when not served."""

    image_id: str
    detector: str
    shape: tuple[int, ...]
    checksum: str
    """SHA-256 of the segment bytes, verified by the worker."""
    nbytes: int = 0
    """Bytes that follow under :attr:`Tag.DATA` (0 with an error)."""
    header: tuple[tuple[str, Any], ...] = ()
    error: str | None = None


@dataclass(frozen=True)
class TelemetryReport:
    """Per-CCD SDQA, WCS and PSF values for the DMCS to publish to the OCS."""

    visit: int
    detector: str
    values: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class LinkStatus:
    """A replicator's link to its distributor: up or down, and why."""

    replicator: int
    up: bool
    reason: str = ""


@dataclass(frozen=True)
class FaultOrder:
    """Inject ``kind`` (:mod:`lsstpipe.runtime.faults`) now (``on``) or end it; ``visit`` the visit it hits."""

    kind: str
    on: bool
    visit: int = 0


@dataclass(frozen=True)
class FocalPlaneReduce:
    """Every CCD of ``visit`` is done: the string's workers combine their values with an MPI collective;
    ``direct``: to a worker outside the visit's string that ran some of its CCDs, which reports its own sums
    (:mod:`lsstpipe.runtime.focal_plane`). ``detectors``: the CCDs whose results the DMCS took from this
    worker, the only ones it counts (None: every CCD of the visit it ran)."""

    visit: int
    direct: bool = False
    detectors: tuple[str, ...] | None = None


Payload = (FocalPlaneReduce | LinkStatus | FaultOrder | ImageTransfer | JobAssignment | JobResult | Heartbeat | Stop | Expect | ReadoutStarted | ImageData | Archived
           | RaftPublished | LocateRaft | RaftLocation | CcdRequest | CcdData | TelemetryReport)  # fmt: skip
#: The tag of each payload type.
TAG_OF: dict[type, Tag] = {
    JobAssignment: Tag.JOB, JobResult: Tag.RESULT, Heartbeat: Tag.HEARTBEAT, Stop: Tag.STOP, Expect: Tag.EXPECT,
    ReadoutStarted: Tag.READOUT, ImageData: Tag.IMAGE, Archived: Tag.ARCHIVED, RaftPublished: Tag.PUBLISHED,
    LocateRaft: Tag.LOCATE, RaftLocation: Tag.LOCATION, CcdRequest: Tag.CCD_REQUEST, CcdData: Tag.CCD_DATA,
    TelemetryReport: Tag.TELEMETRY, LinkStatus: Tag.LINK, FaultOrder: Tag.FAULT, ImageTransfer: Tag.TRANSFER,
    FocalPlaneReduce: Tag.REDUCE,
}  # fmt: skip
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
    except (ValueError, KeyError):
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
