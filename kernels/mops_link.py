"""Intra-night tracklets: pairs of detections whose implied sky motion is that of a moving object.

A *tracklet* here is a pair ``(i, j)`` of detections of one night, ``t_i < t_j``, with

* ``min_dt ≤ t_j − t_i ≤ max_dt`` (days; MOPS uses a 90-minute window, and a minimum separation that
  rules out two detections of the same exposure or snap pair),
* ``min_rate ≤ θ_ij / (t_j − t_i) ≤ max_rate`` where ``θ_ij`` is the great-circle separation (degrees)
  and the rates are in deg/day (main-belt asteroids move 0.05–0.5 deg/day near opposition, NEOs more:
  :mod:`lsstpipe.pipelines.mops` documents its defaults of 0.05–2 deg/day).

A longer chain (three or more visits of one night) appears as all of its qualifying pairs; the track
linker (:func:`lsstpipe.pipelines.mops.link_tracks`) merges them back into one track.

Candidates are found without an O(N²) loop: detections are binned in declination (bins of width
``r = max_rate · max_dt``) and sorted by RA within each bin; each detection visits its own and the two
adjacent bins, and in them only the RA range ``|Δα| ≤ 2 asin(sin(r/2) / cos δ_max)`` with
``δ_max = |δ| + r`` (binary searches on both sides of the RA 0/360 seam; the whole bin near the poles,
where that range reaches 180°). Both pre-filters are exact, since ``θ ≥ |Δδ|`` and
``hav θ ≥ cos δ₁ cos δ₂ hav Δα``. Separations come from unit vectors and the chord, ``θ = 2 asin(c / 2)``, accurate at all angles.
"""

from __future__ import annotations

import numpy as np

from kernels.config import njit
from kernels.sphere import unit_vectors as _unit

__all__ = ["find_tracklets"]


@njit
def _visit(i, j, xyz, mjd, night, min_dt, max_dt, min_rate, max_rate, first, second, n):
    """Test the candidate pair (i, j), i < j; store it at slot n when it qualifies. Returns the new count."""
    if night[i] != night[j]:
        return n
    dt = mjd[j] - mjd[i]
    adt = abs(dt)
    if adt < min_dt or adt > max_dt:
        return n
    dx = xyz[i, 0] - xyz[j, 0]
    dy = xyz[i, 1] - xyz[j, 1]
    dz = xyz[i, 2] - xyz[j, 2]
    sep = np.rad2deg(2.0 * np.arcsin(min(1.0, 0.5 * np.sqrt(dx * dx + dy * dy + dz * dz))))
    rate = sep / adt
    if rate < min_rate or rate > max_rate:
        return n
    if n < first.size:
        if dt >= 0.0:
            first[n] = i
            second[n] = j
        else:
            first[n] = j
            second[n] = i
    return n + 1


@njit
def _scan_range(i, lo_ra, hi_ra, ra_sorted, order, s0, s1, xyz, mjd, night, min_dt, max_dt, min_rate, max_rate,
                first, second, n):  # fmt: skip
    """Candidates j > i of one declination bin (slice ``s0:s1`` of the RA-sorted order) with RA in a range."""
    lo = s0 + np.searchsorted(ra_sorted[s0:s1], lo_ra, side="left")
    hi = s0 + np.searchsorted(ra_sorted[s0:s1], hi_ra, side="right")
    for k in range(lo, hi):
        j = order[k]
        if j > i:
            n = _visit(i, j, xyz, mjd, night, min_dt, max_dt, min_rate, max_rate, first, second, n)
    return n


