"""Replicator ranks: raft images from the CDS buffer to the Archive (LDM-230 §2.2).

A replicator job (one raft, or the wavefront sensors, of one exposure) follows LDM-230: tell the paired
distributor which images come; wait for startReadout; take the crosstalk-corrected raft image from the
CDS, verify its checksum, send it with its telemetry to the distributor (zlib-compressed if configured)
while keeping a copy in the Base's network outage buffer and raw image cache; then the same for the raw
image, which goes to the outage buffer and the Base tape. Every transfer, good or bad, goes to the DMCS as
an :class:`~lsstpipe.db.records.ImageTransfer` for the control database.

The other end, the distributor (:mod:`lsstpipe.runtime.distributor`), verifies, publishes, serves workers
and stores at the Archive; an outage-buffer copy leaves the buffer only when the Archive's confirmation
comes back. The storage paths and the archive settings of both ends are defined here.

Catch-up jobs use the same classes: a catch-up replicator sends an image found in the outage buffer or,
failing that, the CDS buffer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lsstpipe.archive.blobs import ImageKey, ItemMeta, decode_image
from lsstpipe.archive.storage import OutageBuffer, OutageBufferFull, RawImageCache
from lsstpipe.archive.tape import TapeArchive
from lsstpipe.cds.image import CDSError
from lsstpipe.db.records import ImageTransfer
from lsstpipe.runtime.layout import Role
from lsstpipe.runtime.messages import (
    Archived,
    Expect,
    FaultOrder,
    Heartbeat,
    ImageData,
    JobAssignment,
    JobKind,
    JobResult,
    LinkStatus,
    ReadoutStarted,
)
from lsstpipe.runtime.postman import Envelope, PeerLost, Postman

log = logging.getLogger(__name__)

__all__ = ["ArchiveSettings", "Replicator", "StoragePaths", "report_transfer", "sha256_hex"]

KINDS = ("crosstalk_corrected", "raw")


@dataclass(frozen=True)
class StoragePaths:
    """Where the night stores images: the Base's and the Archive's stores are separate."""

    out: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))

    @property
    def cds(self) -> Path:
        return self.out / "cds"

    @property
    def outage_buffer(self) -> Path:
        return self.out / "base" / "outage_buffer"

    @property
    def base_raw_cache(self) -> Path:
        return self.out / "base" / "raw_cache"

    @property
    def base_tape(self) -> Path:
        return self.out / "base" / "tape"

    @property
    def archive_raw_cache(self) -> Path:
        return self.out / "archive" / "raw_cache"

    @property
    def archive_tape(self) -> Path:
        return self.out / "archive" / "tape"


@dataclass(frozen=True)
class ArchiveSettings:
    """Archiver settings used by the ranks (from the Archiver's configuration)."""

    compress: bool = False
    """zlib level 1 on the CDS file's bytes (already Blosc-LZ4): 41 % fewer bytes for ~0.5 s of CPU per 38 MB."""
    max_retries: int = 3
    outage_capacity_bytes: int = 8 << 30
    readout_timeout_s: float = 30.0
    """How long a replicator waits for an image after startReadout before leaving it to catch-up."""
    heartbeat_s: float = 0.25
    link_timeout_s: float = 1.5
    """A link without a heartbeat answer for this long is down."""
    slow_link_delay_s: float = 0.8
    """Fault injection: a slow link takes this many seconds per transfer more than :meth:`slow_after` allows."""
    slow_transfer_s: float = 0.5
    """The fixed part of :meth:`slow_after`: a transfer's set-up allowance in seconds."""
    slow_link_mb_s: float = 100.0
    """The slowest acceptable Base → Archive rate in MB/s (the size-dependent part of :meth:`slow_after`)."""
    keep_rafts: int = 24
    """Crosstalk-corrected rafts a distributor keeps in memory for CCD requests (older ones: raw cache)."""

    def __post_init__(self) -> None:
        if not isinstance(self.compress, bool):
            raise ValueError(f"compress must be true or false, not {self.compress!r}")
        for name, least in (("max_retries", 0), ("outage_capacity_bytes", 1), ("keep_rafts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer ≥ {least}, not {value!r}")
        for name in ("readout_timeout_s", "heartbeat_s", "link_timeout_s", "slow_link_delay_s", "slow_transfer_s",
                     "slow_link_mb_s"):  # fmt: skip
            value, zero = getattr(self, name), name == "slow_link_delay_s"  # 0: a slow link adds nothing
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and abs(value) < float("inf")
            unit = "MB/s" if name.endswith("_mb_s") else "seconds"
            if not number or value < 0 or (value == 0 and not zero):
                raise ValueError(f"{name} must be a number of {unit} {'≥' if zero else '>'} 0, not {value!r}")

    def slow_after(self, nbytes: int) -> float:
        """Seconds after which a transfer of ``nbytes`` makes its replicator report the link slow (LDM-230,
        Failure Modes: replicator jobs "not completing in the expected amount of time"): ``slow_transfer_s``
        plus the bytes at ``slow_link_mb_s``. The time is the send's, which includes the wait for the
        distributor to finish storing and verifying the image before (~1 s for a ~190 MB full-size raft):
        a fixed 0.5 s, right for the mini camera's rafts, sent a healthy pair of a 16-rank night on LSSTCam
        CCDs to the local-only pool and its rafts to catch-up."""
        return self.slow_transfer_s + nbytes / (self.slow_link_mb_s * 1e6)


def sha256_hex(data: np.ndarray | bytes) -> str:
    """The SHA-256 of the bytes of ``data`` (an array's memory as it lies), as hex: what travels with every transfer."""
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


@dataclass
class _RepJob:
    job: JobAssignment
    readout: bool = False
    readout_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.time)
    sent: int = 0
    stored: int = 0
    telemetry: tuple = ()
    failures: list[str] = field(default_factory=list)


class Replicator:
    """The replicator side of a pair (or of a catch-up pair), on rank ``postman.rank``."""

    def __init__(self, postman: Postman, distributor: int, paths: StoragePaths, settings: ArchiveSettings,
                 dmcs: int = 0) -> None:  # fmt: skip
        self.post, self.distributor, self.paths, self.settings, self.dmcs = postman, distributor, paths, settings, dmcs
        self.name = f"replicator {postman.rank}"
        self.jobs: dict[int, _RepJob] = {}
        self.outage = OutageBuffer(paths.outage_buffer, settings.outage_capacity_bytes)
        self.raw_cache = RawImageCache(paths.base_raw_cache)
        self.tape = TapeArchive(paths.base_tape, f"base-{postman.rank:04d}")
        self.link_up = True
        self.link_cut = self.slow = self.corrupt_next = self.buffer_full = False
        self._last_beat = self._last_ack = time.monotonic()
        self._seq = self._unanswered = 0
        self.die_in_visit: int | None = None
        self._efd = None
        self._reported_up = True

    # ---- messages -----------------------------------------------------------------------------------------
    def handle(self, env: Envelope) -> bool:
        p = env.payload
        if isinstance(p, JobAssignment) and p.kind in (JobKind.SCIENCE_RAFT, JobKind.WAVEFRONT, JobKind.CATCHUP):
            self._start(p)
        elif isinstance(p, ReadoutStarted):
            for job in self.jobs.values():
                if p.image_id in job.job.image_ids and not job.readout:
                    job.readout, job.readout_at = True, time.time()
        elif isinstance(p, Archived) and p.to_base:
            self._confirmed(p)
        elif isinstance(p, Heartbeat) and p.role is Role.DISTRIBUTOR and env.source == self.distributor:
            self._last_ack, self._unanswered = time.monotonic(), 0
        elif isinstance(p, FaultOrder):
            self._fault(p)
        else:
            return False
        return True

    def _fault(self, order: FaultOrder) -> None:
        if order.kind == "link-cut":
            self.link_cut = order.on
        elif order.kind == "slow-link":
            self.slow = order.on
        elif order.kind == "corrupt":
            self.corrupt_next = order.on
        elif order.kind == "fill-buffer":
            self.buffer_full = order.on
        elif order.kind == "kill-replicator":
            self.die_in_visit = order.visit if order.on else None

    def _start(self, job: JobAssignment) -> None:
        self.jobs[job.job_id] = _RepJob(job, readout=job.kind is JobKind.CATCHUP)
        if job.kind is not JobKind.CATCHUP and self._link_ok():
            for image_id in job.image_ids:
                for raft in job.moved_rafts:
                    self._send_safe(Expect(job.job_id, job.visit, job.exposure, image_id, raft, self.post.rank))

    # ---- periodic work --------------------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_beat >= self.settings.heartbeat_s:
            self._last_beat = now
            self._seq += 1
            beat = Heartbeat(self.post.rank, Role.REPLICATOR, self._seq, time.time())
            if not self.link_cut:
                self._send_safe(beat)
            if self.dmcs != self.post.rank:  # the DMCS watches replicators of their own ranks
                try:
                    self.post.send(beat, self.dmcs)
                except PeerLost:
                    pass
            self._unanswered += 1
        # counted in beats, not seconds: a rank busy with a long transfer sends none and concludes nothing
        up = not self.link_cut and self._unanswered <= max(2, round(self.settings.link_timeout_s /
                                                                      self.settings.heartbeat_s))  # fmt: skip
        if up != self._reported_up:
            self._reported_up = up
            self._report_link(up, "heartbeats answered again" if up else "no heartbeat answer from the distributor")
        for job_id, rj in list(self.jobs.items()):
            if rj.readout and (rj.job.kind is JobKind.CATCHUP or self._arrived(rj)):
                del self.jobs[job_id]
                self._run(rj)

    def _arrived(self, rj: _RepJob) -> bool:
        """Whether the job's images are in the CDS buffer (or it waited too long: fetch fails and says so)."""
        if time.time() - rj.readout_at > self.settings.readout_timeout_s:
            return True
        return all(self._cds_path(ImageKey(i, raft, k)).is_file()
                   for i in rj.job.image_ids for raft in rj.job.moved_rafts for k in KINDS)  # fmt: skip

    def _cds_path(self, key: ImageKey) -> Path:
        return self.paths.cds / key.day_obs / key.image_id / f"{key.raft}_{key.kind}.h5"

    def _report_link(self, up: bool, reason: str) -> None:
        self.link_up = up
        try:
            self.post.send(LinkStatus(self.post.rank, up, reason), self.dmcs)
        except PeerLost:
            pass

    def _link_ok(self) -> bool:
        return not self.link_cut and self.link_up

    def _send_safe(self, payload, data=None) -> bool:
        if self.distributor in self.post.dead:
            return False
        try:
            self.post.send(payload, self.distributor, data)
            return True
        except PeerLost:
            return False

    # ---- one job ------------------------------------------------------------------------------------------
    def _run(self, rj: _RepJob) -> None:
        job = rj.job
        t0 = time.time()
        kinds = (job.mode.split(":", 1)[1],) if job.kind is JobKind.CATCHUP and ":" in job.mode else KINDS
        for image_id in job.image_ids:
            rj.telemetry = self._efd_telemetry(image_id)
            for key in (ImageKey(image_id, raft, kind) for raft in job.moved_rafts for kind in kinds):
                try:
                    data, checksum = self._fetch(key, job)
                except (CDSError, OSError, LookupError) as exc:
                    rj.failures.append(f"{key}: {exc}")
                    self._transfer(key, "cds", self.name, None, 0, False, f"fetch failed: {exc}")
                    continue
                self._store_base(rj, key, data, checksum, job)
                if self.die_in_visit is not None and job.visit == self.die_in_visit and self.post.rank != self.dmcs:
                    log.error("fault injection: replicator rank %d dies while it holds %s", self.post.rank, key)
                    os._exit(137)
                self._ship(rj, key, data, checksum, job)
        counts = (("sent", rj.sent), ("stored", rj.stored), ("failures", len(rj.failures)))
        if rj.failures and not rj.sent and not rj.stored:
            exc = RuntimeError("; ".join(rj.failures)[:2000])
            result = JobResult.failure(job.job_id, self.post.rank, exc, time.time() - t0, retriable=True)
        else:
            result = JobResult(job.job_id, self.post.rank, True, time.time() - t0, counts=counts,
                               message="; ".join(rj.failures)[:2000] or None)  # fmt: skip
        self.post.send(result, self.dmcs)

    def _efd_telemetry(self, image_id: str) -> tuple[tuple[str, float], ...]:
        """The exposure's telemetry from the EFD, read from the US DAC replica (falling back up the chain);
        empty when the EFD is unreachable or has not replicated it yet (logged)."""
        try:
            if self._efd is None:
                from lsstpipe.db.efd_replication import open_efd

                self._efd = open_efd(self.paths.out / "efd")
            result = self._efd.read(lambda r: r.events("camera_exposure", image_id))
        except Exception as exc:  # noqa: BLE001 — no EFD: the image still goes, without its telemetry
            log.warning("%s: EFD query for %s failed: %s", self.name, image_id, exc)
            return ()
        if not result.value:
            log.info("%s: %s not in the %s EFD replica yet", self.name, image_id, result.site.value)
            return ()
        data = result.value[-1].data
        return tuple((k, float(v)) for k, v in sorted(data.items()) if isinstance(v, int | float)) + (
            ("efd_lsn", float(result.value[-1].lsn)),)  # fmt: skip

    def _fetch(self, key: ImageKey, job: JobAssignment) -> tuple[bytes, str]:
        """The image's bytes, verified, and its content checksum: from the outage buffer (catch-up) or the CDS."""
        if job.kind is JobKind.CATCHUP and self.outage.has(key):
            data = self.outage.get(key)
        else:
            path = self._cds_path(key)
            if not path.is_file():
                raise CDSError(f"{key} is not in the CDS buffer {self.paths.cds} "
                               f"{self.settings.readout_timeout_s:g} s after startReadout")  # fmt: skip
            data = path.read_bytes()
        return data, decode_image(data, key).checksum  # decoding verifies the checksum

    def _store_base(self, rj: _RepJob, key: ImageKey, data: bytes, checksum: str, job: JobAssignment) -> None:
        meta = ItemMeta(checksum, len(data), job.mode.split(":", 1)[0])
        if job.kind is not JobKind.CATCHUP:
            for attempt in range(self.settings.max_retries + 1):
                try:
                    if key.kind == "raw":
                        self.tape.append(key, data, meta)
                    else:
                        self.raw_cache.put(key, data, meta)
                    break
                except OSError as exc:
                    if attempt == self.settings.max_retries:
                        rj.failures.append(f"{key}: Base store failed: {exc}")
            where = "outage_buffer"
            try:
                if self.buffer_full:
                    raise OutageBufferFull(f"the network outage buffer {self.paths.outage_buffer} is full "
                                           "(injected fault)")  # fmt: skip
                self.outage.put(key, data, meta)
                rj.stored += 1
                self._transfer(key, "cds", where, meta.checksum, len(data), True)
            except OutageBufferFull as exc:
                self._transfer(key, "cds", where, None, 0, False, str(exc))

    def _ship(self, rj: _RepJob, key: ImageKey, data: bytes, checksum: str, job: JobAssignment) -> None:
        if not self._link_ok():
            rj.failures.append(f"{key}: link to distributor {self.distributor} down; left in the outage buffer")
            self._transfer(key, self.name, f"distributor {self.distributor}", None, 0, False,
                           "link down: image kept at the Base for the Catch-Up Archiver")  # fmt: skip
            return
        payload = zlib.compress(data, 1) if self.settings.compress else data
        allowed = self.settings.slow_after(len(payload))
        injected = allowed + self.settings.slow_link_delay_s if self.slow else 0.0
        if injected:
            time.sleep(injected)
        if self.corrupt_next:
            self.corrupt_next = False
            damaged = bytearray(payload)
            damaged[len(damaged) // 2] ^= 0xFF
            payload = bytes(damaged)
        header = ImageData(job.job_id, job.visit, job.exposure, key.image_id, key.raft, key.kind,
                           checksum, sha256_hex(data), len(payload), self.settings.compress,
                           job.mode.split(":", 1)[0], rj.telemetry, time.time())  # fmt: skip
        t0 = time.monotonic()
        if self._send_safe(header, payload):
            rj.sent += 1
            took = time.monotonic() - t0 + injected
            if took > allowed:
                self._report_link(False, f"slow link: a {len(payload)} byte transfer took {took:.2f} s (more than "
                                         f"{allowed:.2f} s)")  # fmt: skip
                self._reported_up = False
        else:
            rj.failures.append(f"{key}: distributor {self.distributor} unreachable")

    def resend(self, key: ImageKey, job_id: int) -> None:
        """Send ``key`` again after the distributor rejected it (from the outage buffer, else the CDS).

        The copy is decoded and verified first, as every image the replicator sends: the distributor checks
        the bytes it receives against their SHA-256, not their content."""
        job = JobAssignment(job_id, JobKind.CATCHUP, 0, raft=key.raft, image_ids=(key.image_id,),
                            mode=f"science:{key.kind}")  # fmt: skip
        problems = []
        for where, read in (("outage_buffer", self.outage.get), ("cds", lambda k: self._cds_path(k).read_bytes())):
            try:
                data = read(key)
                checksum = decode_image(data, key).checksum
            except (CDSError, OSError, LookupError) as exc:
                problems.append(f"{where}: {exc}")
                continue
            self._ship(_RepJob(job), key, data, checksum, job)
            return
        self._transfer(key, "outage_buffer", self.name, None, 0, False,
                       f"cannot resend: no verified copy ({'; '.join(problems)}); left to catch-up")  # fmt: skip

    def _confirmed(self, a: Archived) -> None:
        key = ImageKey(a.image_id, a.raft, a.kind)
        if a.ok:
            if self.outage.has(key):
                self.outage.confirm(key)
        elif a.error and "resend" in a.error:
            self.resend(key, a.job_id)

    def _transfer(self, key: ImageKey, source: str, dest: str, checksum: str | None, nbytes: int, ok: bool,
                  error: str | None = None) -> None:  # fmt: skip
        report_transfer(self.post, self.dmcs, key, source, dest, checksum, nbytes, ok, error)


def report_transfer(post: Postman, dmcs: int, key: ImageKey, source: str, dest: str, checksum: str | None, nbytes: int,
              ok: bool, error: str | None = None) -> None:  # fmt: skip
    """Report one transfer, good or bad, to the DMCS for the control database (nothing if it is unreachable)."""
    try:
        post.send(ImageTransfer(key.image_id, key.raft, key.kind, source, dest, checksum, nbytes, ok, error,
                                time.time()), dmcs)  # fmt: skip
    except PeerLost:
        pass
