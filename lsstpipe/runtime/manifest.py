"""``OUT/manifest.json``: what the night did with every CCD and every image, machine-readable.

::

    {"night": {...}, "complete": true, "calibrations": [...],
     "visits": [{"visit": 2023093000001, "number": 1, "band": "i",
                 "ccds": [{"detector": "R10_S00", "status": "processed", "reason": "", "diasources": 3,
                           "alerts": 3, "rank": 3, "attempt": 1, "seconds": 1.2, "readout_end": …,
                           "last_alert_time": …, "catchup": false, "run": "…",
                           "sdqa": {"seeing_arcsec": 0.8, …}}],
                 "focal_plane": {"n_ccds": 18, "seeing_arcsec": 0.8, …},
                 "images": [{"image_id": "MC_O_…", "raft": "R10", "kind": "raw", "checksum": "…",
                             "tape": true, "raw_cache": false, "outage_buffer": true, "catchup": false}]}]}

``calibrations`` lists the calibration exposures taken before the visits (``seq_num``, ``imgtype``,
``image_id``, with ``ccds`` and ``images`` as for a visit; their CCDs ran ISR only). ``status`` is ``processed``, ``failed`` (with the reason), ``skipped`` (not sampled, dropped from a full
queue) or ``late`` (past its deadline and not reprocessed). ``tape`` and ``raw_cache`` are true only once
the stored copy at the Archive was read back and its checksum verified (:meth:`Manifest.verify_archive`):
raw images belong on tape, crosstalk-corrected ones in the raw image cache. ``outage_buffer`` says the
Base kept a copy in the network outage buffer until the Archive confirmed it. ``lost_records`` counts, per
store (``control database``, ``Summit EFD``), the records whose write failed during the night
(:meth:`Manifest.count_lost_records`). ``focal_plane`` holds the visit's focal-plane values
(:mod:`lsstpipe.runtime.focal_plane`), with ``focal_plane_from`` when the DMCS added them up from its CCDs'
``sdqa`` (the SDQA values each CCD's telemetry brought) instead of having them from the workers; ``run`` names
the run of the night (``night.run``) that processed the CCD.

The manifest is rewritten atomically as the night goes on; a night started again on the same ``OUT``
reads it and skips every CCD already processed, keeping its record and its visit's focal-plane values; the
others run again (the restart is idempotent: the APDB, the alerts and the archive take a CCD's or an image's
second copy as the first).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lsstpipe.repo import atomic_write_text

__all__ = ["CcdRecord", "ImageRecord", "Manifest"]

TERMINAL = ("processed", "failed", "skipped", "late")
#: A visit's focal-plane entries, carried over from the manifest of an earlier run of the night.
_VALUES = ("focal_plane", "focal_plane_from")


@dataclass
class CcdRecord:
    detector: str
    status: str = "queued"
    reason: str = ""
    diasources: int = 0
    alerts: int = 0
    rank: int | None = None
    attempt: int = 0
    seconds: float | None = None
    readout_end: float | None = None
    """``time.time()`` at the end of the readout of the visit's last snap."""
    last_alert_time: float | None = None
    """``time.time()`` when the CCD's last alert was written."""
    catchup: bool = False
    """Processed after the night's last visit (reprocessing, catch-up processing) or from the raw cache."""
    rescheduled_at: float | None = None
    run: str | None = None
    """The run of the night (:attr:`Manifest.run`) that processed it: a record carried over names its own."""
    sdqa: dict[str, float] | None = None
    """Its SDQA values that go into the visit's focal-plane values (:data:`lsstpipe.runtime.focal_plane.SUMS`),
    from its telemetry: what the DMCS adds up itself when it cannot have them from the workers."""

    def set(self, status: str, reason: str = "", **counts: int) -> None:
        self.status, self.reason = status, reason
        for name, value in counts.items():
            setattr(self, name, int(value))


