"""The night to play: the visits of a repository, their images, and the OCS timeline of their events.

The simulated night replays a repository's science visits in time order. Each visit is announced by the
OCS's ``nextVisit``; each of its snaps by ``startIntegration``, then ``startReadout`` after the exposure
time; the camera writes the snap's raft images into the CDS buffer at the end of the readout. Times are
compressed by ``time_scale`` (0.1 plays a 15 s snap in 1.5 s) and visits follow each other every
``cadence`` seconds of the compressed clock (default: the visit's own length, snaps and readouts).
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field
from pathlib import Path

from lsstpipe.camera.geometry import Camera, DetectorType, get_camera
from lsstpipe.repo import Repository

__all__ = ["EventKind", "NightPlan", "PlannedEvent", "Snap", "Visit", "check_masters", "plan_night"]

READOUT_S = 2.0
"""LSSTCam's readout time (seconds of the real clock)."""


class EventKind(enum.Enum):
    """Timeline events: the OCS's, and the camera writing an image into the CDS buffer."""

    NEXT_VISIT = "nextVisit"
    START_INTEGRATION = "startIntegration"
    START_READOUT = "startReadout"
    END_READOUT = "endReadout"
    """The camera has written the exposure's raft images into the CDS buffer."""
    START_EXPOSURE = "startExposure"
    """A calibration exposure starts (the Alert Production Cluster in calibration mode runs ISR on it)."""
    SCIENCE_MODE = "scienceMode"
    """The calibrations are done: the OCS reconfigures the entities for the science visits."""


@dataclass(frozen=True)
class Snap:
    """One exposure of a visit: its OBSID, snap index, start MJD and exposure time."""

    index: int
    image_id: str
    day_obs: str
    mjd: float
    exptime: float


@dataclass(frozen=True)
class Visit:
    """One science visit: id, band, pointing and snaps, and its place (from 1) in the night."""

    number: int
    visit: int
    band: str
    ra: float
    dec: float
    rotpa: float
    snaps: tuple[Snap, ...]


@dataclass(frozen=True, order=True)
class PlannedEvent:
    """One event at ``t`` seconds from the start of the night (compressed clock)."""

    t: float
    order: int
    kind: EventKind = field(compare=False)
    visit: Visit = field(compare=False)
    exposure: int = field(default=0, compare=False)


@dataclass(frozen=True)
class NightPlan:
    """The visits of the night with the rafts to archive and the detectors to process."""

    repo: Path
    camera: Camera
    visits: tuple[Visit, ...]
    rafts: tuple[str, ...]
    """Raft names in the CDS, science rafts first, then the wavefront-sensor rafts."""
    wavefront_rafts: tuple[str, ...]
    detectors: tuple[str, ...]
    """Every detector a visit's workers process: science CCDs, then wavefront sensors."""
    time_scale: float
    cadence: float
    calibrations: tuple[Visit, ...] = ()
    """Calibration exposures taken before the visits (one snap each; ``band`` is the image type), with
    ``number`` from -1 down."""

    def replicator_jobs(self) -> tuple[tuple[str, ...], ...]:
        """The rafts of each replicator job of a ``startIntegration``: one job per science raft, then one for
        every wavefront sensor's raft (LDM-230: 21 + 1 on LSSTCam, not one per corner raft)."""
        science = tuple((raft,) for raft in self.rafts if raft not in self.wavefront_rafts)
        return science + ((self.wavefront_rafts,) if self.wavefront_rafts else ())

    def timeline(self) -> list[PlannedEvent]:
        """Every event of the night, in time order (ties in the order they were planned): the calibration
        exposures (startExposure, startIntegration, startReadout, endReadout), then the science visits."""
        events: list[PlannedEvent] = []
        n, t0 = 0, 0.0
        for cal in self.calibrations:
            snap = cal.snaps[0]
            for kind, dt in ((EventKind.START_EXPOSURE, 0.0), (EventKind.START_INTEGRATION, snap.exptime),
                             (EventKind.START_READOUT, READOUT_S), (EventKind.END_READOUT, 0.5)):  # fmt: skip
                events.append(PlannedEvent(t0, n, kind, cal))
                n += 1
                t0 += dt * self.time_scale
        if self.calibrations:
            events.append(PlannedEvent(t0, n, EventKind.SCIENCE_MODE, self.calibrations[-1]))
            n += 1
            t0 += self.cadence
        for k, visit in enumerate(self.visits):
            t = t0 + k * self.cadence
            events.append(PlannedEvent(t, n, EventKind.NEXT_VISIT, visit))
            n += 1
            t += 0.05 * self.cadence  # nextVisit comes ahead of the first integration
            for snap in visit.snaps:
                for kind, dt in ((EventKind.START_INTEGRATION, snap.exptime), (EventKind.START_READOUT,
                                 READOUT_S), (EventKind.END_READOUT, 0.0)):  # fmt: skip
                    events.append(PlannedEvent(t, n, kind, visit, snap.index))
                    n += 1
                    t += dt * self.time_scale
        heapq.heapify(events)
        return [heapq.heappop(events) for _ in range(len(events))]

    def visit_by_number(self, number: int) -> Visit:
        return self.visits[number - 1]


