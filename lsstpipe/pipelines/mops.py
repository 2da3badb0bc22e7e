"""Daytime MOPS, part 1: the day's unassociated DIASources → tracklets → tracks → orbits → SSObjects.

A pure stage (no I/O): :func:`run_mops` takes the DIASources that no SSObject claimed during the night(s)
and the current SSObject table, and returns the tracklets, the accepted tracks with their orbits, the
updated SSObject table and the next night's ephemeris coefficients (:mod:`lsstpipe.pipelines.mops_orbits`).
:func:`score_linkages` scores the tracks against the simulator's truth with ``difi``.

Criteria (the LSST one, LDM-156/LSE-30: two detections within 90 minutes on each of three nights within
a 15-night window), with the defaults of :class:`MopsConfig`:

* **Night** of a detection: Rubin's ``dayObs``, ``floor(mjd − 0.5)`` (the date at UTC−12 h).
* **Tracklets**: pairs of detections of one night 5–90 min apart whose implied great-circle rate is
  0.05–2 deg/day (main-belt asteroids move 0.05–0.5 deg/day, near-Earth objects up to a few deg/day;
  slower pairs are dominated by static-source artefacts): :func:`kernels.mops_link.find_tracklets`.
* **Tracks**: for every tracklet ``A`` and every tracklet ``B`` of a later night within the window, ``B``
  must lie within ``½ a_max Δt² + σ_v Δt + 10″`` of ``A``'s linear extrapolation and have a velocity within
  ``a_max Δt + 2σ_v`` of ``A``'s (``a_max`` = 0.02 deg/day² covers the sky-plane acceleration of
  main-belt objects; ``σ_v`` = 0.005 deg/day is a tracklet's velocity error). A quadratic in time per
  tangent-plane axis, fitted to the detections of ``A`` and ``B``, is extrapolated to the other nights of the
  window and the nearest tracklet within ``link_radius_arcsec`` (60″) of each night joins. The track is kept
  when it spans ≥ 3 nights and every detection lies within ``2″ + 0.01″ · (arc/day)³`` of the quadratic
  refitted to all of them (the worst tracklet is dropped while it does not). Measured on simulated
  main-belt objects near opposition: three nights fit a quadratic to ≤ 0.5″ (the diurnal parallax) over
  any arc up to 14 days, but six nights over 14 days leave up to 17″ of third-order motion, hence the
  cubic growth (2.3″ at 3 days, 5.4″ at 7, 29″ at 14).
* **Resolution**: candidate tracks are taken by most detections, then smallest quadratic rms; a track
  sharing a detection with an accepted track is skipped; each track must pass the orbit fit
  (:func:`~lsstpipe.pipelines.mops_orbits.fit_orbit`, rms ≤ ``max_orbit_rms_arcsec``) to be accepted.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from kernels.mops_link import find_tracklets
from lsstpipe.pipelines.mops_orbits import (
    SSOBJECT_DTYPE,
    OrbitFit,
    fit_orbit,
    from_plane,
    nightly_coefficients,
    to_plane,
    update_ssobjects,
)

__all__ = ["LinkingScore", "MopsConfig", "MopsResult", "link_tracks", "night_of", "run_mops", "score_linkages",
           "tracklets"]  # fmt: skip

_ARCSEC = 3600.0


def night_of(mjd) -> np.ndarray:
    """Rubin's ``dayObs`` night number of MJD (TAI) times: ``floor(mjd − 0.5)``."""
    return np.floor(np.asarray(mjd, dtype=float) - 0.5).astype(np.int64)


