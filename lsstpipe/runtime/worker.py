"""A worker rank of the Alert Production Cluster: one CCD (or wavefront sensor) job at a time (LDM-230 §2.4).

On its assignment (sent at nextVisit) a job prefetches what does not depend on the pixels — master
calibrations, the template, the reference catalogue, the region's DIAObjects and Solar System predictions
— then, for each snap, asks the Archive DMCS which distributor holds its raft, fetches its CCD, verifies
its checksum, runs :func:`~lsstpipe.pipelines.ap.process_ccd` on the crosstalk-corrected pixels and the
Level 1 stage (association, APDB, alerts), writes its outputs and sends SDQA, WCS and PSF telemetry to the
DMCS. A rescheduled job (``from_raw_cache``) reads the Archive's raw image cache instead.

A job that passes its deadline before its outputs are written is abandoned and reported late (the DMCS
queues it for later reprocessing); any exception is caught and reported, so one bad CCD never takes the
rank down.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lsstpipe.archive.blobs import ImageKey, decode_image
from lsstpipe.archive.storage import RawImageCache
from lsstpipe.camera.geometry import DetectorType
from lsstpipe.repo import Repository, write_json
from lsstpipe.runtime import focal_plane
from lsstpipe.runtime.memory import planes_reused, worker_allocator
from lsstpipe.runtime.messages import (
    CcdData,
    CcdRequest,
    FaultOrder,
    FocalPlaneReduce,
    Heartbeat,
    JobAssignment,
    JobKind,
    JobResult,
    LocateRaft,
    RaftLocation,
    Tag,
    TelemetryReport,
)
from lsstpipe.runtime.postman import Envelope, Postman

log = logging.getLogger(__name__)

__all__ = ["CALIB_SOURCES", "DataUnavailable", "JobLate", "Worker", "WorkerSettings"]

CALIB_SOURCES = ("auto", "db", "truth")
"""Where a worker's master calibrations come from (:func:`lsstpipe.pipelines.inputs.load_ccd_inputs`)."""


class JobLate(RuntimeError):
    """The job passed its deadline before its outputs were written; it is queued for later reprocessing."""


