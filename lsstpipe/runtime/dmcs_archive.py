"""The archiving side of the night's scheduler on rank 0 (LDM-230 §2.3–2.4): replicator jobs on the pairs,
the Archive DMCS's answers to "which distributor holds this raft", and the Catch-Up Archiver's jobs.

:class:`ArchiveScheduling` is a part of :class:`~lsstpipe.runtime.dmcs_night.NightDMCS`, kept in its own
module: ``startIntegration`` → one replicator job per science raft and one for the wavefront sensors
(:meth:`NightPlan.replicator_jobs`) on the fully-operational pairs (at most two jobs per pair), then on the
local-only pool; a pair whose link is down or slow moves to the local-only pool and comes back after a
random interval once its heartbeats are answered again; images not archived in real time are moved by the
Catch-Up Archiver's pairs (from the outage buffer, else the CDS buffer), oldest first.

It uses these of the scheduler it is part of: ``post``, ``plan``, ``manifest``, ``settings``, ``recorder``,
``faults``, ``rng``, ``mode``, ``dead``, ``last_seen``, and its ``_id``, ``_send``, ``_job_started``,
``_job_finished`` and ``_declare_dead``.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from dataclasses import dataclass

from lsstpipe.control.cluster import batch_label
from lsstpipe.control.config import Pool
from lsstpipe.control.states import EntityName, OCSEvent
from lsstpipe.runtime.layout import NightLayout
from lsstpipe.runtime.messages import (
    Archived,
    FaultOrder,
    JobAssignment,
    JobKind,
    JobResult,
    LinkStatus,
    LocateRaft,
    RaftLocation,
    RaftPublished,
    ReadoutStarted,
)
from lsstpipe.runtime.plan import Visit

log = logging.getLogger(__name__)

__all__ = ["ArchiveScheduling"]


@dataclass
class _Pair:
    index: int
    replicator: int
    distributor: int
    pool: Pool
    catchup: bool = False
    jobs: int = 0
    back_at: float | None = None
    dead: bool = False


class ArchiveScheduling:
    """Replicator and catch-up jobs on the night's pairs, and the raft locations (module docstring)."""

    def _init_archiving(self, layout: NightLayout) -> None:
        self.pairs = [_Pair(p.index, p.replicator, p.distributor, p.pool) for p in layout.pairs]
        self.catchup_pairs = [_Pair(p.index, p.replicator, p.distributor, Pool.CATCHUP, catchup=True)
                              for p in layout.catchup_pairs]  # fmt: skip
        self.raft_jobs: dict[int, tuple[_Pair, tuple[str, ...], tuple[str, ...], int, float | None]] = {}
        """Replicator job id → (its pair, its rafts, its images, the visit's number (0: catch-up), when it ended)."""
        self.raft_started: dict[int, float] = {}
        """Replicator job id → when it was sent (``time.monotonic()``)."""
        self.raft_batches: dict[int, tuple[str, int]] = {}
        """Replicator job id → (its batch's label, its index in the batch)."""
        self.locations: dict[tuple[str, str], int] = {}
        """(image id, raft) → the distributor that holds the crosstalk-corrected raft."""
        self.waiting: dict[tuple[str, str], list[int]] = {}
        """(image id, raft) → the workers waiting to be told where it is."""
        self.readout_started: set[str] = set()
        self.catchup_kind: dict[int, str] = {}
        """Catch-up job id → the kind of image it archives (its result concerns that copy only)."""
        self.catchup_limit: int | None = None
        """The Catch-Up Archiver's ``max_concurrent_jobs`` (the conductor sets it from its installed
        configuration): catch-up jobs in flight at once; None: no limit."""

    # ---- events -----------------------------------------------------------------------------------------
    def start_readout(self, visit: Visit, exposure: int) -> None:
        image_id = visit.snaps[exposure].image_id
        self.readout_started.add(image_id)
        replicators = {pair.replicator for pair, _, images, _, _ in self.raft_jobs.values()
                       if image_id in images and not pair.dead}  # fmt: skip
        for replicator in sorted(replicators):
            self._send(ReadoutStarted(visit.visit, exposure, image_id), replicator)

    def end_readout(self, visit: Visit, exposure: int) -> None:
        """The camera writes the exposure's raft images into the CDS buffer (copied from the repository)."""
        snap = visit.snaps[exposure]
        src = self.plan.repo / "cds" / snap.day_obs / snap.image_id
        dst = self.manifest.out / "cds" / snap.day_obs / snap.image_id
        dst.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for raft in self.plan.rafts:
            for kind in ("crosstalk_corrected", "raw"):
                for suffix in (".h5.sha256", ".h5"):  # the file last: readers wait for it
                    name = f"{raft}_{kind}{suffix}"
                    if (src / name).is_file():
                        shutil.copyfile(src / name, dst / f".{name}.tmp")
                        (dst / f".{name}.tmp").rename(dst / name)
                self.manifest.image(visit, snap.image_id, raft, kind).readout_end = now
        if exposure == len(visit.snaps) - 1:
            for rec in self.manifest.ccds_of(visit.visit):
                if rec.status != "processed":  # a CCD carried over from an earlier run keeps its record
                    rec.readout_end = now

    def _start_integration(self, visit: Visit, exposure: int) -> None:
        image_id = visit.snaps[exposure].image_id
        for fault in self.faults:
            if fault.kind == "kill-replicator" and fault.first == visit.number and exposure == 0:
                victim = self._replicator_victim()
                if victim is not None:
                    self._send(FaultOrder("kill-replicator", True, visit.visit), victim.replicator)
            if fault.kind in ("link-cut", "slow-link", "fill-buffer", "corrupt"):
                on = fault.covers(visit.number)
                for target in self.pairs:
                    if fault.kind != "corrupt" or (on and exposure == 0):
                        self._send(FaultOrder(fault.kind, on, visit.visit), target.replicator)
        label = batch_label(OCSEvent.START_INTEGRATION.value, visit.visit, exposure)
        for index, rafts in enumerate(self.plan.replicator_jobs()):
            pair = self._choose_pair()
            if pair is None:  # no pair left: the images wait in the CDS buffer for the Catch-Up Archiver
                for raft in rafts:
                    for kind in ("crosstalk_corrected", "raw"):
                        self.manifest.image(visit, image_id, raft, kind).replicator_done = time.time()
                self._job_finished(EntityName.ARCHIVER, label, index, "failed", "no live replicator/distributor "
                                   "pair: left to the Catch-Up Archiver")  # fmt: skip
                continue
            wavefront = rafts[0] in self.plan.wavefront_rafts
            job = JobAssignment(self._id(), JobKind.WAVEFRONT if wavefront else JobKind.SCIENCE_RAFT, visit.visit,
                                exposure, None if wavefront else rafts[0], image_ids=(image_id,), mode=self.mode,
                                rafts=rafts if wavefront else ())  # fmt: skip
            pair.jobs += 1
            self.raft_jobs[job.job_id] = (pair, rafts, (image_id,), visit.number, None)
            self.raft_started[job.job_id] = time.monotonic()
            self.raft_batches[job.job_id] = (label, index)
            if self._send(job, pair.replicator):
                self._job_started(EntityName.ARCHIVER, label, index, pair.replicator)
            if image_id in self.readout_started:  # the event came late: the readout has begun already
                self._send(ReadoutStarted(visit.visit, exposure, image_id), pair.replicator)

    def _replicator_victim(self) -> _Pair | None:
        """The pair whose replicator an injected kill-replicator takes: one with a rank of its own whose loss
        leaves a catch-up pair on other ranks (the hot-spare pairs, if any, take the real-time jobs)."""
        for pair in self.pairs:
            catchup = [c for c in self.catchup_pairs if pair.replicator not in (c.replicator, c.distributor)]
            if pair.replicator != self.post.rank and not pair.dead and catchup:
                return pair
        return None

    def _choose_pair(self) -> _Pair | None:
        live = [p for p in self.pairs if not p.dead]
        full = sorted((p for p in live if p.pool is Pool.FULLY_OPERATIONAL), key=lambda p: p.jobs)
        if full and full[0].jobs < 2:
            return full[0]
        local = sorted((p for p in live if p.pool is Pool.LOCAL_ONLY), key=lambda p: p.jobs)
        if local and (not full or local[0].jobs < full[0].jobs):
            return local[0]
        if full:
            return full[0]
        if local:
            return local[0]
        log.error("no live replicator/distributor pair left: the Catch-Up Archiver takes the images")
        return None

    # ---- messages and results ---------------------------------------------------------------------------
    def _published(self, p: RaftPublished) -> None:
        """A distributor holds a crosstalk-corrected raft: the workers waiting for it are told where."""
        key = (p.image_id, p.raft)
        self.locations[key] = p.distributor
        for worker in self.waiting.pop(key, []):
            self._send(RaftLocation(p.image_id, p.raft, p.distributor), worker)

    def _locate(self, p: LocateRaft, worker: int) -> None:
        key = (p.image_id, p.raft)
        if key in self.locations and self.locations[key] not in self.dead:
            self._send(RaftLocation(p.image_id, p.raft, self.locations[key]), worker)
            return
        image = self.manifest.find_image(p.image_id, p.raft, "crosstalk_corrected")
        if image is not None and image.raw_cache:  # archived, but no distributor known (e.g. after a takeover)
            self._send(RaftLocation(p.image_id, p.raft, None, "in the Archive's raw image cache"), worker)
            return
        if image is not None and image.replicator_done and not image.raw_cache:
            self._send(RaftLocation(p.image_id, p.raft, None, "not archived in real time (link down or transfer "
                                    "failed); left to the Catch-Up Archiver"), worker)  # fmt: skip
            return
        if worker not in self.waiting.setdefault(key, []):
            self.waiting[key].append(worker)

    def _archived(self, a: Archived) -> None:
        image = self.manifest.find_image(a.image_id, a.raft, a.kind)
        if image is None:
            return
        if a.ok:
            if a.kind == "raw":
                image.tape = True
            else:
                image.raw_cache = True
            image.checksum = a.checksum
        job = self.raft_jobs.get(a.job_id)
        target = job[0].replicator if job is not None else None
        if target is None:
            target = next((p.replicator for p in self.pairs + self.catchup_pairs if p.distributor == a.distributor),
                          None)  # fmt: skip
        if target is not None:
            self._send(Archived(a.job_id, a.image_id, a.raft, a.kind, a.ok, a.where, a.checksum, a.distributor,
                                a.nbytes, a.error, to_base=True), target)  # fmt: skip

    def _link(self, s: LinkStatus) -> None:
        pair = next((p for p in self.pairs if p.replicator == s.replicator), None)
        if pair is None:
            return
        if not s.up and pair.pool is Pool.FULLY_OPERATIONAL:
            log.warning("pair %d (replicator %d) → local-only pool: %s", pair.index, s.replicator, s.reason)
            pair.pool, pair.back_at = Pool.LOCAL_ONLY, None
        elif s.up and pair.pool is Pool.LOCAL_ONLY:
            pair.back_at = time.monotonic() + self.rng.uniform(*self.settings.link_back_s)

    def _raft_result(self, r: JobResult) -> bool:
        """A replicator or catch-up job's result: its pair is free again, its batch job ends, its images' state
        moves on; False when ``r`` is not such a job's."""
        if r.job_id not in self.raft_jobs:
            return False
        pair, rafts, images, number, done = self.raft_jobs[r.job_id]
        if done is not None:  # a second result (a timeout's, then the replicator's): counted once
            return True
        pair.jobs = max(0, pair.jobs - 1)
        self.raft_jobs[r.job_id] = (pair, rafts, images, number, time.time())
        if r.job_id in self.raft_batches:
            self._job_finished(EntityName.ARCHIVER, *self.raft_batches[r.job_id], "completed" if r.ok else "failed",
                               "" if r.ok else f"{r.error_type}: {r.message}")  # fmt: skip
        catchup = pair.catchup or number == 0
        kinds = (self.catchup_kind.pop(r.job_id),) if r.job_id in self.catchup_kind else \
            ("crosstalk_corrected", "raw")  # fmt: skip
        for image_id, raft, kind in itertools.product(images, rafts, kinds):
            # (a catch-up job moved one kind: the other may still be in flight)
            image = self.manifest.find_image(image_id, raft, kind)
            if image is None:
                continue
            image.replicator_done = time.time()
            if catchup:
                image.catchup_pending = False  # not archived by it: the next scan tries again
            else:
                image.outage_buffer = image.outage_buffer or r.ok
        return True

    # ---- liveness ---------------------------------------------------------------------------------------
    def _check_pairs(self, now: float) -> None:
        """Liveness of the pairs (``now``: ``time.monotonic()``): replicators silent past the heartbeat timeout
        are dead, replicator jobs without a result past ``raft_job_timeout_s`` go to catch-up, and local-only
        pairs whose wait is over return to the fully-operational pool."""
        for pair in self.pairs + self.catchup_pairs:
            rep = pair.replicator
            if rep != self.post.rank and rep not in self.dead and rep in self.last_seen and \
                    now - self.last_seen[rep] > self.settings.heartbeat_timeout_s:  # fmt: skip
                self._declare_dead(rep, f"no heartbeat for {self.settings.heartbeat_timeout_s:g} s")
        stale = self.settings.raft_job_timeout_s
        for job_id, (pair, rafts, images, _number, done) in list(self.raft_jobs.items()):
            if done is None and now - self.raft_started.get(job_id, now) > stale:
                log.error("replicator job %d (%s %s) gave no result in %g s: left to the Catch-Up Archiver",
                          job_id, images[0], "+".join(rafts), stale)  # fmt: skip
                self._raft_result(JobResult.failure(job_id, pair.replicator, TimeoutError("no result")))
        for pair in self.pairs:
            if pair.back_at is not None and now >= pair.back_at:
                log.info("pair %d back in the fully-operational pool", pair.index)
                pair.pool, pair.back_at = Pool.FULLY_OPERATIONAL, None

    def _pair_lost(self, rank: int) -> None:
        """``rank`` is dead: the pairs it belongs to are too, and their unfinished replicator jobs end failed
        (their images go to the Catch-Up Archiver, from the CDS buffer)."""
        for pair in self.pairs + self.catchup_pairs:
            if rank in (pair.replicator, pair.distributor):
                pair.dead = True
        for job_id, (pair, _, _, _, done) in list(self.raft_jobs.items()):
            if pair.dead and done is None:
                self._raft_result(JobResult.failure(job_id, pair.replicator, RuntimeError(f"rank {rank} died")))

    # ---- catch-up ---------------------------------------------------------------------------------------
    def catchup_jobs(self, final: bool = False) -> int:
        """Send unarchived images to the catch-up pairs, oldest first; returns how many jobs were sent.

        During the night: the images whose replicator job ended without the Archive confirming them. At the
        end (``final``), the Catch-Up Archiver's scan: every image in the CDS buffer and every image still
        in the network outage buffer that the control database records no verified Archive copy of.
        """
        now = time.time()

        def due(im) -> bool:  # at the end, every one; during the night, once catchup_after_s has passed
            return final or bool(im.replicator_done and now - im.replicator_done > self.settings.catchup_after_s)

        todo = [im for im in self.manifest.images()
                if not im.archived and im.readout_end is not None and not im.catchup_pending and due(im)]  # fmt: skip
        if final:
            todo += [im for im in self._scan_for_unarchived() if im not in todo and not im.catchup_pending]
        todo.sort(key=lambda im: (im.readout_end or 0.0, im.image_id, im.raft, im.kind))
        pairs = [p for p in self.catchup_pairs if not p.dead and p.replicator not in self.dead]
        if not pairs:
            return 0
        if self.catchup_limit is not None:  # the oldest first; the rest at a later scan
            running = sum(1 for pair, *_, done in self.raft_jobs.values() if pair in pairs and done is None)
            todo = todo[: max(0, self.catchup_limit - running)]
        for k, im in enumerate(todo):
            pair = pairs[k % len(pairs)]
            job = JobAssignment(self._id(), JobKind.CATCHUP, im.visit, raft=im.raft, image_ids=(im.image_id,),
                                mode=f"catchup:{im.kind}")  # fmt: skip
            self.raft_jobs[job.job_id] = (pair, (im.raft,), (im.image_id,), 0, None)
            self.catchup_kind[job.job_id] = im.kind
            im.catchup_pending = True
            im.catchup = True
            self._send(job, pair.replicator)
        return len(todo)

    def _scan_for_unarchived(self) -> list:
        """Images in the CDS buffer or the outage buffer with no verified Archive copy in the control database."""
        from lsstpipe.archive.storage import OutageBuffer
        from lsstpipe.cds.buffer import CDSClient

        out = self.manifest.out
        found: list[tuple[str, str, str]] = []
        if (out / "cds").is_dir():
            found += [(e.image_id, e.raft, e.kind.value) for e in CDSClient(out / "cds").scan()]
        if (out / "base" / "outage_buffer").is_dir():
            found += [
                (i.key.image_id, i.key.raft, i.key.kind) for i in OutageBuffer(out / "base" / "outage_buffer").pending()
            ]
        archived: dict[str, set[tuple[str, str]]] = {}
        images = []
        for image_id, raft, kind in dict.fromkeys(found):
            if self.recorder is not None:
                if image_id not in archived:
                    archived[image_id] = {(t.raft, t.kind) for t in self.recorder.transfers(image_id)
                                          if t.ok and t.destination.startswith("archive")}  # fmt: skip
                if (raft, kind) in archived[image_id]:
                    continue
            im = self.manifest.find_image(image_id, raft, kind)
            if im is not None and not im.archived:
                images.append(im)
        return images