@dataclass(frozen=True)
class MopsConfig:
    """Tolerances of the daytime MOPS (see the module docstring for their meaning)."""

    min_dt_days: float = 5.0 / 1440.0
    """Shortest time between a tracklet's detections (days)."""
    max_dt_days: float = 90.0 / 1440.0
    """Longest time between a tracklet's detections (days)."""
    min_rate_deg_per_day: float = 0.05
    max_rate_deg_per_day: float = 2.0
    min_nights: int = 3
    """Distinct nights a track needs."""
    window_nights: int = 15
    """A track's nights all lie within this many consecutive nights."""
    max_accel_deg_per_day2: float = 0.02
    """Largest sky-plane acceleration allowed between tracklets."""
    velocity_error_deg_per_day: float = 0.005
    """Velocity uncertainty of one tracklet."""
    link_radius_arcsec: float = 60.0
    """Radius around a quadratic prediction in which a tracklet of another night can join."""
    max_quadratic_residual_arcsec: float = 2.0
    """Largest residual of any detection from the track's quadratic motion, for a short arc."""
    quadratic_growth_arcsec_per_day3: float = 0.01
    """Growth of that tolerance with the cube of the arc (the unmodelled third-order motion)."""
    max_orbit_rms_arcsec: float = 1.0
    """Largest rms of an accepted orbit fit."""

    def __post_init__(self) -> None:
        if not (0.0 < self.min_dt_days <= self.max_dt_days):
            raise ValueError(f"need 0 < min_dt_days ≤ max_dt_days; got {self.min_dt_days}, {self.max_dt_days}")
        if not (0.0 <= self.min_rate_deg_per_day <= self.max_rate_deg_per_day):
            raise ValueError("need 0 ≤ min_rate_deg_per_day ≤ max_rate_deg_per_day")
        if self.min_nights < 2 or self.window_nights < self.min_nights:
            raise ValueError(f"need 2 ≤ min_nights ≤ window_nights; got {self.min_nights}, {self.window_nights}")
        for name in ("max_accel_deg_per_day2", "velocity_error_deg_per_day", "link_radius_arcsec",
                     "max_quadratic_residual_arcsec", "max_orbit_rms_arcsec"):  # fmt: skip
            if not getattr(self, name) > 0.0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.quadratic_growth_arcsec_per_day3 >= 0.0:
            raise ValueError("quadratic_growth_arcsec_per_day3 must be ≥ 0")


def tracklets(mjd, ra, dec, config: MopsConfig = MopsConfig()) -> np.ndarray:
    """Tracklets of detections as an ``(n, 2)`` array of detection indices (earlier, later)."""
    first, second = find_tracklets(
        ra, dec, mjd, night_of(mjd), min_dt=config.min_dt_days, max_dt=config.max_dt_days,
        min_rate=config.min_rate_deg_per_day, max_rate=config.max_rate_deg_per_day,
    )  # fmt: skip
    return np.stack([first, second], axis=1)


def _unit(ra, dec) -> np.ndarray:
    a, d = np.deg2rad(ra), np.deg2rad(dec)
    return np.stack([np.cos(d) * np.cos(a), np.cos(d) * np.sin(a), np.sin(d)], axis=-1)


def _chord(deg: float) -> float:
    return 2.0 * math.sin(math.radians(min(deg, 179.0)) / 2.0)


def _quadratic_residuals(t, xi, eta) -> np.ndarray:
    deg = min(2, np.unique(t).size - 1)
    rx = np.polyval(np.polyfit(t, xi, deg), t) - xi
    re = np.polyval(np.polyfit(t, eta, deg), t) - eta
    return np.hypot(rx, re) * _ARCSEC


def link_tracks(mjd, ra, dec, pairs: np.ndarray, config: MopsConfig = MopsConfig()) -> list[np.ndarray]:
    """Candidate tracks: tracklets of ≥ ``min_nights`` nights consistent with quadratic sky motion.

    Parameters
    ----------
    mjd, ra, dec : array_like
        Detections (MJD TAI, degrees).
    pairs : numpy.ndarray
        Tracklets from :func:`tracklets`.
    config : MopsConfig

    Returns
    -------
    list of numpy.ndarray
        Sorted detection indices of each distinct candidate track, ordered by decreasing number of
        detections, then increasing quadratic rms. Candidates may share detections (see :func:`run_mops`).
    """
    mjd, ra, dec = (np.asarray(x, dtype=float) for x in (mjd, ra, dec))
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if pairs.size == 0:
        return []
    nights = night_of(mjd)
    tn = nights[pairs[:, 0]]
    tm = 0.5 * (mjd[pairs[:, 0]] + mjd[pairs[:, 1]])
    mid = _unit(ra[pairs[:, 0]], dec[pairs[:, 0]]) + _unit(ra[pairs[:, 1]], dec[pairs[:, 1]])
    mid /= np.linalg.norm(mid, axis=1)[:, None]
    by_night = {int(n): np.flatnonzero(tn == n) for n in np.unique(tn)}
    trees = {n: cKDTree(mid[idx]) for n, idx in by_night.items()}
    partners: dict[int, list[int]] = {}
    for i, j in pairs.tolist():
        partners.setdefault(i, []).append(j)
        partners.setdefault(j, []).append(i)
    c = config
    found: dict[tuple[int, ...], float] = {}
    for a in range(len(pairs)):
        ia, ja = pairs[a]
        ra0 = math.degrees(math.atan2(mid[a, 1], mid[a, 0])) % 360.0
        dec0 = math.degrees(math.asin(max(-1.0, min(1.0, mid[a, 2]))))
        axi, aeta = to_plane(ra[[ia, ja]], dec[[ia, ja]], ra0, dec0)
        dta = mjd[ja] - mjd[ia]
        va = np.array([axi[1] - axi[0], aeta[1] - aeta[0]]) / dta
        for n in range(int(tn[a]) + 1, int(tn[a]) + c.window_nights):
            if n not in trees:
                continue
            dt = float(np.mean(tm[by_night[n]])) - tm[a]
            p = va * dt
            pra, pdec = from_plane(p[0], p[1], ra0, dec0)
            radius = 0.5 * c.max_accel_deg_per_day2 * dt**2 + c.velocity_error_deg_per_day * abs(dt) + 10.0 / _ARCSEC
            for k in trees[n].query_ball_point(_unit(pra, pdec), _chord(radius)):
                b = int(by_night[n][k])
                track = _grow(a, b, pairs, partners, mjd, ra, dec, tn, tm, va, mid, trees, by_night, ra0, dec0, c)
                if track is not None:
                    key, rms = track
                    found[key] = rms
    cands = sorted(found.items(), key=lambda kv: (-len(kv[0]), kv[1], kv[0]))
    return [np.asarray(k, dtype=np.int64) for k, _ in cands]