@njit
def _scan(ra, dec, bin_of, starts, ra_sorted, order, band, xyz, mjd, night, min_dt, max_dt, min_rate, max_rate,
          first, second):  # fmt: skip
    """Visit, for every detection, the detections of its own and the adjacent declination bins within
    ``band / cos(dec)`` in RA (across the 0/360 seam; the whole bin where that reaches 180°).

    Returns the number of pairs found (which may exceed the output length: then call again, sized).
    """
    n = 0
    nbins = starts.size - 1
    for i in range(ra.size):
        b = bin_of[i]
        # hav θ ≥ cos δ_i cos δ_j hav Δα, and |δ_j| ≤ |δ_i| + band: θ ≤ band needs Δα ≤ dra below
        cosd = np.cos(np.deg2rad(min(90.0, abs(dec[i]) + band)))
        x = np.sin(np.deg2rad(band) / 2.0) / cosd if cosd > 1e-12 else 2.0
        dra = 360.0 if x >= 1.0 else np.rad2deg(2.0 * np.arcsin(x))
        for bb in range(max(0, b - 1), min(nbins, b + 2)):
            s0, s1 = starts[bb], starts[bb + 1]
            if s0 == s1:
                continue
            if dra >= 180.0:
                n = _scan_range(i, -1.0, 361.0, ra_sorted, order, s0, s1, xyz, mjd, night, min_dt, max_dt,
                                min_rate, max_rate, first, second, n)  # fmt: skip
                continue
            lo_ra, hi_ra = ra[i] - dra, ra[i] + dra
            n = _scan_range(i, max(lo_ra, 0.0), min(hi_ra, 360.0), ra_sorted, order, s0, s1, xyz, mjd, night,
                            min_dt, max_dt, min_rate, max_rate, first, second, n)  # fmt: skip
            if lo_ra < 0.0:
                n = _scan_range(i, lo_ra + 360.0, 360.0, ra_sorted, order, s0, s1, xyz, mjd, night, min_dt,
                                max_dt, min_rate, max_rate, first, second, n)  # fmt: skip
            if hi_ra > 360.0:
                n = _scan_range(i, 0.0, hi_ra - 360.0, ra_sorted, order, s0, s1, xyz, mjd, night, min_dt,
                                max_dt, min_rate, max_rate, first, second, n)  # fmt: skip
    return n


def find_tracklets(
    ra, dec, mjd, night, *, min_dt: float, max_dt: float, min_rate: float, max_rate: float
) -> tuple[np.ndarray, np.ndarray]:
    """All detection pairs of one night whose separation in time and implied rate qualify as a tracklet.

    Parameters
    ----------
    ra, dec : array_like
        Positions, degrees (finite; ``dec`` in [−90, 90]).
    mjd : array_like
        Times of the detections, days (MJD TAI).
    night : array_like of int
        Night of each detection (only detections of the same night pair up).
    min_dt, max_dt : float
        Allowed time separation in days, ``0 < min_dt ≤ max_dt``.
    min_rate, max_rate : float
        Allowed great-circle rate in deg/day, ``0 ≤ min_rate ≤ max_rate``.

    Returns
    -------
    first, second : numpy.ndarray of int64
        Indices of the earlier and later detection of each tracklet, sorted by ``(first, second)``.

    Raises
    ------
    ValueError
        On arrays of different lengths, non-finite positions or times, or inconsistent limits.
    """
    ra = np.ascontiguousarray(ra, dtype=np.float64)
    dec = np.ascontiguousarray(dec, dtype=np.float64)
    mjd = np.ascontiguousarray(mjd, dtype=np.float64)
    night = np.ascontiguousarray(night, dtype=np.int64)
    if ra.ndim != 1 or not (ra.shape == dec.shape == mjd.shape == night.shape):
        raise ValueError(
            f"ra, dec, mjd and night must be 1-D arrays of one length; got shapes "
            f"{ra.shape}, {dec.shape}, {mjd.shape}, {night.shape}"
        )
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec)) and np.all(np.isfinite(mjd))):
        raise ValueError("ra, dec and mjd must be finite: drop detections without a position or time first")
    if np.any(np.abs(dec) > 90.0):
        raise ValueError("dec must lie in [-90, 90] degrees")
    if not (0.0 < min_dt <= max_dt and np.isfinite(max_dt)):
        raise ValueError(f"need 0 < min_dt ≤ max_dt (days); got min_dt={min_dt}, max_dt={max_dt}")
    if not (0.0 <= min_rate <= max_rate and np.isfinite(max_rate)):
        raise ValueError(f"need 0 ≤ min_rate ≤ max_rate (deg/day); got min_rate={min_rate}, max_rate={max_rate}")
    ra = ra % 360.0
    band = max_rate * max_dt * (1.0 + 1e-9) + 1e-12
    bin_of = np.floor((dec + 90.0) / band).astype(np.int64)
    order = np.lexsort((ra, bin_of)).astype(np.int64)
    nbins = int(bin_of.max()) + 1 if ra.size else 1
    starts = np.searchsorted(bin_of[order], np.arange(nbins + 1)).astype(np.int64)
    xyz = np.empty((ra.size, 3))
    _unit(ra, dec, xyz)
    args = (ra, dec, bin_of, starts, np.ascontiguousarray(ra[order]), order, band, xyz, mjd, night, float(min_dt),
            float(max_dt), float(min_rate), float(max_rate))  # fmt: skip
    first = np.empty(max(16, 4 * ra.size), np.int64)
    second = np.empty_like(first)
    n = _scan(*args, first, second)
    if n > first.size:
        first = np.empty(n, np.int64)
        second = np.empty(n, np.int64)
        _scan(*args, first, second)
    first, second = first[:n], second[:n]
    idx = np.lexsort((second, first))
    return first[idx], second[idx]