@dataclass
class ImageRecord:
    image_id: str
    raft: str
    kind: str
    visit: int
    checksum: str | None = None
    tape: bool = False
    raw_cache: bool = False
    outage_buffer: bool = False
    catchup: bool = False
    readout_end: float | None = field(default=None, metadata={"internal": True})
    replicator_done: float | None = field(default=None, metadata={"internal": True})
    catchup_pending: bool = field(default=False, metadata={"internal": True})

    @property
    def archived(self) -> bool:
        """At its place at the Archive: a raw image on tape, a crosstalk-corrected one in the raw cache."""
        return self.tape if self.kind == "raw" else self.raw_cache


class Manifest:
    """The night's manifest under ``out`` (module docstring)."""

    def __init__(self, out: Path, night: dict[str, Any] | None = None) -> None:
        self.out = Path(out)
        self.night = dict(night or {})
        self.visits: dict[int, dict[str, Any]] = {}
        self._ccds: dict[int, dict[str, CcdRecord]] = {}
        self._images: dict[tuple[str, str, str], ImageRecord] = {}
        self.complete = False
        self.previous: dict[tuple[int, str], dict] = {}
        self._previous_values: dict[int, dict[str, Any]] = {}
        self._lost_sources: list[Callable[[], Mapping[str, int]]] = []
        path = self.path
        if path.is_file():
            old = json.loads(path.read_text())
            for v in old.get("visits", []) + [{**c, "visit": c["seq_num"]} for c in old.get("calibrations", [])]:
                for c in v.get("ccds", []):
                    self.previous[(int(v["visit"]), c["detector"])] = c
                if "focal_plane" in v:
                    self._previous_values[int(v["visit"])] = {k: v[k] for k in _VALUES if k in v}

    @property
    def run(self) -> str | None:
        """The run of the night writing it (``night["run"]``; the same for a standby DMCS taking over)."""
        return self.night.get("run")

    @property
    def path(self) -> Path:
        return self.out / "manifest.json"

    def _visit(self, visit) -> dict[str, Any]:
        if visit.visit not in self.visits:
            if visit.number < 0:  # a calibration exposure: its sequence number, image type and image
                self.visits[visit.visit] = {"seq_num": visit.visit, "imgtype": visit.band,
                                            "image_id": visit.snaps[0].image_id}  # fmt: skip
            else:
                self.visits[visit.visit] = {"visit": visit.visit, "number": visit.number, "band": visit.band,
                                            **self._previous_values.get(visit.visit, {})}  # fmt: skip
            self._ccds[visit.visit] = {}
        return self.visits[visit.visit]

    def ccd(self, visit, detector: str) -> CcdRecord:
        """The record of ``detector`` in ``visit`` (created queued; carried over from an earlier run)."""
        self._visit(visit)
        recs = self._ccds[visit.visit]
        if detector not in recs:
            old = self.previous.get((visit.visit, detector))
            recs[detector] = CcdRecord(**old) if old and old.get("status") == "processed" else CcdRecord(detector)
        return recs[detector]

    def focal_plane(self, visit, values: dict[str, float], source: str | None = None) -> None:
        """The visit's focal-plane values (mean seeing and zero point, …) combined by its workers, or, when a
        part was lost, by the DMCS from what ``source`` says."""
        entry = self._visit(visit)
        entry["focal_plane"] = {k: float(v) for k, v in values.items()}
        entry.pop("focal_plane_from", None)  # (values carried over from an earlier run say their own source)
        if source is not None:
            entry["focal_plane_from"] = source

    def has_focal_plane(self, visit_id: int) -> bool:
        """Whether the visit's focal-plane values are recorded (in this run, or carried over)."""
        return "focal_plane" in self.visits.get(visit_id, {})

    def ccds_of(self, visit_id: int) -> list[CcdRecord]:
        return list(self._ccds.get(visit_id, {}).values())

    def record(self, visit_id: int, detector: str) -> CcdRecord | None:
        """The record of ``detector`` in visit ``visit_id``, if the visit has one."""
        return self._ccds.get(visit_id, {}).get(detector)

    def image(self, visit, image_id: str, raft: str, kind: str) -> ImageRecord:
        self._visit(visit)
        key = (image_id, raft, kind)
        if key not in self._images:
            self._images[key] = ImageRecord(image_id, raft, kind, visit.visit)
        return self._images[key]

    def find_image(self, image_id: str, raft: str, kind: str) -> ImageRecord | None:
        return self._images.get((image_id, raft, kind))

    def images(self) -> list[ImageRecord]:
        return list(self._images.values())

    def verify_archive(self) -> list[str]:
        """Read every image back from the Archive and set ``tape``/``raw_cache`` from what verifies.

        An image whose checksum is known (the distributor confirmed it) verifies only if the copy read back
        has that checksum; the known checksum is never replaced, so a mismatch is found on every call. An
        image whose checksum is unknown takes the checksum of the copy that verified.

        Returns the problems found (an image missing, damaged or different at the Archive).
        """
        from lsstpipe.archive.blobs import ImageKey
        from lsstpipe.archive.storage import RawImageCache
        from lsstpipe.archive.tape import TapeLibrary

        for folder in ("tape", "raw_cache"):
            (self.out / "archive" / folder).mkdir(parents=True, exist_ok=True)
        tape = TapeLibrary(self.out / "archive" / "tape")
        cache = RawImageCache(self.out / "archive" / "raw_cache")
        problems = []
        for im in self._images.values():
            key = ImageKey(im.image_id, im.raft, im.kind)
            try:
                checksum = tape.verify(key) if im.kind == "raw" else cache.verify(key)
            except Exception as exc:  # noqa: BLE001 — missing or damaged: reported, flag stays false
                ok = False
                problems.append(f"{key}: {exc}")
            else:
                if im.checksum is None:  # unknown until now: the copy read back defines it
                    im.checksum = checksum
                ok = checksum == im.checksum  # a mismatch stays one, however often this runs
                if not ok:
                    problems.append(f"{key}: the Archive's copy has checksum {checksum}, not the {im.checksum} "
                                    "the distributor confirmed; archive the image again")  # fmt: skip
            if im.kind == "raw":
                im.tape = ok
            else:
                im.raw_cache = ok
        return problems

    def count_lost_records(self, source: Callable[[], Mapping[str, int]]) -> None:
        """Report the records ``source`` says its stores lost (store name → failed writes, e.g. the Base
        DMCS's :meth:`~lsstpipe.control.dmcs.BaseDMCS.lost_records`) in :meth:`summary` and the manifest.
        A store named by several sources counts once, as the last one registered says."""
        self._lost_sources.append(source)

    def lost_records(self) -> dict[str, int]:
        """Records lost so far per store (failed writes to the control database, the Summit EFD, …)."""
        lost: dict[str, int] = {}
        for source in self._lost_sources:
            for store, n in source().items():
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise ValueError(f"lost records of {store!r}: expected a count >= 0, got {n!r}")
                lost[store] = n
        return lost

    def to_json(self) -> dict[str, Any]:
        visits: list[dict[str, Any]] = []
        calibrations: list[dict[str, Any]] = []
        for vid, v in self.visits.items():
            ccds = [asdict(c) for c in self._ccds[vid].values()]
            images = [{k: val for k, val in asdict(im).items()
                       if k not in ("readout_end", "replicator_done", "catchup_pending")}
                      for im in self._images.values() if im.visit == vid]  # fmt: skip
            (calibrations if "imgtype" in v else visits).append({**v, "ccds": ccds, "images": images})
        return {
            "night": self.night,
            "complete": self.complete,
            "written": time.time(),
            "visits": visits,
            "calibrations": calibrations,
            "lost_records": self.lost_records(),
        }

    def write(self) -> Path:
        atomic_write_text(self.path, json.dumps(self.to_json(), indent=1, default=str))
        return self.path

    def summary(self) -> dict[str, int]:
        """CCDs per status, ``images``, ``archived``, ``alerts``, and ``lost_records``: the records the
        stores lost in all (:meth:`lost_records`; 0 when none, or nothing counted)."""
        counts: dict[str, int] = {}
        for recs in self._ccds.values():
            for c in recs.values():
                counts[c.status] = counts.get(c.status, 0) + 1
        counts["images"] = len(self._images)
        counts["archived"] = sum(im.archived for im in self._images.values())
        counts["alerts"] = sum(c.alerts for recs in self._ccds.values() for c in recs.values())
        counts["lost_records"] = sum(self.lost_records().values())
        return counts
