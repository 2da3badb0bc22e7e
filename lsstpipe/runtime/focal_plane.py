"""A visit's focal-plane values: what the workers add up over their CCDs, and the DMCS's tally of the parts.

When every CCD of a visit is done, the DMCS asks for the visit's focal-plane values (seeing, zero point,
background, number of DIASources and of PSF stars): the workers of the visit's string combine their sums
with an MPI collective (:class:`~lsstpipe.runtime.messages.FocalPlaneReduce`), and the string's first worker
reports the total. A CCD of the visit can also run outside its string — on a spare when every worker of the
string is busy, or on another string's worker after a reschedule — and such a worker is in no collective
for the visit: it reports its own sums straight to the DMCS (``FocalPlaneReduce(visit, direct=True)``).
The DMCS adds the parts (:class:`FocalPlaneTally`) and records the values once the last one is in. (Before,
those CCDs were left out: on a 16-rank night whose spare took 2–3 of each visit's 18 CCDs, the values
covered 15–16 CCDs.) Each request names the CCDs whose results the DMCS took from that worker, and the worker
counts only those: a CCD that also ran elsewhere (given up on and rescheduled while its first worker still
finished it, or run again after a DMCS takeover) counts once.

Each part travels as a :class:`~lsstpipe.runtime.messages.TelemetryReport` named :data:`SUMS_REPORT`
whose values are the sums of :data:`SUMS`.

When a part can never come — a member of the visit's string is dead when the values are due (its collective
could never complete), a worker asked dies before it answers, or no answer came by the end of the night —
the DMCS adds up the visit's CCDs itself, from the SDQA telemetry each worker sent with each processed CCD
(kept on the CCD's manifest record: :meth:`FocalPlaneScheduling.ccd_telemetry`), and says so in the manifest
(``focal_plane_from``). Before, such a visit's values were not recorded at all.

The records on disk serve a restarted night too: the CCDs processed by an earlier run of the night are in no
live worker's sums, so the DMCS adds their recorded values to the parts (a visit none of whose CCDs ran
again keeps the values that run recorded), and a standby DMCS adds up the visits whose answer was lost with
the DMCS it replaces (:meth:`FocalPlaneScheduling.settle_after_takeover`). Before, a restarted night's
manifest had no values for the visits carried over, and a takeover lost those of the visits already asked.

:class:`FocalPlaneScheduling` is the DMCS's part (of :class:`~lsstpipe.runtime.dmcs_night.NightDMCS`) that
asks, records and falls back. It uses these of the scheduler: ``post``, ``plan``, ``manifest``, ``publish``,
``strings``, ``visit_string``, ``dead``, ``focal_plane`` (a :class:`FocalPlaneTally`), ``_send`` and
``_all_workers``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from lsstpipe.runtime.messages import FocalPlaneReduce

log = logging.getLogger(__name__)

#: What each worker adds up over its science CCDs of a visit (those with a finite seeing and zero point).
SUMS = ("n_ccds", "seeing_arcsec", "zero_point", "background_level", "n_dia_sources", "n_psf_stars")
#: The ``detector`` of the :class:`~lsstpipe.runtime.messages.TelemetryReport` that carries one part's sums.
SUMS_REPORT = "focal_plane_sums"
#: The SDQA values of a CCD that go into :data:`SUMS` (kept on its manifest record).
SDQA_KEYS = SUMS[1:]


def ccd_row(sdqa: dict) -> np.ndarray | None:
    """One CCD's contribution to :data:`SUMS`, or None when its seeing or zero point is missing."""
    seeing, zp = sdqa.get("seeing_arcsec"), sdqa.get("zero_point")
    if not all(isinstance(v, float | int) and math.isfinite(v) for v in (seeing, zp)):
        return None
    return np.array([1.0, seeing, zp, float(sdqa.get("background_level", 0.0) or 0.0),
                     float(sdqa.get("n_dia_sources", 0)), float(sdqa.get("n_psf_stars", 0))])  # fmt: skip


def values(sums) -> tuple[tuple[str, float], ...]:
    """The focal-plane values of summed parts: the number of CCDs, the means of seeing, zero point and
    background over them, the totals of DIASources and PSF stars. Empty when no CCD counted."""
    s = np.asarray(sums, dtype=float)
    n = s[0]
    if not n > 0:
        return ()
    return (("n_ccds", n), ("seeing_arcsec", s[1] / n), ("zero_point", s[2] / n), ("background_level", s[3] / n),
            ("n_dia_sources", s[4]), ("n_psf_stars", s[5]))  # fmt: skip


def records_sum(records) -> np.ndarray:
    """The :data:`SUMS` of CCD records by their ``sdqa`` (those without a seeing and zero point count not)."""
    rows = (ccd_row(r.sdqa) for r in records if r.sdqa)
    return sum((row for row in rows if row is not None), np.zeros(len(SUMS)))