def _grow(a, b, pairs, partners, mjd, ra, dec, tn, tm, va, mid, trees, by_night, ra0, dec0, c: MopsConfig):
    """Extend the tracklet pair (a, b) to a track, or None when it is not consistent."""
    ib, jb = pairs[b]
    bxi, beta = to_plane(ra[[ib, jb]], dec[[ib, jb]], ra0, dec0)
    dt = tm[b] - tm[a]
    vb = np.array([bxi[1] - bxi[0], beta[1] - beta[0]]) / (mjd[jb] - mjd[ib])
    if np.hypot(*(vb - va)) > c.max_accel_deg_per_day2 * abs(dt) + 2.0 * c.velocity_error_deg_per_day:
        return None
    members = {int(tn[a]): a, int(tn[b]): b}
    for n, idx in by_night.items():
        if n in members or max(max(members), n) - min(min(members), n) >= c.window_nights:
            continue  # one tracklet per night, all nights within the window
        det = np.concatenate([pairs[m] for m in members.values()])
        t0 = tm[a]
        xi, eta = to_plane(ra[det], dec[det], ra0, dec0)
        t = mjd[det] - t0
        deg = min(2, np.unique(t).size - 1)
        cx, ce = np.polyfit(t, xi, deg), np.polyfit(t, eta, deg)
        tq = float(np.mean(tm[idx])) - t0
        pra, pdec = from_plane(np.polyval(cx, tq), np.polyval(ce, tq), ra0, dec0)
        near = trees[n].query_ball_point(_unit(pra, pdec), _chord(c.link_radius_arcsec / _ARCSEC))
        if not near:
            continue
        cand = idx[np.asarray(near, dtype=np.int64)]
        d = np.linalg.norm(mid[cand] - _unit(pra, pdec), axis=1)
        members[n] = int(cand[np.argmin(d)])
    while len(members) >= c.min_nights:
        det = np.unique(np.concatenate([pairs[m] for m in members.values()]))
        xi, eta = to_plane(ra[det], dec[det], ra0, dec0)
        res = _quadratic_residuals(mjd[det] - tm[a], xi, eta)
        tol = c.max_quadratic_residual_arcsec + c.quadratic_growth_arcsec_per_day3 * float(np.ptp(mjd[det])) ** 3
        if res.max() <= tol:
            det, res = _with_chains(det, res, partners, mjd, ra, dec, tm[a], ra0, dec0, tol)
            return tuple(int(x) for x in det), float(np.sqrt(np.mean(res**2)))
        # drop the tracklet holding the worst detection (never the seed pair's first tracklet)
        worst = int(det[np.argmax(res)])
        victims = [n for n, m in members.items() if worst in pairs[m] and m != a]
        if not victims:
            return None
        del members[victims[0]]
    return None


