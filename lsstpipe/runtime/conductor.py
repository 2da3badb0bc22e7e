"""Rank 0's night: the OCS script, the camera, the DMCS's scheduling loop, the end of night and the manifest.

Phases: the OCS brings the Archiver, the Catch-Up Archiver and the Alert Production Cluster up (init,
configure science, enable); the timeline plays each visit's events (the entities turn them into jobs);
after the last visit the Catch-Up Archiver moves every image not archived yet, late and data-unavailable
CCD jobs are reprocessed from the raw image cache, the Archive's copies are read back and verified, the
OCS disables and releases the entities, and the manifest is written.
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from lsstpipe.control.states import Command, EntityName, OCSEvent
from lsstpipe.runtime.dmcs_night import NightCluster, NightDMCS
from lsstpipe.runtime.manifest import TERMINAL, Manifest
from lsstpipe.runtime.night import ENTITY_CONFIGS, NightConfig, control_plane, progress, script
from lsstpipe.runtime.plan import EventKind, PlannedEvent

log = logging.getLogger("lsstpipe.night")

_EVENTS = {EventKind.NEXT_VISIT: OCSEvent.NEXT_VISIT, EventKind.START_INTEGRATION: OCSEvent.START_INTEGRATION,
           EventKind.START_EXPOSURE: OCSEvent.START_EXPOSURE,
           EventKind.START_READOUT: OCSEvent.START_READOUT}  # fmt: skip
_KINDS = {v: k for k, v in _EVENTS.items()}


def _pump(post, handlers, dmcs, budget: int = 500) -> int:
    n = 0
    while n < budget:
        env = post.poll()
        if env is None:
            break
        n += 1
        if not dmcs.handle(env) and not any(h.handle(env) for h in handlers):
            log.warning("rank 0: nothing takes %r", env)
    for h in handlers:
        if hasattr(h, "tick"):
            h.tick()
    return n


class _Control:
    """The DMCS of the night as one replaceable unit: the Base DMCS of the control plane, its OCS link, the
    scheduler and the manifest. :meth:`boot` is what a standby does when it takes over."""

    def __init__(self, post, args, config: NightConfig, repo, plan, layout, faults) -> None:
        self.post, self.args, self.config, self.repo, self.plan, self.layout = post, args, config, repo, plan, layout
        self.faults = faults
        self.out = Path(args.out)
        self.entities = [EntityName(e) for e in ENTITY_CONFIGS]
        self.base = self.ocs = self.dmcs = None
        self.catchup_scan_s = 1.0
        """Real seconds between two scans of the Catch-Up Archiver (its configuration's interval, scaled)."""
        self.run = uuid.uuid4().hex[:16]
        """This run of the night (a standby taking over goes on with it): the manifest's ``night.run``."""

    def boot(self, announced: int = 0, mode: str = "science") -> None:
        """Start (or take over, from the control database, the manifest on disk and the Archive)."""
        plan, layout = self.plan, self.layout
        manifest = Manifest(self.out, {"repo": str(self.repo.root), "camera": plan.camera.name, "ranks": layout.size,
                                       "layout": layout.describe(), "faults": [str(f) for f in self.faults],
                                       "time_scale": plan.time_scale, "cadence": plan.cadence, "run": self.run})  # fmt: skip
        for visit in plan.calibrations + plan.visits:
            for det in plan.detectors:
                manifest.ccd(visit, det)
            for snap in visit.snaps:
                for raft in plan.rafts:
                    for kind in ("crosstalk_corrected", "raw"):
                        manifest.image(visit, snap.image_id, raft, kind)
        self.cluster = NightCluster(layout, plan)  # the job counts of this night's rafts and detectors
        self.base, self.ocs, recorder = control_plane(self.out, layout, self.cluster, self.config.pipeline,
                                                       self.config.archive)  # fmt: skip
        base = self.base
        publish = lambda name, value: base.telemetry(EntityName.ALERT_PRODUCTION_CLUSTER, name, value)  # noqa: E731
        self.dmcs = NightDMCS(self.post, layout, plan, manifest, self.config.scheduler,
                              self.faults, recorder, publish)  # fmt: skip
        manifest.count_lost_records(base.lost_records)  # the control database's and the Summit EFD's
        self.manifest = manifest
        self.dmcs.mode = mode
        script(self.ocs, [(e, c, self._mode_of(e, mode) if c is Command.CONFIGURE else None)
                          for c in (Command.INIT, Command.CONFIGURE, Command.ENABLE) for e in self.entities])  # fmt: skip
        self._follow_configuration()
        if announced:
            self._recover(announced)

    def _follow_configuration(self) -> None:
        """From now on: the CCD jobs run the Alert Production Cluster's installed pipeline parameters; the
        Catch-Up Archiver scans every ``scan_interval_seconds`` of the night's clock with at most
        ``max_concurrent_jobs`` jobs in flight."""
        settings = self.base.entities[EntityName.ALERT_PRODUCTION_CLUSTER].settings
        if settings is not None:
            self.dmcs.pipeline = settings.pipeline
        catchup = self.base.entities[EntityName.CATCHUP_ARCHIVER].settings
        if catchup is not None:
            self.dmcs.catchup_limit = catchup.max_concurrent_jobs
            self.catchup_scan_s = catchup.scan_interval_seconds * self.plan.time_scale

    @staticmethod
    def _mode_of(entity: EntityName, mode: str) -> str:
        return "science" if entity in (EntityName.CATCHUP_ARCHIVER, EntityName.EFD_REPLICATOR) else mode

    def switch(self, mode: str) -> None:
        """The OCS reconfigures the Archiver and the Alert Production Cluster (disable, configure, enable)."""
        moving = [EntityName.ARCHIVER, EntityName.ALERT_PRODUCTION_CLUSTER]
        script(self.ocs, [(e, c, mode if c is Command.CONFIGURE else None)
                          for c in (Command.DISABLE, Command.CONFIGURE, Command.ENABLE) for e in moving])  # fmt: skip
        self.dmcs.mode = mode
        self._follow_configuration()

    def _recover(self, announced: int) -> None:
        """A standby's view of the visits announced before the crash: what the Archive holds, which CCDs
        still need a result (queued again; a CCD result is idempotent), which images the camera wrote."""
        manifest, dmcs = self.manifest, self.dmcs
        for problem in manifest.verify_archive():
            log.info("standby DMCS: not archived yet: %s", problem)
        now = time.time()
        for visit in self.plan.visits[:announced]:
            dmcs.requeue_visit(visit)
            for snap in visit.snaps:
                if (self.out / "cds" / snap.day_obs / snap.image_id).is_dir():
                    for im in manifest.images():
                        if im.image_id == snap.image_id:
                            im.readout_end = im.readout_end or now
                            im.replicator_done = im.replicator_done or now  # the Catch-Up Archiver checks it
        dmcs.presume_busy_until_heard()

    def record_exposure(self, visit, exposure: int) -> None:
        """The camera writes the exposure's metadata into the Summit EFD (replicators read it from a replica)."""
        snap = visit.snaps[exposure]
        payload = {"visit": visit.visit, "exposure": exposure, "exptime": snap.exptime, "mjd": snap.mjd,
                   "band": visit.band, "ra": visit.ra, "dec": visit.dec, "rotpa": visit.rotpa}  # fmt: skip
        try:
            self.base.efd.summit.record_event("camera_exposure", snap.image_id, payload)
        except Exception as exc:  # noqa: BLE001 — the EFD down must not stop the night; replicators say so
            log.warning("EFD: exposure %s not recorded: %s", snap.image_id, exc)

    def crash(self) -> None:
        """The DMCS process dies: its memory is gone; the control database and the files stay."""
        efd = self.base.efd if self.base is not None else None
        for closer in (self.base.close, self.ocs.close, efd.close if efd is not None else (lambda: None)):
            try:
                closer()
            except Exception:  # noqa: BLE001 — a crash closes nothing cleanly
                pass
        self.base = self.ocs = self.dmcs = None


def conduct(post, args, config: NightConfig, repo, plan, layout, faults, handlers) -> int:
    """Rank 0's night (``config`` validated by :func:`lsstpipe.runtime.night.validate_config`): its exit status."""
    t0 = time.monotonic()
    control = _Control(post, args, config, repo, plan, layout, faults)
    before = config.calibration_mode
    control.boot(mode=before if plan.calibrations else "science")
    progress(args.quiet, f"{plan.camera.name}: {len(plan.visits)} visits × {len(plan.detectors)} detectors on "
                         f"{layout.size} ranks ({', '.join(f'{r.name.lower()} {n}' for r, n in layout.counts().items())})",
             t0)  # fmt: skip
    crash_at = {f.first for f in faults if f.kind == "restart-dmcs"}
    by_id = {v.visit: v for v in plan.calibrations + plan.visits}
    timeline = plan.timeline()
    i, start = 0, time.monotonic()
    reported: set[int] = set()
    last_catchup = time.monotonic()
    phase = "night"
    final_deadline = None
    try:
        while True:
            dmcs, manifest, cluster, ocs = control.dmcs, control.manifest, control.cluster, control.ocs
            now = time.monotonic() - start
            busy = False
            while phase == "night" and i < len(timeline) and timeline[i].t <= now:
                ev = timeline[i]
                i += 1
                busy = True
                if ev.kind is EventKind.END_READOUT:
                    dmcs.end_readout(ev.visit, ev.exposure)
                    continue
                if ev.kind is EventKind.SCIENCE_MODE:
                    control.switch("science")
                    progress(args.quiet, f"{before} exposures taken: the Archiver and the Alert Production "
                                         "Cluster are configured for science", t0)  # fmt: skip
                    continue
                if ev.kind is EventKind.NEXT_VISIT and ev.visit.number in crash_at:
                    crash_at.discard(ev.visit.number)
                    progress(args.quiet, f"fault injection: the DMCS crashes before visit {ev.visit.number}; a "
                                         "standby takes over", t0)  # fmt: skip
                    control.crash()
                    control.boot(announced=ev.visit.number - 1)
                    dmcs, manifest, cluster, ocs = control.dmcs, control.manifest, control.cluster, control.ocs
                    dmcs.settle_after_takeover(sorted(reported))
                if ev.kind is EventKind.START_INTEGRATION:
                    control.record_exposure(ev.visit, ev.exposure)
                if ev.kind is EventKind.START_READOUT:
                    dmcs.start_readout(ev.visit, ev.exposure)
                ocs.publish_event(_EVENTS[ev.kind], ev.visit.visit, ev.exposure)
            while not cluster.events.empty():
                entity, msg = cluster.events.get()
                visit = by_id.get(msg.visit)
                if visit is not None:
                    kind = _KINDS.get(msg.event)
                    if kind is not None:
                        dmcs.on_event(entity, PlannedEvent(0.0, 0, kind, visit, msg.exposure))
                busy = True
            busy |= _pump(post, handlers, dmcs) > 0
            dmcs.dispatch()
            dmcs.check_liveness()
            if time.monotonic() - last_catchup > control.catchup_scan_s:
                last_catchup = time.monotonic()
                dmcs.catchup_jobs(final=phase == "catchup")  # after the last visit: the full scan, again
            for visit in plan.calibrations + plan.visits:
                recs = manifest.ccds_of(visit.visit)
                if visit.visit not in reported and recs and all(r.status in TERMINAL for r in recs):
                    reported.add(visit.visit)
                    dmcs.reduce_visit(visit)
                    s = {st: sum(r.status == st for r in recs) for st in TERMINAL}
                    what = (f"visit {visit.number}/{len(plan.visits)} ({visit.visit})" if visit.number > 0 else
                            f"calibration {-visit.number}/{len(plan.calibrations)} ({visit.band} "
                            f"{visit.snaps[0].image_id}, ISR only)")  # fmt: skip
                    progress(args.quiet, f"{what}: {s['processed']} processed, {s['failed']} failed, {s['late']} late, "
                                         f"{s['skipped']} skipped; {sum(r.alerts for r in recs)} alerts", t0)  # fmt: skip
                    manifest.write()
            if phase == "night" and i == len(timeline) and dmcs.idle() and not _raft_jobs_open(dmcs):
                phase = "catchup"
                n = dmcs.catchup_jobs(final=True)
                progress(args.quiet, f"end of the last visit: {n} image(s) to the Catch-Up Archiver", t0)
                final_deadline = time.monotonic() + config.scheduler.catchup_timeout_s
            elif phase == "catchup" and (all(im.archived for im in manifest.images())
                                         or time.monotonic() > final_deadline) and not _raft_jobs_open(dmcs):  # fmt: skip
                phase = "reprocess"
                n = dmcs.start_reprocessing()
                progress(args.quiet, f"reprocessing {n} late or data-less CCD job(s) from the raw image cache", t0)
            elif phase == "reprocess" and dmcs.idle():
                phase, final_deadline = "wrap-up", time.monotonic() + 5.0
            elif phase == "wrap-up" and (not dmcs.reductions_pending or time.monotonic() > final_deadline):
                break  # the last visits' focal-plane values are in (the rest: from telemetry, below)
            if not busy:
                time.sleep(0.001)
        for visit_id in sorted(dmcs.reductions_pending):  # an answer lost without its rank declared dead
            dmcs.settle_focal_plane(visit_id, "no answer by the end of the night")
        for rec_visit in plan.calibrations + plan.visits:
            for rec in manifest.ccds_of(rec_visit.visit):
                if rec.status not in TERMINAL:
                    rec.set("failed", rec.reason or "not processed by the end of the night")
        dmcs.finish_open_jobs()  # the control database's jobs table: an end for every job of the night
        problems = manifest.verify_archive()
        for p in problems:
            log.error("archive check: %s", p)
        if config.daytime:
            _daytime(control, plan, args, t0)
        script(ocs, [(e, c, None) for c in (Command.DISABLE, Command.RELEASE) for e in control.entities])
        manifest.complete = True
        manifest.write()
        s = manifest.summary()
        progress(args.quiet, f"night done: {s.get('processed', 0)} CCDs processed, {s.get('failed', 0)} failed, "
                             f"{s.get('late', 0)} late, {s.get('skipped', 0)} skipped; {s['alerts']} alerts; "
                             f"{s['archived']}/{s['images']} images archived and verified; "
                             f"{s['lost_records']} control database/EFD record(s) lost → {manifest.path}", t0)  # fmt: skip
        return 0 if s["archived"] == s["images"] else 1
    finally:
        if control.dmcs is not None:
            control.dmcs.stop_all("end of night")
            control.crash()


def _daytime(control: _Control, plan, args, t0: float) -> None:
    """The OCS puts the Alert Production Cluster in daytime mode; the day's jobs run (snapshot, MOPS)."""
    from lsstpipe.runtime.daytime import run_day

    apc = EntityName.ALERT_PRODUCTION_CLUSTER
    script(control.ocs, [(apc, Command.DISABLE, None), (apc, Command.CONFIGURE, "daytime"),
                         (apc, Command.ENABLE, None)])  # fmt: skip
    day_obs = int(plan.visits[0].snaps[0].day_obs)
    last = max(s.mjd for v in plan.visits for s in v.snaps)
    try:
        settings = control.base.entities[apc].settings
        fitting = settings is None or settings.pipeline.orbit_fitting  # the daytime configuration's
        summary = run_day(control.out, day_obs, (last + 0.5, last + 1.0), orbit_fitting=fitting)
    except Exception as exc:  # noqa: BLE001 — the day's jobs failing must not lose the night's manifest
        log.exception("daytime DM operations failed")
        summary = {"error": f"{type(exc).__name__}: {exc}"}
    control.manifest.night["daytime"] = summary
    mops = ("no orbit fitting (the daytime configuration's pipeline.orbit_fitting: false)"
            if summary.get("orbit_fitting") is False else
            f"MOPS: {summary.get('tracklets', 0)} tracklets, {summary.get('tracks', 0)} tracks, "
            f"{summary.get('ssobjects', 0)} SSObjects")  # fmt: skip
    progress(args.quiet, f"daytime: APDB snapshot, {mops}" + (f" — {summary['error']}" if "error" in summary else ""),
             t0)  # fmt: skip


def _raft_jobs_open(dmcs: NightDMCS) -> bool:
    return any(done is None and not pair.dead for pair, _, _, _, done in dmcs.raft_jobs.values())
