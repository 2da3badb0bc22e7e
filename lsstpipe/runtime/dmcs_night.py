"""Rank 0 of the night: the Base and Archive DMCS scheduling jobs on the night's ranks (LDM-230 §2.1–2.7).

The OCS side plays the night's script into the Base DMCS of :mod:`lsstpipe.control` (init, configure,
enable, each visit's events, the end-of-night release); the entities it enables turn events into jobs
through :class:`NightCluster`, and this module runs them on MPI ranks:

- ``startIntegration`` → one replicator job per science raft and one for the wavefront sensors of the
  corner rafts (:meth:`NightPlan.replicator_jobs`), on the fully-operational pairs (at most two jobs per
  pair), then on the local-only pool;
- ``nextVisit`` → one worker job per CCD and wavefront sensor on the next worker string, dispatched as
  workers free up (a worker prefetches while the snaps integrate);
- the Archive DMCS side answers workers' "which distributor holds this raft";
- every transfer is recorded in the control database, and so is every job of the batches the entities
  submitted (job ``k`` of a ``nextVisit`` batch is the plan's ``k``-th detector, of a ``startIntegration``
  batch its ``k``-th replicator job): its start when it is sent to a rank (again, on its new rank, when it is
  rescheduled or reprocessed), its end with the CCD's final status (``processed``, ``failed``, ``late``,
  ``skipped``) or the replicator job's (``completed``, ``failed``) and the reason; the manifest says where
  every image is and counts the records the control database lost.

Failure handling: a worker without heartbeats for ``heartbeat_timeout_s`` is dead and its job runs again
on a spare at a lower priority, reading the Archive's raw image cache; an application failure is
recorded and not rescheduled; a late job is queued for reprocessing after the night's last visit; a
replicator whose link is down or slow moves to the local-only pool and comes back after a random interval
once its heartbeats are answered again; images not archived in real time are moved by the Catch-Up
Archiver's pairs (from the outage buffer, else the CDS buffer), oldest first.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from lsstpipe.control.cluster import batch_label
from lsstpipe.control.config import PipelineParameters
from lsstpipe.control.states import EntityName, OCSEvent
from lsstpipe.runtime.dmcs_archive import ArchiveScheduling
from lsstpipe.runtime.focal_plane import SUMS_REPORT, FocalPlaneScheduling, FocalPlaneTally
from lsstpipe.runtime.layout import NightLayout, Role
from lsstpipe.runtime.manifest import TERMINAL, CcdRecord, Manifest
from lsstpipe.runtime.messages import (
    Archived,
    FaultOrder,
    Heartbeat,
    ImageTransfer,
    JobAssignment,
    JobKind,
    JobResult,
    LinkStatus,
    LocateRaft,
    RaftPublished,
    Stop,
    TelemetryReport,
    tag_of,
)
from lsstpipe.runtime.night_cluster import NightCluster, SchedulerSettings, night_job_counts
from lsstpipe.runtime.plan import EventKind, NightPlan, PlannedEvent, Visit
from lsstpipe.runtime.postman import Envelope, PeerLost, Postman

log = logging.getLogger(__name__)

__all__ = ["NightCluster", "NightDMCS", "SchedulerSettings", "night_job_counts"]


@dataclass
class _Ccd:
    job_id: int
    visit: Visit
    detector: str
    det_id: int
    string: int
    record: CcdRecord
    priority: int = 0
    attempt: int = 1
    rank: int | None = None
    started: float = 0.0
    from_raw_cache: bool = False
    queued_at: float = field(default_factory=time.time)
    mode: str = "science"
    label: str = ""
    """The batch the job belongs to (:func:`~lsstpipe.control.cluster.batch_label`); empty: none."""
    index: int = -1
    """The job's index in its batch: the detector's in the plan."""
    reported: bool = False
    """Its end is recorded in the control database already (or was, before a DMCS crash)."""
    pipeline: PipelineParameters = field(default_factory=PipelineParameters)
    """The Alert Production Cluster's pipeline parameters when the job was launched."""