class FocalPlaneTally:
    """The DMCS's side: for each visit, the ranks it asked, how many parts it still waits for and their sum so
    far."""

    def __init__(self) -> None:
        self._open: dict[int, list] = {}
        self._asked: dict[int, frozenset[int]] = {}
        self._done: set[int] = set()

    def expect(self, visit: int, parts: int, asked=(), base=None) -> None:
        """``visit``'s values come in ``parts`` reports (the string's total, plus one per worker outside it)
        from the ranks ``asked`` (any of whom dying loses a part: :meth:`lost`), added to ``base`` (the sums of
        CCDs no worker asked holds)."""
        self._open[visit] = [parts, np.zeros(len(SUMS)) if base is None else np.array(base, dtype=float)]
        self._asked[visit] = frozenset(asked)

    def add(self, visit: int, report_values) -> tuple[tuple[str, float], ...] | None:
        """Count one part's report; the visit's :func:`values` once its last part is in, else None (also for
        a visit not expected, or already complete)."""
        entry = self._open.get(visit)
        if entry is None:
            return None
        named = dict(report_values)
        entry[1] += np.array([float(named.get(k, 0.0)) for k in SUMS])
        entry[0] -= 1
        if entry[0] > 0:
            return None
        self._close(visit)
        return values(entry[1])

    def lost(self, rank: int) -> list[int]:
        """The visits still waiting for an answer from ``rank`` (which died): for :meth:`from_telemetry`."""
        return [v for v in self._open if rank in self._asked.get(v, ())]

    def from_telemetry(self, visit: int, processed) -> tuple[tuple[str, float], ...]:
        """``visit``'s :func:`values` from the ``sdqa`` of its CCD records ``processed`` (those recorded
        processed: a CCD whose late result was dropped and whose rerun failed is not counted); the visit is
        closed."""
        self._close(visit)
        return values(records_sum(processed))

    def closed(self, visit: int) -> bool:
        """Whether ``visit``'s values were recorded (by this DMCS)."""
        return visit in self._done

    def _close(self, visit: int) -> None:
        self._done.add(visit)
        self._open.pop(visit, None)
        self._asked.pop(visit, None)

    def waiting(self) -> set[int]:
        """The visits whose values are not all in."""
        return set(self._open)


class FocalPlaneScheduling:
    """The DMCS's side of the visits' focal-plane values (module docstring)."""

    def reduce_visit(self, visit) -> bool:
        """Ask the visit's string to combine its focal-plane values (an MPI collective among its workers), and
        each other live worker that ran some of its CCDs for its own sums (:mod:`lsstpipe.runtime.focal_plane`);
        when a member is dead (the collective could never complete), add up the CCDs' telemetry instead."""
        string = self.visit_string.get(visit.visit)
        if string is None or visit.number < 0:
            return False
        members = self.strings[string]
        processed = [r for r in self.manifest.ccds_of(visit.visit) if r.status == "processed"]
        earlier = [r for r in processed if r.run != self.manifest.run]  # carried over: in no live worker's sums
        taken: dict[int, list[str]] = {}  # this run's: each worker counts the CCDs whose results were taken from it
        for r in processed:
            if r.run == self.manifest.run:
                taken.setdefault(r.rank, []).append(r.detector)
        if earlier and not taken:
            if not self.manifest.has_focal_plane(visit.visit):  # (else: the values that run recorded stay)
                self.settle_focal_plane(visit.visit, "every CCD processed by an earlier run of the night")
            return True
        gone = sorted(set(members) & self.dead)
        if gone or self.post.rank in members:
            self.settle_focal_plane(visit.visit, f"rank(s) {gone} of its string dead" if gone else
                                    "this DMCS (a standby) is a member of its string")  # fmt: skip
            return True
        # (records carried over from an earlier run name that run's ranks: only this layout's workers are asked)
        others = sorted(set(taken) & set(self._all_workers()) - set(members) - self.dead - {self.post.rank})
        self.focal_plane.expect(visit.visit, 1 + len(others), asked=[*members, *others], base=records_sum(earlier))
        for worker in members:
            self._send(FocalPlaneReduce(visit.visit, detectors=tuple(taken.get(worker, ()))), worker)
        for worker in others:
            self._send(FocalPlaneReduce(visit.visit, direct=True, detectors=tuple(taken[worker])), worker)
        return True

    def ccd_telemetry(self, visit_id: int, detector: str, report_values) -> None:
        """Keep a CCD's SDQA values of :data:`SUMS` on its manifest record (a later report of the same CCD, from
        a rerun, replaces them) until its visit's values are recorded."""
        rec = self.manifest.record(visit_id, detector)
        if rec is None or self.focal_plane.closed(visit_id):
            return
        named = dict(report_values)
        rec.sdqa = {k: float(named[k]) for k in SDQA_KEYS if isinstance(named.get(k), float | int)} or None

    def settle_after_takeover(self, asked) -> None:
        """A standby DMCS: record the values of the visits in ``asked`` (ids of visits whose values the crashed
        DMCS asked for) that are not on record: their answers went to it."""
        science = {v.visit for v in self.plan.visits}  # (calibration exposures have no focal-plane values)
        for visit_id in asked:
            if visit_id in science and not self.manifest.has_focal_plane(visit_id):
                self.settle_focal_plane(visit_id, "asked for by the DMCS that crashed")

    def settle_focal_plane(self, visit_id: int, why: str) -> None:
        """Record ``visit_id``'s focal-plane values from its processed CCDs' SDQA telemetry, a part of them
        being lost (``why``)."""
        processed = [r for r in self.manifest.ccds_of(visit_id) if r.status == "processed"]
        values = self.focal_plane.from_telemetry(visit_id, processed)
        log.warning("visit %d: focal-plane values added up from its CCDs' telemetry (%s): %d CCD(s) counted",
                    visit_id, why, int(dict(values).get("n_ccds", 0)))  # fmt: skip
        self._record_focal_plane(visit_id, values, f"the CCDs' SDQA telemetry ({why})")

    def _record_focal_plane(self, visit_id: int, values, source: str | None = None) -> None:
        visit = next((v for v in self.plan.visits if v.visit == visit_id), None)
        if visit is not None and values:
            self.manifest.focal_plane(visit, dict(values), source)
        if self.publish is not None:
            for name, value in values:
                self.publish(f"focal_plane.{name}", value)

    @property
    def reductions_pending(self) -> set[int]:
        """The visits whose focal-plane values are not all in."""
        return self.focal_plane.waiting()