class DataUnavailable(RuntimeError):
    """The job's pixels are not at the Archive (yet): retriable once the Catch-Up Archiver brought them."""


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker waits for its data and where it writes."""

    locate_timeout_s: float = 30.0
    """How long to wait for the Archive DMCS to name a distributor for a raft."""
    fetch_timeout_s: float = 30.0
    heartbeat_s: float = 0.5
    calibs: str = "auto"
    """Master calibrations: ``db`` (certified by the Calibration Products Production), ``truth`` (the
    simulator's instrument truth) or ``auto`` (``db`` when the repository has a calibration database)."""
    level1: bool = True
    """Associate, store in the APDB and send alerts (False: the science chain only)."""
    keep_memory: bool = True
    """Keep the memory a CCD freed for the next CCD (:func:`lsstpipe.runtime.memory.keep_freed_memory`): no
    page is faulted in again from the second CCD on (~0.27 s less per full-size CCD), and the rank holds its
    high-water mark (~1.2 GB for a full-size CCD) between CCDs. False: a CCD's free memory goes back to the
    system after its chain (~0.5 GB at rest), and each CCD pays for its pages again."""

    def __post_init__(self) -> None:
        for name in ("locate_timeout_s", "fetch_timeout_s", "heartbeat_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a number of seconds > 0, not {value!r}")
        if self.calibs not in CALIB_SOURCES:
            raise ValueError(f"calibs must be one of {', '.join(CALIB_SOURCES)} (db: certified masters, truth: "
                             f"the simulator's instrument truth, auto: db when there are some), not {self.calibs!r}")  # fmt: skip
        for name in ("level1", "keep_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, not {getattr(self, name)!r}")


def _chain_config(job: JobAssignment):
    """The chain's settings for ``job``: the defaults, with the DIASource detection threshold of the Alert
    Production Cluster's installed configuration."""
    from lsstpipe.pipelines.ap import ApConfig

    config = ApConfig()
    return dataclasses.replace(config, dia=dataclasses.replace(config.dia, threshold=job.detection_threshold_sigma))


def _metadata(header: dict, detector: str) -> dict:
    """ISR metadata of one snap from its CDS header (as :func:`lsstpipe.pipelines.isr.raw_metadata`)."""
    return {"exptime": float(header["EXPTIME"]), "dark_time": float(header.get("DARKTIME", header["EXPTIME"])),
            "band": str(header.get("FILTER", "NONE")).strip(), "obsid": str(header.get("OBSID", "")),
            "detector": detector, "mjd": float(header.get("MJD-OBS", math.nan))}  # fmt: skip


class Worker:
    """Runs CCD jobs on one rank; ``level1`` holds the open APDB and alert writer of this rank."""

    def __init__(self, postman: Postman, repo: Repository, out: Path, settings: WorkerSettings, dmcs: int = 0,
                 level1: Any = None, string: Any = None) -> None:  # fmt: skip
        from lsstpipe.camera import get_camera

        worker_allocator(settings.keep_memory)  # a CCD's pages are the next CCD's, or given back
        self.post, self.repo, self.out, self.settings, self.dmcs = postman, repo, out, settings, dmcs
        self.camera = get_camera(repo.read_config()["camera"])
        self.level1 = level1
        self.die_in_visit: int | None = None
        self.raw_cache = RawImageCache(out / "archive" / "raw_cache")
        self.string = string
        """The communicator of this worker's string (None: a spare, which takes part in no collective)."""
        self.visit_rows: dict[int, dict[str, np.ndarray]] = {}
        """Per visit, each of its CCDs this worker ran: its row of the focal-plane sums (a rerun's replaces it)."""
        self._reductions: list[tuple[int, np.ndarray, np.ndarray, Any]] = []
        self._active = threading.Event()
        if self.dmcs != self.post.rank:
            threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()
        self._import_the_chain()

    def _import_the_chain(self) -> None:
        """Import the modules a CCD job runs (the chain, its inputs' readers, Level 1) now, at the start of the
        night: ~1.5–3 s of imports that would otherwise be paid inside the first job of the night, on the
        first visit's latency."""
        import lsstpipe.pipelines.ap  # noqa: F401
        import lsstpipe.pipelines.inputs  # noqa: F401

        if self.level1 is not None:
            import lsstpipe.pipelines.level1  # noqa: F401

    # ---- heartbeats while a job runs ------------------------------------------------------------------------
    def _beat(self) -> None:
        """One heartbeat thread per rank for the whole night: beats while a job runs (:attr:`_active`)."""
        from lsstpipe.runtime.layout import Role

        seq = 0
        while True:
            self._active.wait()
            seq += 1
            try:
                self.post.comm.send(Heartbeat(self.post.rank, Role.WORKER, seq, time.time()), dest=self.dmcs,
                                    tag=int(Tag.HEARTBEAT))  # fmt: skip
            except Exception:  # noqa: BLE001 — a DMCS that cannot be reached: the main loop finds out
                return
            time.sleep(self.settings.heartbeat_s)

    # ---- focal-plane values: an MPI collective among the visit's workers (lsstpipe.runtime.focal_plane) --------
    def _add_to_visit(self, visit: int, detector: str, sdqa: dict) -> None:
        row = focal_plane.ccd_row(sdqa)
        if row is not None:
            self.visit_rows.setdefault(visit, {})[detector] = row

    def _take_sums(self, visit: int, detectors=None) -> np.ndarray:
        """This worker's sums of ``visit`` over its CCDs named in ``detectors`` (None: all it ran; zeros when it
        counted none), no longer kept. The DMCS names the CCDs whose results it took from this worker: one it
        ran whose result was dropped (given up on and run elsewhere, or run again after a DMCS takeover) is
        counted by the worker whose result was taken, and only there."""
        rows = self.visit_rows.pop(visit, {})
        wanted = rows.keys() if detectors is None else [d for d in detectors if d in rows]
        return sum((rows[d] for d in wanted), np.zeros(len(focal_plane.SUMS)))

    def _sums_report(self, visit: int, sums: np.ndarray) -> None:
        self.post.send(TelemetryReport(visit, focal_plane.SUMS_REPORT, tuple(zip(focal_plane.SUMS, sums.tolist()))),
                       self.dmcs)  # fmt: skip

    def _reduce(self, visit: int, detectors=None) -> None:
        """Start the string's non-blocking sum of the visit's values (every member gets the same order)."""
        local = self._take_sums(visit, detectors)
        total = np.zeros_like(local)
        request = self.string.Iallreduce(local, total)
        self._reductions.append((visit, local, total, request))

    def tick(self) -> None:
        """Finish the collectives that completed; the string's first worker reports the visit's total."""
        for item in list(self._reductions):
            visit, _, total, request = item
            if request.Test():
                self._reductions.remove(item)
                if self.string.Get_rank() == 0:
                    self._sums_report(visit, total)

    def handle(self, env: Envelope) -> bool:
        p = env.payload
        if isinstance(p, FocalPlaneReduce):
            if p.direct or self.string is None:  # CCDs of a visit not of this worker's string: in no collective
                self._sums_report(p.visit, self._take_sums(p.visit, p.detectors))
            else:
                self._reduce(p.visit, p.detectors)
            return True
        if isinstance(p, RaftLocation | CcdData):
            return True  # a late answer to a question asked again (or of a job given up): nothing to do
        if isinstance(p, FaultOrder) and p.kind == "kill-worker":
            self.die_in_visit = p.visit if p.on else None
            return True
        if isinstance(p, JobAssignment) and p.kind is JobKind.CCD:
            self._active.set()
            try:
                result = self.run(p)
            finally:
                self._active.clear()
            self.post.send(result, self.dmcs)
            return True
        return False

    # ---- one job ------------------------------------------------------------------------------------------
    def run(self, job: JobAssignment) -> JobResult:
        t0 = time.time()
        det = self.camera[job.detector]
        try:
            counts = self._run(job, det, t0)
            return JobResult(job.job_id, self.post.rank, True, time.time() - t0, counts=counts)
        except (JobLate, DataUnavailable) as exc:
            return JobResult.failure(job.job_id, self.post.rank, exc, time.time() - t0, retriable=True)
        except Exception as exc:  # noqa: BLE001 — an application failure: recorded, the rank goes on
            log.warning("CCD job %d (%s visit %d) failed: %s", job.job_id, det.name, job.visit, exc)
            return JobResult.failure(job.job_id, self.post.rank, exc, time.time() - t0)

    def _check_deadline(self, job: JobAssignment, what: str) -> None:
        if time.time() > job.deadline:
            raise JobLate(f"deadline passed {time.time() - job.deadline:.1f} s ago {what}; queued for later "
                          "reprocessing")  # fmt: skip

    def _run_isr_only(self, job: JobAssignment, det, t0: float) -> tuple[tuple[str, int], ...]:
        """Calibration and engineering modes: ISR only (overscan, assembly, gain; no masters), and the
        statistics the summit checks calibration frames with."""
        from lsstpipe.pipelines.isr import IsrCalibs, run_isr

        header, pixels = self._fetch(job, job.image_ids[0], det.name)
        meta = _metadata(header, det.name)
        exposure = run_isr(pixels, det, IsrCalibs(), meta)
        good = exposure.image[np.isfinite(exposure.image)]
        median = float(np.median(good)) if good.size else math.nan
        sigma = float(1.4826 * np.median(np.abs(good - median))) if good.size else math.nan
        sdqa = {"median_e": median, "robust_sigma_e": sigma, "good_pixels": int(good.size),
                "exptime": meta["exptime"]}  # fmt: skip
        record = {"seq_num": job.visit, "detector": det.name, "mode": job.mode, "imgtype": header.get("IMGTYPE"),
                  "rank": self.post.rank, "sdqa": sdqa, "timings": {"total": time.time() - t0}}  # fmt: skip
        write_json(self.out / "ccds" / str(job.visit) / f"{det.name}.json", record)
        self.post.send(TelemetryReport(job.visit, det.name, tuple((k, float(v)) for k, v in sdqa.items())),
                       self.dmcs)  # fmt: skip
        return (("diasources", 0), ("alerts", 0))

    def _run(self, job: JobAssignment, det, t0: float) -> tuple[tuple[str, int], ...]:
        from lsstpipe.pipelines.ap import process_ccd

        if job.mode in ("calibration", "engineering") or not job.difference_imaging:
            return self._run_isr_only(job, det, t0)  # the configuration's pipeline.difference_imaging: false
        from lsstpipe.pipelines.inputs import load_ccd_inputs

        inputs = load_ccd_inputs(self.repo, job.visit, det.name, self.settings.calibs, with_raws=False)
        t_inputs = time.time()
        prefetch = None
        if self.level1 is not None and det.type is DetectorType.SCIENCE:
            from lsstpipe.pipelines.level1 import prefetch_region

            prefetch = prefetch_region(self.level1.apdb, inputs, self._visit_midpoint(job),
                                       self.level1.ss_coefficients)  # fmt: skip
            inputs = dataclasses.replace(inputs, dia_objects=prefetch.dia_objects_for_forced())
        t_prefetch = time.time()
        raws, metas = [], []
        for image_id in job.image_ids:
            header, pixels = self._fetch(job, image_id, det.name)
            raws.append(pixels)
            metas.append(_metadata(header, det.name))
        t_fetch = time.time()
        if self.die_in_visit is not None and self.die_in_visit == job.visit:
            log.error("fault injection: worker rank %d dies in the middle of %s visit %d at t=%.3f", self.post.rank,
                      det.name, job.visit, time.time())  # fmt: skip
            os._exit(137)
        # the CDS's crosstalk-corrected images: ISR must not correct crosstalk again
        inputs = dataclasses.replace(inputs, raw_snaps=tuple(raws), snap_metadata=tuple(metas),
                                     calibs=dataclasses.replace(inputs.calibs, crosstalk=None))  # fmt: skip
        del raws
        if det.type is not DetectorType.SCIENCE:
            inputs = dataclasses.replace(inputs, template_patches=())
        with planes_reused():  # the chain's planes recycled from stage to stage (given back at its end unless kept)
            result = process_ccd(inputs, _chain_config(job), release_inputs=True)  # inputs freed as used
        self._check_deadline(job, "after processing")
        l1 = None
        if prefetch is not None and self.level1 is not None:
            from lsstpipe.pipelines.level1 import ccd_level1, visit_midpoint_mjd_tai

            l1 = ccd_level1(inputs, result, prefetch, visit=job.visit, detector_id=det.id,
                            midpoint_mjd_tai=visit_midpoint_mjd_tai(inputs), apdb=self.level1.apdb,
                            alerts=self.level1.alerts if job.alerts else None)  # fmt: skip
        self._write_outputs(job, det, result, l1, {"prefetch": t_prefetch - t0, "fetch": t_fetch - t_prefetch,
                                                   "process": time.time() - t_fetch,
                                                   # the prefetch's two parts: calibrations, templates, refcat;
                                                   # the APDB's region and the Solar System predictions
                                                   "prefetch_inputs": t_inputs - t0,
                                                   "prefetch_apdb": t_prefetch - t_inputs})  # fmt: skip
        self._telemetry(job, det.name, result)
        if det.type is DetectorType.SCIENCE and not job.from_raw_cache:
            self._add_to_visit(job.visit, det.name, result.sdqa)
        counts = {"diasources": len(result.dia_sources), "alerts": l1.alerts if l1 else 0,
                  "forced": len(result.forced), "new_objects": l1.new_objects if l1 else 0,
                  "ss_matched": l1.ss_matched if l1 else 0,
                  "last_alert_ms": int(round(1000 * l1.last_alert_time)) if l1 and l1.alerts else 0,
                  "flags": len(result.flags)}  # fmt: skip
        return tuple(counts.items())

    def _visit_midpoint(self, job: JobAssignment) -> float:
        """The scheduled exposure midpoint of the visit (MJD), before any pixel arrives."""
        from lsstpipe.pipelines.inputs import visit_exposures

        rows = visit_exposures(self.repo, job.visit)
        return 0.5 * (float(rows[0]["mjd_obs"]) + float(rows[-1]["mjd_obs"]) + float(rows[-1]["exptime"]) / 86400.0)

    def _fetch(self, job: JobAssignment, image_id: str, detector: str) -> tuple[dict, np.ndarray]:
        raft = detector.split("_")[0]
        if job.from_raw_cache:
            return self._from_cache(image_id, raft, detector)
        env, end = None, time.monotonic() + self.settings.locate_timeout_s
        while env is None and time.monotonic() < end:  # asked again every 2 s: a DMCS that crashed forgot it
            self.post.send(LocateRaft(image_id, raft), self.dmcs)
            env = self.post.wait_for(lambda e: isinstance(e.payload, RaftLocation) and e.payload.image_id == image_id
                                     and e.payload.raft == raft, min(2.0, end - time.monotonic()))  # fmt: skip
        if env is None or env.payload.distributor is None:
            why = env.payload.reason if env is not None else f"no answer within {self.settings.locate_timeout_s:g} s"
            try:  # the Catch-Up Archiver may already have brought it
                return self._from_cache(image_id, raft, detector)
            except DataUnavailable:
                raise DataUnavailable(f"{image_id} raft {raft} is not at any distributor ({why})") from None
        self.post.send(CcdRequest(image_id, detector), env.payload.distributor)
        got = self.post.wait_for(lambda e: isinstance(e.payload, CcdData) and e.payload.image_id == image_id
                                 and e.payload.detector == detector, self.settings.fetch_timeout_s)  # fmt: skip
        if got is None or got.payload.error:
            why = got.payload.error if got is not None else "no answer"
            try:
                return self._from_cache(image_id, raft, detector)
            except DataUnavailable:
                raise DataUnavailable(f"{image_id} {detector}: distributor {env.payload.distributor}: {why}") from None
        h: CcdData = got.payload
        if hashlib.sha256(got.data).hexdigest() != h.checksum:
            raise DataUnavailable(f"{image_id} {detector} arrived damaged (checksum mismatch); fetch it again")
        return dict(h.header), got.data.view(np.int32).reshape(h.shape)

    def _from_cache(self, image_id: str, raft: str, detector: str) -> tuple[dict, np.ndarray]:
        key = ImageKey(image_id, raft, "crosstalk_corrected")
        if not self.raw_cache.has(key):
            raise DataUnavailable(f"{key} is not in the Archive's raw image cache yet")
        image = decode_image(self.raw_cache.get(key), key)
        return image.headers[detector], image.ccds[detector]

    def _write_outputs(self, job: JobAssignment, det, result, l1, timings: dict) -> None:
        folder = self.out / "ccds" / str(job.visit)
        folder.mkdir(parents=True, exist_ok=True)
        record = {"visit": job.visit, "detector": det.name, "attempt": job.attempt, "rank": self.post.rank,
                  "flags": list(result.flags), "sdqa": result.sdqa, "timings": {**result.timings, **timings},
                  "diasources": int(len(result.dia_sources)), "alerts": l1.alerts if l1 else 0,
                  "first_alert_time": l1.first_alert_time if l1 and l1.alerts else None,
                  "last_alert_time": l1.last_alert_time if l1 and l1.alerts else None}  # fmt: skip
        if len(result.dia_sources):
            np.save(folder / f"{det.name}_diasources.npy", result.dia_sources)
        write_json(folder / f"{det.name}.json", record)

    def _telemetry(self, job: JobAssignment, detector: str, result) -> None:
        values = [(k, float(v)) for k, v in result.sdqa.items() if isinstance(v, int | float) and math.isfinite(v)]
        char = result.characterization
        wcs = getattr(char, "wcs", None) if char is not None else None
        if wcs is not None:
            values += [("wcs_crval1", float(wcs.wcs.crval[0])), ("wcs_crval2", float(wcs.wcs.crval[1]))]
        self.post.send(TelemetryReport(job.visit, detector, tuple(values)), self.dmcs)