def _calibrations(repo: Repository, count: int) -> tuple[Visit, ...]:
    """The first ``count`` calibration exposures, one of each type in turn (bias, dark, flat, …)."""
    order = ("BIAS", "DARK", "FLAT")
    rows = sorted((r for r in repo.exposures() if r["imgtype"] in order), key=lambda r: r["mjd_obs"])
    queues = {t: [r for r in rows if r["imgtype"] == t] for t in order}
    picked: list[dict] = []
    while len(picked) < count and any(queues.values()):
        for t in order:
            if queues[t] and len(picked) < count:
                picked.append(queues[t].pop(0))
    picked.sort(key=lambda r: r["mjd_obs"])
    return tuple(Visit(-(k + 1), int(r["seq_num"]), str(r["imgtype"]), float(r["ra"]), float(r["dec"]), 0.0,
                       (Snap(0, str(r["obsid"]), str(r["day_obs"]), float(r["mjd_obs"]), float(r["exptime"])),))
                 for k, r in enumerate(picked))  # fmt: skip


def plan_night(repo: str | Path | Repository, *, time_scale: float = 0.1, cadence: float | None = None,
               max_visits: int | None = None, calibration_exposures: int = 0) -> NightPlan:  # fmt: skip
    """The plan of the night on ``repo``'s science visits (all, or the first ``max_visits``).

    Raises
    ------
    ValueError
        The repository has no science visits, or a visit lacks its CDS images, or the clock settings are
        not positive, or ``max_visits`` is below 1, or ``calibration_exposures`` below 0 — with what to do.
    """
    repo = repo if isinstance(repo, Repository) else Repository(repo)
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0 (1 plays the night in real time), not {time_scale!r}")
    for name, value, least in (("max_visits", max_visits, 1), ("calibration_exposures", calibration_exposures, 0)):
        if (value is not None or least == 0) and (type(value) is not int or value < least):
            raise ValueError(f"{name} must be an integer ≥ {least}{' (None: every visit)' if least else ''}, "
                             f"not {value!r}")  # fmt: skip
    camera = get_camera(repo.read_config()["camera"])
    rows = sorted(repo.exposures("OBJECT"), key=lambda r: (r["mjd_obs"], r["visit"], r["snap"]))
    by_visit: dict[int, list[dict]] = {}
    for r in rows:
        by_visit.setdefault(int(r["visit"]), []).append(r)
    if not by_visit:
        raise ValueError(f"{repo.root} has no science exposures: simulate a night first "
                         f"(lsstpipe simulate --repo {repo.root} --calibs)")  # fmt: skip
    visits = []
    for number, (visit, snaps) in enumerate(by_visit.items(), start=1):
        if max_visits is not None and number > max_visits:
            break
        first = snaps[0]
        visits.append(Visit(number, visit, str(first["band"]), float(first["ra"]), float(first["dec"]),
                            float(first["rotpa"]),
                            tuple(Snap(int(s["snap"]), str(s["obsid"]), str(s["day_obs"]), float(s["mjd_obs"]),
                                       float(s["exptime"])) for s in sorted(snaps, key=lambda s: s["snap"]))))  # fmt: skip
    simulated = {r["detector"] for r in repo.raws(visits[0].snaps[0].image_id)}
    present = [d for d in camera.detectors if d.name in simulated]  # a repository may hold some detectors only
    science = tuple(d for d in present if d.type is DetectorType.SCIENCE)
    wfs = tuple(d for d in present if d.type is not DetectorType.SCIENCE)
    sci_rafts = tuple(dict.fromkeys(d.raft for d in science))
    wfs_rafts = tuple(dict.fromkeys(d.raft for d in wfs))
    missing = [(s.image_id, r) for v in visits for s in v.snaps for r in sci_rafts + wfs_rafts
               if not (repo.root / "cds" / s.day_obs / s.image_id / f"{r}_raw.h5").is_file()]  # fmt: skip
    if missing:
        raise ValueError(f"{repo.root}: {len(missing)} raft image(s) are not in the repository's CDS buffer "
                         f"(first: {missing[0][0]} {missing[0][1]}); simulate without --no-cds")  # fmt: skip
    length = max(sum(s.exptime + READOUT_S for s in v.snaps) for v in visits) * time_scale
    if cadence is None:
        cadence = length * 1.1  # the nextVisit lead (5 %) and some slack
    if not cadence > 0:
        raise ValueError(f"cadence must be > 0 seconds, not {cadence!r}")
    calibrations = _calibrations(repo, calibration_exposures)
    missing = [(c.snaps[0].image_id, r) for c in calibrations for r in sci_rafts + wfs_rafts
               if not (repo.root / "cds" / c.snaps[0].day_obs / c.snaps[0].image_id / f"{r}_raw.h5").is_file()]  # fmt: skip
    if missing:
        raise ValueError(f"{repo.root}: calibration exposure {missing[0][0]} raft {missing[0][1]} is not in the "
                         "CDS buffer; simulate with --calibs, or set calibration_exposures: 0")  # fmt: skip
    return NightPlan(repo.root, camera, tuple(visits), sci_rafts + wfs_rafts, wfs_rafts,
                     tuple(d.name for d in science + wfs), time_scale, float(cadence), calibrations)  # fmt: skip