class NightDMCS(ArchiveScheduling, FocalPlaneScheduling):
    """The night's scheduler on rank 0 (module docstring); its archiving side is :class:`ArchiveScheduling`, its
    side of the visits' focal-plane values :class:`FocalPlaneScheduling`."""

    def __init__(self, postman: Postman, layout: NightLayout, plan: NightPlan, manifest: Manifest,
                 settings: SchedulerSettings, faults: tuple = (), recorder: Any = None,
                 publish: Any = None) -> None:  # fmt: skip
        self.post, self.layout, self.plan, self.manifest, self.settings = postman, layout, plan, manifest, settings
        self.faults = faults
        self.recorder = recorder
        self.publish = publish  # (entity, name, value) → the OCS telemetry of the Base DMCS
        self.rng = random.Random(settings.seed)
        self._init_archiving(layout)
        self.strings = [list(s) for s in layout.strings]
        self.spares = list(layout.spare_workers)
        self.busy: dict[int, _Ccd] = {}
        self.last_seen: dict[int, float] = {}
        self.dead: set[int] = set()
        self.queue: list[_Ccd] = []
        self.reprocess: list[_Ccd] = []
        self.jobs: dict[int, Any] = {}
        self.mode = "science"
        """The Archiver's and the Alert Production Cluster's mode (calibration before the visits)."""
        self.pipeline = PipelineParameters()
        """The pipeline parameters of the Alert Production Cluster's installed configuration (the conductor
        sets them after each configure): the CCD jobs a visit launches carry them to the workers."""
        self.visit_string: dict[int, int] = {}
        self.warm: set[int] = set()
        """Workers that returned a result (their kernels are compiled)."""
        self.last_ran: dict[tuple[int, str], int] = {}
        """The worker each detector's last job of each string's visits went to (:meth:`dispatch`'s CCD
        affinity; the strings take turns with the visits)."""
        self.focal_plane = FocalPlaneTally()
        # replicators whose distributor is this rank: their heartbeats are the distributor's, not the DMCS's
        self._local_partners = {p.replicator for p in self.pairs + self.catchup_pairs
                                if p.distributor == postman.rank}  # fmt: skip
        self._next_id = 1
        self._next_string = 0
        self.killed_visits: set[int] = set()
        self._open: dict[tuple[str, int], _Ccd] = {}
        """CCD jobs started whose end is not recorded yet."""
        if isinstance(getattr(recorder, "write_failures", None), int):
            manifest.count_lost_records(lambda: {"control database": recorder.write_failures})

    # ---- helpers ------------------------------------------------------------------------------------------
    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _node(self, rank: int) -> str:
        return self.layout.roles_of(rank)[0].name.lower()

    def _job_started(self, entity: EntityName, label: str, index: int, rank: int) -> None:
        if self.recorder is not None and label:
            self.recorder.job_started(entity, label, index, self._node(rank), rank)

    def _job_finished(self, entity: EntityName, label: str, index: int, result: str, reason: str) -> None:
        if self.recorder is not None and label:
            self.recorder.job_finished(entity, label, index, result, reason)

    def _ccd_started(self, job: _Ccd, rank: int) -> None:
        if job.label and not job.reported:
            self._open[(job.label, job.index)] = job
            self._job_started(EntityName.ALERT_PRODUCTION_CLUSTER, job.label, job.index, rank)

    def _ccd_ended(self, job: _Ccd) -> None:
        """The job's result is final (not run again tonight): record it, with the CCD's status and reason."""
        self._open.pop((job.label, job.index), None)
        if job.label and not job.reported:
            job.reported = True
            self._job_finished(EntityName.ALERT_PRODUCTION_CLUSTER, job.label, job.index, job.record.status,
                               job.record.reason)  # fmt: skip

    def finish_open_jobs(self) -> int:
        """End of night: record the end of every CCD job not reported yet, started or still waiting (its
        record's status, else failed); returns how many."""
        jobs = list({(j.label, j.index): j for j in [*self._open.values(), *self.queue, *self.reprocess]
                     if j.label and not j.reported}.values())  # fmt: skip
        for job in jobs:
            if job.record.status not in TERMINAL:
                job.record.set("failed", job.record.reason or "not processed by the end of the night")
            self._ccd_ended(job)
        return len(jobs)

    def _ended_in_database(self, visit: int, label: str) -> set[int]:
        """The indexes of the jobs of batch ``label`` whose end the control database holds (none if the
        recorder cannot tell)."""
        jobs_of_visit = getattr(self.recorder, "jobs_of_visit", None)
        if jobs_of_visit is None:
            return set()
        try:
            batches = [b for b in jobs_of_visit(visit) if b.label == label]
        except Exception as exc:  # noqa: BLE001 — the database down: the jobs are recorded again (and refused)
            log.error("control database: cannot read the jobs of visit %d: %s", visit, exc)
            return set()
        return {j.index for j in batches[-1].jobs if j.ended is not None} if batches else set()

    def _send(self, payload, dest: int) -> bool:
        if dest in self.dead:
            return False
        try:
            self.post.send(payload, dest)
            return True
        except PeerLost:
            self._declare_dead(dest, "MPI reports it failed")
            return False

    # ---- events from the control plane --------------------------------------------------------------------
    def on_event(self, entity: EntityName, event: PlannedEvent) -> None:
        visit = event.visit
        label = batch_label(event.kind.value, visit.visit, event.exposure)
        if entity is EntityName.ALERT_PRODUCTION_CLUSTER and event.kind is EventKind.NEXT_VISIT:
            self._next_visit(visit, label=label)
        elif entity is EntityName.ALERT_PRODUCTION_CLUSTER and event.kind is EventKind.START_EXPOSURE:
            self._next_visit(visit, mode=self.mode, label=label)  # calibration/engineering: ISR only
        elif entity is EntityName.ARCHIVER and event.kind is EventKind.START_INTEGRATION:
            self._start_integration(visit, event.exposure)

    def _next_visit(self, visit: Visit, mode: str = "science", label: str | None = None) -> None:
        """Queue the visit's CCD jobs: batch ``label`` (default: that of the visit's nextVisit in science
        mode, of its startExposure otherwise)."""
        if label is None:
            event = OCSEvent.NEXT_VISIT if mode == "science" else OCSEvent.START_EXPOSURE
            label = batch_label(event.value, visit.visit, 0)
        sampled = visit.number < 0 or (visit.number - 1) % self.settings.sample_every == 0
        string = self._next_string
        self._next_string = (self._next_string + 1) % len(self.strings)
        self.visit_string[visit.visit] = string
        for index, det_name in enumerate(self.plan.detectors):
            rec = self.manifest.ccd(visit, det_name)
            if rec.status == "processed":  # in an earlier run of this night (idempotent restart)
                skip = "processed in an earlier run of this night"
            elif not self.pipeline.isr:
                skip = "the Alert Production Cluster's configuration runs no ISR (pipeline.isr: false)"
            elif not sampled:
                skip = f"visit not sampled (every {self.settings.sample_every}th visit is processed)"
            else:
                skip = ""
            if skip:
                if rec.status != "processed":
                    rec.set("skipped", skip)
                self._job_finished(EntityName.ALERT_PRODUCTION_CLUSTER, label, index, "skipped", skip)
                continue
            det = self.plan.camera[det_name]
            self.queue.append(_Ccd(self._id(), visit, det_name, det.id, string, rec, mode=mode, label=label,
                                   index=index, pipeline=self.pipeline))  # fmt: skip
        over = len(self.queue) - self.settings.queue_limit
        if over > 0:
            self.queue.sort(key=lambda j: (j.queued_at, j.job_id))
            for job in self.queue[:over]:
                job.record.set("skipped", f"dropped: more than {self.settings.queue_limit} jobs waited "
                                          "(the oldest unexecuted jobs go first)")  # fmt: skip
                self._ccd_ended(job)
            del self.queue[:over]
        for fault in self.faults:
            if fault.kind == "kill-worker" and fault.covers(visit.number):
                self._arm_kill(visit, string)

    def requeue_visit(self, visit: Visit) -> None:
        """Queue again every CCD of an announced visit that has no result (a standby DMCS taking over)."""
        string = self._next_string
        self._next_string = (self._next_string + 1) % len(self.strings)
        self.visit_string[visit.visit] = string  # whose collective gives its focal-plane values
        label = batch_label(OCSEvent.NEXT_VISIT.value, visit.visit, 0)
        ended = self._ended_in_database(visit.visit, label)  # its rerun only rebuilds the manifest's record
        for index, det_name in enumerate(self.plan.detectors):
            rec = self.manifest.ccd(visit, det_name)
            if rec.status != "processed":
                rec.reason = "requeued by the standby DMCS after a DMCS crash"
                self.queue.append(_Ccd(self._id(), visit, det_name, self.plan.camera[det_name].id, string, rec,
                                       label=label, index=index, reported=index in ended,
                                       pipeline=self.pipeline))  # fmt: skip

    def presume_busy_until_heard(self) -> None:
        """A standby does not know which worker runs what: a worker is busy until it reports a result."""
        for worker in self._all_workers():
            if worker != self.post.rank:
                self.busy[worker] = _Ccd(0, self.plan.visits[0], "", 0, 0, CcdRecord("(before the crash)"))
                self.last_seen[worker] = time.monotonic()

    def _arm_kill(self, visit: Visit, string: int) -> None:
        victims = [w for w in self.strings[string] if w not in self.dead and w != self.post.rank]
        if not victims:
            log.warning("kill-worker@%d: no worker of its own to kill", visit.number)
            return
        self._send(FaultOrder("kill-worker", True, visit.visit), victims[0])

    # ---- messages -----------------------------------------------------------------------------------------
    def handle(self, env: Envelope) -> bool:
        p, src = env.payload, env.source
        self.last_seen[src] = time.monotonic()
        if src in self.dead:
            self._revive(src)
        if isinstance(p, JobResult):
            self.warm.add(src)
        if isinstance(p, JobResult):
            self._result(p, src)
        elif isinstance(p, Heartbeat) and (
            p.role is Role.WORKER
            or (p.role is Role.REPLICATOR and src != self.post.rank and src not in self._local_partners)
        ):
            pass  # liveness only (last_seen, above)
        elif isinstance(p, ImageTransfer):
            if self.recorder is not None:
                self.recorder.image_transferred(p)
        elif isinstance(p, Archived) and not p.to_base:
            self._archived(p)
        elif isinstance(p, RaftPublished):
            self._published(p)
        elif isinstance(p, LocateRaft):
            self._locate(p, src)
        elif isinstance(p, LinkStatus):
            self._link(p)
        elif isinstance(p, TelemetryReport):
            if p.detector == SUMS_REPORT:  # a part of a visit's focal-plane values: recorded once all are in
                self._record_focal_plane(p.visit, self.focal_plane.add(p.visit, p.values) or ())
            else:
                self.ccd_telemetry(p.visit, p.detector, p.values)
                if self.publish is not None:
                    for name, value in p.values:
                        self.publish(f"{p.detector}.{name}", value)
        else:
            return False
        return True

    def _result(self, r: JobResult, src: int) -> None:
        if self._raft_result(r):
            return
        job = self.busy.get(src)
        if job is not None and job.job_id == 0:  # a job from before a DMCS crash: the worker is free again
            del self.busy[src]
            return
        if job is None or job.job_id != r.job_id:
            return  # a result of a job already given up on (rescheduled elsewhere): dropped, not counted twice
        del self.busy[src]
        rec = job.record
        rec.rank, rec.attempt, rec.seconds = src, job.attempt, r.elapsed_s
        if r.ok:
            rec.set("processed", rec.reason if job.attempt > 1 else "", diasources=r.count("diasources"),
                    alerts=r.count("alerts"))  # fmt: skip
            rec.run = self.manifest.run
            last = r.count("last_alert_ms")
            rec.last_alert_time = last / 1000.0 if last else None
            rec.catchup = job.from_raw_cache
        elif r.retriable and r.error_type == "JobLate":
            rec.set("late", r.message or "late")
            if self.settings.reprocess:
                self.reprocess.append(job)
        elif r.retriable:
            rec.set("failed", f"{r.error_type}: {r.message}")
            if self.settings.reprocess:
                self.reprocess.append(job)
        else:
            rec.set("failed", f"{r.error_type}: {r.message}")
        if r.ok or not (r.retriable and self.settings.reprocess):  # final: not run again tonight
            self._ccd_ended(job)

    # ---- dispatch, liveness -------------------------------------------------------------------------------
    def dispatch(self) -> None:
        if not self.queue:
            return
        free_any = [w for w in self._all_workers() if w not in self.busy and w not in self.dead]
        if not free_any and any(w not in self.dead for w in self._all_workers()):
            return  # every live worker is busy: nothing to hand out on this turn
        if all(w in self.dead for w in self._all_workers()):
            for job in self.queue:  # nothing can run them: recorded, and the night can end
                job.record.set("failed", job.record.reason or "no live worker left to run it")
                self._ccd_ended(job)
            self.queue.clear()
            return
        self.queue.sort(key=lambda j: (j.priority, j.queued_at, j.job_id))
        # CCD affinity: a worker's per-process caches (its CCDs' master checksums, their templates' headers)
        # serve again when the CCD comes back to it. Among the jobs of one visit (their order does not change
        # its latency) a free worker takes the CCD it ran last; a job whose worker is busy takes a free worker
        # no other waiting job of the visit ran last, else waits for the next one to free up.
        claims: dict[tuple[int, int, int], int] = {}
        for job in self.queue:
            last = self.last_ran.get((job.string, job.detector))
            if last is not None:
                key = (job.priority, job.visit.visit, last)
                claims[key] = claims.get(key, 0) + 1
        for job in list(self.queue):
            free = [w for w in self._all_workers() if w not in self.busy and w not in self.dead]
            string = [w for w in self.strings[job.string] if w in free]
            spares = [w for w in self.spares if w in free]
            # a first try runs on its string (a spare if the string is short); a rescheduled job on a spare
            # at a lower priority, else on any free worker
            string_dead = all(w in self.dead for w in self.strings[job.string])
            pool = (spares or string or free) if job.priority > 0 or string_dead else (string or spares)
            if not pool:
                continue
            last = self.last_ran.get((job.string, job.detector))
            if last in pool:
                worker = last
            else:
                unclaimed = [w for w in pool if not claims.get((job.priority, job.visit.visit, w))]
                if not unclaimed:
                    continue  # each free worker's own CCD of this visit is still waiting: it goes there
                worker = unclaimed[0]
            deadline = time.time() + self.settings.ccd_timeout_s
            assignment = JobAssignment(job.job_id, JobKind.CCD, job.visit.visit, detector=job.det_id,
                                       deadline=deadline, priority=job.priority, attempt=job.attempt,
                                       image_ids=tuple(s.image_id for s in job.visit.snaps),
                                       from_raw_cache=job.from_raw_cache, mode=job.mode,
                                       difference_imaging=job.pipeline.difference_imaging,
                                       detection_threshold_sigma=job.pipeline.detection_threshold_sigma,
                                       alerts=job.pipeline.alerts)  # fmt: skip
            if self._send(assignment, worker):
                if last is not None:
                    claims[(job.priority, job.visit.visit, last)] -= 1
                self.last_ran[(job.string, job.detector)] = worker
                job.rank, job.started = worker, time.time()
                job.record.status = "running"
                self.busy[worker] = job
                self.last_seen[worker] = time.monotonic()
                self.queue.remove(job)
                self._ccd_started(job, worker)

    def _all_workers(self) -> list[int]:
        return [w for s in self.strings for w in s] + list(self.spares)

    def check_liveness(self) -> None:
        detector = self.post.detector  # ULFM (Open MPI 5 --with-ft ulfm): failures known within milliseconds
        detector.poll()
        for rank in sorted(detector.failed - self.dead):
            self._declare_dead(rank, "ULFM: MPI reports the process failed")
        now = time.monotonic()
        for worker, job in list(self.busy.items()):
            if job.job_id == 0:  # presumed busy by a standby: idle workers send no heartbeat, so it frees them
                if now - self.last_seen.get(worker, now) > 2.0:
                    del self.busy[worker]
                continue
            # a worker's first job compiles numba kernels with the GIL held: its heartbeats may pause
            limit = self.settings.heartbeat_timeout_s + (0.0 if worker in self.warm else self.settings.warmup_grace_s)
            if now - self.last_seen.get(worker, now) > limit:
                self._declare_dead(worker, f"no heartbeat for {limit:g} s")
            elif time.time() - job.started > self.settings.ccd_timeout_s * 1.5:
                # alive but not giving up on its own: take the job back; its late result will be dropped
                del self.busy[worker]
                job.record.set("late", f"no result {self.settings.ccd_timeout_s * 1.5:g} s after it started; "
                                       "queued for later reprocessing")  # fmt: skip
                if self.settings.reprocess:
                    self.reprocess.append(job)
                else:
                    self._ccd_ended(job)
        self._check_pairs(now)

    def _revive(self, rank: int) -> None:
        """A rank presumed dead spoke: it was only silent (e.g. compiling with the GIL held). Its job ran
        elsewhere already; its late result is dropped (CCD results are idempotent) and it takes jobs again."""
        log.warning("rank %d presumed dead is alive after all; it takes jobs again", rank)
        self.dead.discard(rank)
        self.post.dead.discard(rank)
        for pair in self.pairs + self.catchup_pairs:
            if rank in (pair.replicator, pair.distributor) and not {pair.replicator, pair.distributor} & self.dead:
                pair.dead = False

    def _declare_dead(self, rank: int, why: str) -> None:
        if rank in self.dead:
            return
        log.error("rank %d is dead (%s)", rank, why)
        self.dead.add(rank)
        self.post.dead.add(rank)
        job = self.busy.pop(rank, None)
        if job is not None:
            job.attempt += 1
            job.priority += 1
            job.from_raw_cache = True
            job.queued_at = time.time()
            job.record.reason = f"rank {rank} died ({why}); rescheduled on a spare from the raw image cache"
            job.record.rescheduled_at = time.time()
            self.queue.append(job)
        for visit_id in self.focal_plane.lost(rank):
            self.settle_focal_plane(visit_id, f"rank {rank} died before its part came in")
        self._pair_lost(rank)

    # ---- end of night -------------------------------------------------------------------------------------
    def start_reprocessing(self) -> int:
        jobs, self.reprocess = self.reprocess, []
        for job in jobs:
            job.job_id, job.attempt, job.priority = self._id(), job.attempt + 1, job.priority + 1
            job.from_raw_cache, job.queued_at = True, time.time()
            job.record.status = "queued"
            self.queue.append(job)
        return len(jobs)

    def idle(self) -> bool:
        return not self.queue and not self.busy

    def stop_all(self, reason: str) -> None:
        # rank 0 skips MPI_Finalize when its postman knows a dead rank (runtime.loop): say the same to every rank,
        # whichever DMCS (a standby too) declared it, or those finalizing would wait for rank 0 forever
        gone = self.dead | self.post.dead
        stop = Stop(reason, skip_finalize=bool(gone))
        for rank in range(1, self.layout.size):
            if rank not in gone:
                self._send(stop, rank)
            elif rank not in self.post.detector.failed:
                try:  # presumed dead but maybe only silent: it must not wait for work forever
                    self.post.comm.send(stop, dest=rank, tag=int(tag_of(stop)))
                except Exception:  # noqa: BLE001 — really gone
                    pass
