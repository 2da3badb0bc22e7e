"""Daytime MOPS: tracklet kernel vs its naive reference, linking scored by difi, orbits, SSObjects, predictions.

The synthetic survey uses the simulator's orbit machinery (:func:`lsstpipe.sim.orbits.orbit_through`,
:meth:`Orbit.radec`): main-belt asteroids near opposition in a 4°×4° field, two visits 30 min apart on
nights 0, 1 and 3, 0.07″ astrometric noise per axis, plus 100 random noise detections per visit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from extras import need_extra
from naive_mops import naive_tracklets

from kernels.mops_link import find_tracklets
from lsstpipe.pipelines.association import SS_PREDICTION_DTYPE
from lsstpipe.pipelines.mops import MopsConfig, link_tracks, night_of, run_mops, score_linkages, tracklets
from lsstpipe.pipelines.mops_orbits import (
    SSOBJECT_DTYPE,
    fit_orbit,
    from_plane,
    nightly_coefficients,
    predict_positions,
    to_plane,
)
from lsstpipe.sim.orbits import ecliptic_to_equatorial, observer_position, orbit_through

MJD0 = 61000.2  # 2025-11-21 04:48 TAI, dayObs 2025-11-20 (night 60999): opposition near RA 57°, Dec +20°
HALF_FIELD = 2.0  # deg
NOISE_ARCSEC = 0.07
VISIT_GAP = 30.0 / 1440.0


def _opposition(mjd: float) -> tuple[float, float]:
    q = ecliptic_to_equatorial(observer_position(mjd))
    return math.degrees(math.atan2(q[1], q[0])) % 360.0, math.degrees(math.asin(q[2] / np.linalg.norm(q)))


def _survey(rng, orbits, nights, ra0, dec0, n_noise=100):
    """Detections (mjd, ra, dec, truth) of ``orbits`` inside the field, plus noise, on ``nights``."""
    times = [MJD0 + n + dt for n in nights for dt in (0.0, VISIT_GAP)]
    mjd, ra, dec, truth = [], [], [], []
    for o in orbits:
        eph = o.radec(np.array(times))
        xi, eta = to_plane(eph.ra, eph.dec, ra0, dec0)
        inside = (np.abs(xi) < HALF_FIELD) & (np.abs(eta) < HALF_FIELD)
        for t, r, d in zip(np.array(times)[inside], eph.ra[inside], eph.dec[inside], strict=True):
            mjd.append(t)
            ra.append(r + rng.normal(0.0, NOISE_ARCSEC / 3600.0) / math.cos(math.radians(d)))
            dec.append(d + rng.normal(0.0, NOISE_ARCSEC / 3600.0))
            truth.append(o.name)
    for t in times:
        r, d = from_plane(*rng.uniform(-HALF_FIELD, HALF_FIELD, (2, n_noise)), ra0, dec0)
        mjd += [t] * n_noise
        ra += list(r)
        dec += list(d)
        truth += [f"noise{len(truth) + k}" for k in range(n_noise)]
    return np.array(mjd), np.array(ra), np.array(dec), np.array(truth)


@pytest.fixture(scope="module")
def day():
    rng = np.random.default_rng(2024)
    ra0, dec0 = _opposition(MJD0)
    orbits = [
        orbit_through(
            ra0 + rng.uniform(-1.5, 1.5) / math.cos(math.radians(dec0)),
            dec0 + rng.uniform(-1.5, 1.5),
            MJD0,
            rng,
            name=f"S{k}",
        )  # fmt: skip
        for k in range(20)
    ]
    mjd, ra, dec, truth = _survey(rng, orbits, (0, 1, 3), ra0, dec0)
    next_night = (MJD0 + 4 - 0.15, MJD0 + 4 + 0.3)
    result = run_mops(mjd, ra, dec, next_night=next_night)
    return {"orbits": {o.name: o for o in orbits}, "mjd": mjd, "ra": ra, "dec": dec, "truth": truth,
            "result": result, "next_night": next_night, "rng": rng, "centre": (ra0, dec0)}  # fmt: skip


# --- the tracklet kernel -------------------------------------------------------------------------------------


def _random_detections(rng, n, ra_range, dec_range):
    mjd = 60000.1 + rng.integers(0, 2, n) + rng.uniform(0.0, 0.1, n)
    return rng.uniform(*ra_range, n) % 360.0, rng.uniform(*dec_range, n), mjd


@pytest.mark.parametrize(
    "ra_range, dec_range",
    [
        ((10.0, 10.5), (-5.0, -4.5)),
        ((359.8, 360.2), (0.0, 0.3)),
        ((100.0, 101.0), (-70.3, -69.9)),
        ((0.0, 360.0), (89.85, 90.0)),
    ],
    ids=["plain", "ra-wrap", "high-dec", "pole"],
)
def test_tracklet_kernel_matches_naive(ra_range, dec_range):
    rng = np.random.default_rng(7)
    ra, dec, mjd = _random_detections(rng, 400, ra_range, dec_range)
    night = night_of(mjd)
    for arr in (ra, dec, mjd, night):
        arr.setflags(write=False)
    kw = {"min_dt": 5.0 / 1440.0, "max_dt": 90.0 / 1440.0, "min_rate": 0.05, "max_rate": 2.0}
    first, second = find_tracklets(ra, dec, mjd, night, **kw)
    nf, ns = naive_tracklets(ra, dec, mjd, night, **kw)
    assert len(first) > 20  # the test exercises something
    np.testing.assert_array_equal(first, nf)
    np.testing.assert_array_equal(second, ns)
    assert np.all(mjd[second] >= mjd[first])


def test_tracklet_kernel_no_pairs_and_validation():
    first, second = find_tracklets([1.0], [2.0], [60000.0], [0], min_dt=0.01, max_dt=0.06, min_rate=0.05, max_rate=2)
    assert first.size == second.size == 0
    with pytest.raises(ValueError, match="one length"):
        find_tracklets([1.0, 2.0], [2.0], [60000.0], [0], min_dt=0.01, max_dt=0.06, min_rate=0.05, max_rate=2)
    with pytest.raises(ValueError, match="finite"):
        find_tracklets([np.nan], [2.0], [60000.0], [0], min_dt=0.01, max_dt=0.06, min_rate=0.05, max_rate=2)
    with pytest.raises(ValueError, match="min_dt"):
        find_tracklets([1.0], [2.0], [60000.0], [0], min_dt=0.1, max_dt=0.06, min_rate=0.05, max_rate=2)
    with pytest.raises(ValueError, match="min_rate"):
        find_tracklets([1.0], [2.0], [60000.0], [0], min_dt=0.01, max_dt=0.06, min_rate=3.0, max_rate=2)
    with pytest.raises(ValueError, match="dec"):
        find_tracklets([1.0], [92.0], [60000.0], [0], min_dt=0.01, max_dt=0.06, min_rate=0.05, max_rate=2)


def test_config_and_fit_validation():
    with pytest.raises(ValueError, match="min_nights"):
        MopsConfig(min_nights=5, window_nights=3)
    with pytest.raises(ValueError, match="positive"):
        MopsConfig(link_radius_arcsec=0.0)
    with pytest.raises(ValueError, match="at least 4"):
        fit_orbit([1.0, 2.0], [1.0, 1.0], [0.0, 0.0])


# --- linking, scored with difi -------------------------------------------------------------------------------


def test_every_asteroid_has_a_tracklet_per_night(day):
    pairs = day["result"].tracklets
    truth = day["truth"]
    same = truth[pairs[:, 0]] == truth[pairs[:, 1]]
    real = np.char.startswith(truth.astype(str), "S")
    nights = night_of(day["mjd"])
    # every asteroid seen on both visits of a night makes exactly one pure tracklet that night
    keys = [(truth[i], nights[i]) for i in np.flatnonzero(real)]
    n_real_pairs = sum(1 for k in set(keys) if keys.count(k) == 2)
    assert n_real_pairs >= 36
    assert int(same.sum()) == n_real_pairs


def test_linking_completeness_and_purity_with_difi(day):
    need_extra("difi")
    res = day["result"]
    score = score_linkages(np.arange(day["mjd"].size), day["truth"], day["mjd"], res.tracks)
    assert score.n_findable >= 12  # most of the 20 objects stay in the field on all three nights
    assert score.completeness >= 0.9, score
    assert score.purity >= 0.9, score
    assert score.n_linkages == len(res.tracks)


def test_noise_alone_links_nothing():
    rng = np.random.default_rng(3)
    ra0, dec0 = _opposition(MJD0)
    mjd, ra, dec, _ = _survey(rng, [], (0, 1, 3), ra0, dec0, n_noise=150)
    pairs = tracklets(mjd, ra, dec)
    assert len(pairs) > 0  # noise makes chance tracklets ...
    tracks = link_tracks(mjd, ra, dec, pairs)
    assert tracks == []  # ... but no three-night quadratic track


# --- orbits, SSObjects and the next night ----------------------------------------------------------------------


def test_orbits_fit_the_detections(day):
    res = day["result"]
    assert len(res.fits) == len(res.tracks) >= 12
    for fit, det in zip(res.fits, res.tracks, strict=True):
        assert fit.accepted and fit.rms_arcsec < 0.5
        assert fit.residuals_arcsec.shape == (det.size, 2)
        assert fit.rms_arcsec > 0.2 * NOISE_ARCSEC  # the residuals carry the noise: the fit is not degenerate


def test_orbits_predict_the_next_night(day):
    res, truth = day["result"], day["truth"]
    t = np.linspace(*day["next_night"], 7)
    for fit, det in zip(res.fits, res.tracks, strict=True):
        name = truth[det[0]]
        true = day["orbits"][name].radec(t)
        pred = fit.orbit.radec(t)
        xi, eta = to_plane(pred.ra, pred.dec, true.ra[0], true.dec[0])
        txi, teta = to_plane(true.ra, true.dec, true.ra[0], true.dec[0])
        assert np.max(np.hypot(xi - txi, eta - teta)) * 3600.0 < 2.0, name


def test_ssobjects_and_nightly_coefficients(day):
    res = day["result"]
    table = res.ssobjects
    assert table.dtype == SSOBJECT_DTYPE and table.size == len(res.tracks)
    assert np.unique(table["ssObjectId"]).size == table.size and np.all(table["ssObjectId"] > 0)
    for row, det in zip(table, res.tracks, strict=True):
        assert row["numObs"] == det.size
        assert row["arc"] == pytest.approx(np.ptp(day["mjd"][det]), abs=1e-5)
        assert np.all(res.ss_object_ids[det] == row["ssObjectId"])
    assert np.count_nonzero(res.ss_object_ids) == sum(d.size for d in res.tracks)
    coeffs = res.coefficients
    assert np.array_equal(coeffs["ssObjectId"], table["ssObjectId"])
    rng = np.random.default_rng(5)
    for mid in rng.uniform(*day["next_night"], 5):
        pred = predict_positions(coeffs, mid, radius_arcsec=3.0)
        assert pred.dtype == SS_PREDICTION_DTYPE and np.all(pred["radius_arcsec"] == 3.0)
        for p, fit in zip(pred, res.fits, strict=True):
            eph = fit.orbit.radec(np.array([mid]))
            xi, eta = to_plane(p["ra"], p["dec"], eph.ra[0], eph.dec[0])
            assert math.hypot(float(xi), float(eta)) * 3600.0 < 0.1
    with pytest.raises(ValueError, match="outside the interval"):
        predict_positions(coeffs, day["next_night"][1] + 0.5)
    with pytest.raises(ValueError, match="mjd_end"):
        nightly_coefficients(table, 10.0, 9.0)


def test_next_day_updates_the_same_ssobjects(day):
    """Detections of nights 4, 5 and 6 link again and update the SSObjects found from nights 0–3."""
    res, truth = day["result"], day["truth"]
    found = {truth[d[0]]: int(res.ss_object_ids[d[0]]) for d in res.tracks}
    orbits = [day["orbits"][name] for name in sorted(found)[:12]]
    mjd, ra, dec, truth2 = _survey(day["rng"], orbits, (4, 5, 6), *day["centre"], n_noise=30)
    res2 = run_mops(mjd, ra, dec, res.ssobjects, config=MopsConfig())
    names, counts = np.unique(truth2[np.char.startswith(truth2.astype(str), "S")], return_counts=True)
    findable = int(np.sum(counts == 6))  # two visits on each of the three nights, all inside the field
    assert findable >= 4
    assert len(res2.tracks) >= 0.9 * findable
    assert res2.ssobjects.size == res.ssobjects.size  # no duplicates: every track matched its SSObject
    for det in res2.tracks:
        sid = int(res2.ss_object_ids[det[0]])
        assert sid == found[truth2[det[0]]]
        row = res2.ssobjects[res2.ssobjects["ssObjectId"] == sid][0]
        old = res.ssobjects[res.ssobjects["ssObjectId"] == sid][0]
        assert row["numObs"] == old["numObs"] + det.size
        assert row["arc"] == pytest.approx(mjd[det].max() - old["firstObsMjdTai"], abs=1e-5)


def test_long_arcs_link_whole_and_the_window_is_enforced():
    """Six nights over 14 days give one track per object; three nights over 16 days give none."""
    rng = np.random.default_rng(11)
    ra0, dec0 = _opposition(MJD0)
    orbits = [orbit_through(ra0 + rng.uniform(-1.0, 1.0), dec0 + rng.uniform(-1.0, 1.0), MJD0, rng, name=f"L{k}")
              for k in range(6)]  # fmt: skip
    for nights, expect in (((0, 1, 2, 3, 7, 14), True), ((0, 8, 16), False)):
        times = np.array([MJD0 + n + dt for n in nights for dt in (0.0, VISIT_GAP)])
        mjd = np.tile(times, len(orbits))
        eph = [o.radec(times) for o in orbits]
        ra = np.concatenate([e.ra for e in eph]) + rng.normal(0.0, NOISE_ARCSEC / 3600.0, mjd.size)
        dec = np.concatenate([e.dec for e in eph]) + rng.normal(0.0, NOISE_ARCSEC / 3600.0, mjd.size)
        res = run_mops(mjd, ra, dec)
        if expect:
            assert sorted(tuple(t) for t in res.tracks) == [
                tuple(range(k * times.size, (k + 1) * times.size)) for k in range(len(orbits))
            ]
            assert all(f.rms_arcsec < 0.5 for f in res.fits)
        else:
            assert len(res.tracklets) >= len(orbits) * len(nights)
            assert res.tracks == [] and res.n_candidates == 0


def test_three_visit_chains_join_their_track():
    """With three visits a night, each track holds all nine detections (the chains' pairs merged)."""
    rng = np.random.default_rng(12)
    ra0, dec0 = _opposition(MJD0)
    orbits = [orbit_through(ra0 + rng.uniform(-1.0, 1.0), dec0 + rng.uniform(-1.0, 1.0), MJD0, rng) for _ in range(4)]
    times = np.array([MJD0 + n + dt for n in (0, 1, 3) for dt in (0.0, VISIT_GAP, 2 * VISIT_GAP)])
    mjd = np.tile(times, len(orbits))
    ra = np.concatenate([o.radec(times).ra for o in orbits]) + rng.normal(0.0, NOISE_ARCSEC / 3600.0, mjd.size)
    dec = np.concatenate([o.radec(times).dec for o in orbits]) + rng.normal(0.0, NOISE_ARCSEC / 3600.0, mjd.size)
    res = run_mops(mjd, ra, dec)
    assert sorted(tuple(t) for t in res.tracks) == [tuple(range(9 * k, 9 * k + 9)) for k in range(len(orbits))]


def test_night_of_is_rubin_day_obs():
    # 2025-11-25 23:59 UTC and 2025-11-26 11:59 UTC belong to dayObs 2025-11-25 (MJD 61004)
    assert night_of([61004.9993, 61005.4993]).tolist() == [61004, 61004]
    assert night_of([61005.5001]).tolist() == [61005]


def test_orbit_fit_rejects_an_inconsistent_track(day):
    """Moving one detection by 5″ leaves no Keplerian orbit through the track."""
    res = day["result"]
    det = res.tracks[0]
    mjd, ra, dec = day["mjd"][det], day["ra"][det].copy(), day["dec"][det].copy()
    good = fit_orbit(mjd, ra, dec)
    assert good.accepted and good.rms_arcsec < 0.5
    dec[-1] += 5.0 / 3600.0
    bad = fit_orbit(mjd, ra, dec, max_rms_arcsec=0.5)
    assert not bad.accepted and bad.rms_arcsec > 0.5