def check_masters(repo: Repository, plan: NightPlan, calibs: str) -> None:
    """Whether the master calibrations the night's workers read (``worker.calibs``) can be had.

    ``db`` and ``auto`` need certified masters, or calibration exposures to make them from first (the night
    runs the Calibration Products Production when ``calib.sqlite3`` is missing); ``truth`` needs the
    simulator's instrument truth of every detector.

    Raises
    ------
    ValueError
        What is missing, and what to do.
    """
    root, db_path = repo.root, repo.root / "calib.sqlite3"
    if calibs != "truth" and not db_path.is_file():
        if any(e["imgtype"] in ("BIAS", "DARK", "FLAT") for e in repo.exposures()):
            return
        raise ValueError(f"--repo {root} has no certified master calibrations (calib.sqlite3) and no bias, dark or "
                         f"flat exposures to make them from, which worker.calibs: {calibs} needs: simulate the "
                         f"repository with its calibration exposures ('lsstpipe simulate --repo {root} … --calibs'; "
                         "the night then makes the masters first), or set worker.calibs: truth in --config to use "
                         "the simulator's instrument truth")  # fmt: skip
    if calibs != "truth":
        from lsstpipe.db.calib import CalibrationDatabase
        from lsstpipe.db.sql import DatabaseError

        try:
            with CalibrationDatabase(db_path) as db:
                certified = [d for d in plan.detectors if db.history("bias", d)]
        except DatabaseError as exc:
            raise ValueError(f"--repo {root}: calib.sqlite3 cannot be read ({exc})") from exc
        if not certified:
            raise ValueError(f"--repo {root}: its calibration database (calib.sqlite3) certifies no masters for the "
                             f"night's detectors ({', '.join(plan.detectors)}), which worker.calibs: {calibs} needs "
                             f"(an earlier Calibration Products Production failed? its runs are in {root}/calib/"
                             "runs): remove calib.sqlite3 and calib/ to make them again with this night, or set "
                             "worker.calibs: truth in --config")  # fmt: skip
        return
    missing = [d for d in plan.detectors if not Path(repo.instrument_truth_path(d)).is_file()]
    if missing:
        raise ValueError(f"worker.calibs: truth needs the simulator's instrument truth, which --repo {root} lacks "
                         f"for {len(missing)} detector(s) (first: {missing[0]}); set worker.calibs: db (masters "
                         "from the repository's calibration exposures)")  # fmt: skip