def _with_chains(det, res, partners, mjd, ra, dec, t0, ra0, dec0, tol):
    """Add the other detections of the track's longer chains (3+ visits a night) that fit its motion."""
    extra = np.array(sorted({k for i in det.tolist() for k in partners.get(i, ())} - set(det.tolist())), np.int64)
    if extra.size == 0:
        return det, res
    xi, eta = to_plane(ra[det], dec[det], ra0, dec0)
    t = mjd[det] - t0
    deg = min(2, np.unique(t).size - 1)
    cx, ce = np.polyfit(t, xi, deg), np.polyfit(t, eta, deg)
    exi, eeta = to_plane(ra[extra], dec[extra], ra0, dec0)
    te = mjd[extra] - t0
    near = np.hypot(np.polyval(cx, te) - exi, np.polyval(ce, te) - eeta) * _ARCSEC <= tol
    if not near.any():
        return det, res
    grown = np.union1d(det, extra[near])
    xi, eta = to_plane(ra[grown], dec[grown], ra0, dec0)
    res2 = _quadratic_residuals(mjd[grown] - t0, xi, eta)
    return (grown, res2) if res2.max() <= tol else (det, res)


@dataclass(frozen=True)
class MopsResult:
    """Output of :func:`run_mops`.

    Attributes
    ----------
    tracklets : numpy.ndarray
        ``(n, 2)`` detection indices of every tracklet.
    tracks : list of numpy.ndarray
        Detection indices of each accepted track (one per accepted orbit).
    fits : list of OrbitFit
        The orbit of each accepted track.
    ss_object_ids : numpy.ndarray of int64
        SSObject id of each input detection (0 where unlinked).
    ssobjects : numpy.ndarray
        The updated SSObject table.
    coefficients : numpy.ndarray or None
        Next-night Chebyshev coefficients of every SSObject (None when no night was given).
    n_candidates : int
        Candidate tracks examined.
    rejected_rms_arcsec : list of float
        Orbit rms of the candidate tracks that failed the orbit fit.
    """

    tracklets: np.ndarray
    tracks: list[np.ndarray]
    fits: list[OrbitFit]
    ss_object_ids: np.ndarray
    ssobjects: np.ndarray
    coefficients: np.ndarray | None
    n_candidates: int
    rejected_rms_arcsec: list[float] = field(default_factory=list)


def run_mops(
    mjd, ra, dec, ssobjects: np.ndarray | None = None, *, next_night: tuple[float, float] | None = None,
    config: MopsConfig = MopsConfig(),
) -> MopsResult:  # fmt: skip
    """The daytime MOPS over the unassociated detections of the last nights.

    Parameters
    ----------
    mjd, ra, dec : array_like
        Detections not associated with any SSObject (``midpointMjdTai``, ``ra``, ``dec`` of the DiaSources
        with ``ssObjectId`` NULL), degrees.
    ssobjects : numpy.ndarray, optional
        Current :data:`~lsstpipe.pipelines.mops_orbits.SSOBJECT_DTYPE` table (empty when None).
    next_night : (float, float), optional
        ``(mjd_start, mjd_end)`` (TAI) of the next night: when given, its ephemeris coefficients are
        computed for every SSObject.
    config : MopsConfig

    Returns
    -------
    MopsResult
    """
    mjd, ra, dec = (np.asarray(x, dtype=float) for x in (mjd, ra, dec))
    if not (mjd.ndim == 1 and mjd.shape == ra.shape == dec.shape):
        raise ValueError(f"mjd, ra, dec must be 1-D of one length; got {mjd.shape}, {ra.shape}, {dec.shape}")
    table = np.zeros(0, SSOBJECT_DTYPE) if ssobjects is None else ssobjects
    pairs = tracklets(mjd, ra, dec, config)
    cands = link_tracks(mjd, ra, dec, pairs, config)
    used = np.zeros(mjd.size, bool)
    tracks, fits, rejected = [], [], []
    for det in cands:
        if used[det].any():
            continue
        fit = fit_orbit(mjd[det], ra[det], dec[det], max_rms_arcsec=config.max_orbit_rms_arcsec)
        if not fit.accepted:
            rejected.append(fit.rms_arcsec)
            continue
        used[det] = True
        tracks.append(det)
        fits.append(fit)
    table, ids = update_ssobjects(table, fits, [(mjd[d], ra[d], dec[d]) for d in tracks])
    ss_ids = np.zeros(mjd.size, np.int64)
    for det, i in zip(tracks, ids, strict=True):
        ss_ids[det] = i
    coeffs = None
    if next_night is not None:
        coeffs = nightly_coefficients(table, float(next_night[0]), float(next_night[1]))
    return MopsResult(pairs, tracks, fits, ss_ids, table, coeffs, len(cands), rejected)


