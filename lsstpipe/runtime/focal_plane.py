"""A visit's focal-plane values: what the workers add up over their CCDs, and the DMCS's tally of the parts.

When every CCD of a visit is done, the DMCS asks for the visit's focal-plane values (seeing, zero point,
background, number of DIASources and of PSF stars): the workers of the visit's string combine their sums
with an MPI collective (:class:`~lsstpipe.runtime.messages.FocalPlaneReduce`), and the string's first worker
reports the total. A CCD of the visit can also run outside its string — on a spare when every worker of the
string is busy, or on another string's worker after a reschedule — and such a worker is in no collective
for the visit: it reports its own sums straight to the DMCS (``FocalPlaneReduce(visit, direct=True)``).
The DMCS adds the parts (:class:`FocalPlaneTally`) and records the values once the last one is in. (Before,
those CCDs were left out: on a 16-rank night whose spare took 2–3 of each visit's 18 CCDs, the values
covered 15–16 CCDs.)

Each part travels as a :class:`~lsstpipe.runtime.messages.TelemetryReport` named :data:`SUMS_REPORT`
whose values are the sums of :data:`SUMS`.
"""

from __future__ import annotations

import math

import numpy as np

#: What each worker adds up over its science CCDs of a visit (those with a finite seeing and zero point).
SUMS = ("n_ccds", "seeing_arcsec", "zero_point", "background_level", "n_dia_sources", "n_psf_stars")
#: The ``detector`` of the :class:`~lsstpipe.runtime.messages.TelemetryReport` that carries one part's sums.
SUMS_REPORT = "focal_plane_sums"


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


class FocalPlaneTally:
    """The DMCS's side: for each visit, how many parts it still waits for and their sum so far."""

    def __init__(self) -> None:
        self._open: dict[int, list] = {}

    def expect(self, visit: int, parts: int) -> None:
        """``visit``'s values come in ``parts`` reports (the string's total, plus one per worker outside it)."""
        self._open[visit] = [parts, np.zeros(len(SUMS))]

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
        del self._open[visit]
        return values(entry[1])

    def waiting(self) -> set[int]:
        """The visits whose values are not all in."""
        return set(self._open)