@dataclass(frozen=True)
class LinkingScore:
    """Linking scores from ``difi`` (``analyzeObservations`` + ``analyzeLinkages``).

    ``completeness`` = findable objects found by at least one pure or partial linkage / findable objects;
    ``purity`` = pure linkages / all linkages (1 when there are none).
    """

    n_findable: int
    n_found: int
    completeness: float
    n_linkages: int
    n_pure: int
    n_partial: int
    n_mixed: int
    purity: float


@contextlib.contextmanager
def _difi_compat():
    """Run difi 1.x (written for numpy 1 and pandas 1–2) under numpy 2 and pandas 3, for the call only.

    difi uses ``np.NaN`` (removed in numpy 2) and requires ``object`` string columns (pandas 3 infers its
    ``str`` dtype unless ``future.infer_string`` is off).
    """
    import warnings

    import pandas as pd

    added = "NaN" not in np.__dict__
    if added:
        np.NaN = np.nan  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # difi's own and pandas' deprecation warnings
            with pd.option_context("future.infer_string", False):
                yield
    finally:
        if added:
            del np.NaN  # type: ignore[attr-defined]


def score_linkages(
    obs_id, truth, mjd, tracks: list[np.ndarray], *, min_obs: int = 6, min_nights: int = 3,
    max_obs_separation_days: float = 90.0 / 1440.0, contamination_percentage: float = 20.0,
) -> LinkingScore:  # fmt: skip
    """Completeness and purity of ``tracks`` against the truth, computed by ``difi``.

    Findable objects follow difi's ``nightly_linkages`` metric: detections in pairs within
    ``max_obs_separation_days`` on at least ``min_nights`` nights (the LSST criterion). A linkage finds its
    object when it holds at least ``min_obs`` of its detections.

    Parameters
    ----------
    obs_id : array_like
        Unique id of each detection.
    truth : array_like of str
        True object of each detection (a unique string per noise detection).
    mjd : array_like
        Times (MJD TAI).
    tracks : list of numpy.ndarray
        Detection indices (into the arrays above) of each linkage.
    """
    try:
        import pandas as pd
        from difi import analyzeLinkages, analyzeObservations
    except ImportError as err:
        raise ImportError("score_linkages needs difi 1.x and pandas: pip install 'difi<2'") from err
    with _difi_compat():
        return _score(pd, analyzeLinkages, analyzeObservations, obs_id, truth, mjd, tracks, min_obs, min_nights,
                      max_obs_separation_days, contamination_percentage)  # fmt: skip


def _score(pd, analyzeLinkages, analyzeObservations, obs_id, truth, mjd, tracks, min_obs, min_nights,
           max_obs_separation_days, contamination_percentage) -> LinkingScore:  # fmt: skip
    obs = pd.DataFrame({"obs_id": np.asarray(obs_id).astype(str), "truth": np.asarray(truth).astype(str).astype(object),
                        "time": np.asarray(mjd, float), "night": night_of(mjd)})  # fmt: skip
    obs["obs_id"] = obs["obs_id"].astype(object)
    members = pd.DataFrame(
        {"linkage_id": np.concatenate([np.full(len(t), f"L{k}") for k, t in enumerate(tracks)]).astype(object)
         if tracks else np.zeros(0, object),
         "obs_id": obs["obs_id"].values[np.concatenate(tracks)] if tracks else np.zeros(0, object)}
    )  # fmt: skip
    mapping = {"linkage_id": "linkage_id", "obs_id": "obs_id", "truth": "truth", "time": "time", "night": "night"}
    all_truths, _, _ = analyzeObservations(
        obs, metric="nightly_linkages", column_mapping=mapping, linkage_min_obs=2,
        max_obs_separation=max_obs_separation_days, min_linkage_nights=min_nights,
    )  # fmt: skip
    n_findable = int(all_truths["findable"].sum())
    if not tracks:
        return LinkingScore(n_findable, 0, 0.0 if n_findable else 1.0, 0, 0, 0, 0, 1.0)
    all_linkages, truths, _ = analyzeLinkages(
        obs, members, all_truths=all_truths, min_obs=min_obs,
        contamination_percentage=contamination_percentage, column_mapping=mapping,
    )  # fmt: skip
    found = int(((truths["findable"] == 1) & (truths["found"] > 0)).sum())
    n_link = len(all_linkages)
    n_pure = int(all_linkages["pure"].sum())
    return LinkingScore(
        n_findable, found, found / n_findable if n_findable else 1.0, n_link, n_pure,
        int(all_linkages["partial"].sum()), int(all_linkages["mixed"].sum()), n_pure / n_link,
    )  # fmt: skip
