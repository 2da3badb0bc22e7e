"""Keplerian orbits, the Earth model, astrometric ephemerides and magnitudes of the simulator."""

from pathlib import Path

import erfa
import numpy as np
import pytest

from lsstpipe.sim.orbits import (
    GM_SUN,
    OBLIQUITY_J2000_DEG,
    Orbit,
    apparent_magnitude,
    earth_position,
    elements_to_state,
    observer_position,
    orbit_through,
    read_colours,
    read_des_orbits,
    solve_kepler,
    state_to_elements,
)
from lsstpipe.sim.wcs import angular_separation_mas

DATA = Path(__file__).parent / "data"


def test_kepler_residual_on_random_and_hard_inputs():
    rng = np.random.default_rng(0)
    m = rng.uniform(-50.0, 50.0, 20000)
    e = rng.uniform(0.0, 0.95, 20000)
    e[:2000] = 0.95
    m[:1000] = rng.uniform(-1e-4, 1e-4, 1000)  # hardest: high e near perihelion
    m[1000:2000] = np.pi + rng.uniform(-1e-4, 1e-4, 1000)
    m.setflags(write=False)
    big_e = solve_kepler(m, e)
    assert np.abs(big_e - e * np.sin(big_e) - m).max() < 1e-12
    assert solve_kepler(1.0, 0.0) == pytest.approx(1.0, abs=1e-15)


def test_kepler_rejects_unbound_eccentricity():
    with pytest.raises(ValueError, match="only elliptic orbits"):
        solve_kepler([0.1, 0.2], [0.5, 1.2])
    with pytest.raises(ValueError, match="not a bound elliptic orbit"):
        Orbit("comet", 3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 60000.0)


def test_state_elements_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(50):
        el = (rng.uniform(0.5, 50.0), rng.uniform(0.0, 0.95), rng.uniform(0.1, 179.0), rng.uniform(0, 360),
              rng.uniform(0, 360), rng.uniform(0, 360))  # fmt: skip
        r, v = elements_to_state(*el)
        r2, v2 = elements_to_state(*state_to_elements(r, v))
        np.testing.assert_allclose(r2, r, atol=1e-11 * el[0])
        np.testing.assert_allclose(v2, v, atol=1e-11 * np.linalg.norm(v))


def test_energy_and_angular_momentum_conserved():
    orbit = Orbit("x", 2.7, 0.3, 12.0, 80.0, 150.0, 10.0, 60000.0)
    t = np.linspace(59000.0, 63000.0, 97)
    r, v = orbit.state(t)
    energy = 0.5 * np.sum(v * v, axis=0) - GM_SUN / np.linalg.norm(r, axis=0)
    np.testing.assert_allclose(energy, -GM_SUN / (2 * orbit.a), rtol=1e-12)
    h = np.cross(r, v, axis=0)
    np.testing.assert_allclose(h, h[:, :1] * np.ones_like(h), rtol=0, atol=1e-13)


def test_circular_orbit_returns_after_one_period():
    orbit = Orbit("c", 2.5, 0.0, 5.0, 30.0, 0.0, 45.0, 60000.0)
    r0, r1, r_half = orbit.position([60000.0, 60000.0 + orbit.period_days, 60000.0 + orbit.period_days / 2]).T
    np.testing.assert_allclose(r1, r0, atol=1e-10)
    np.testing.assert_allclose(r_half, -r0, atol=1e-10)
    assert np.linalg.norm(r0) == pytest.approx(2.5, rel=1e-14)


def test_earth_at_march_equinox_and_distance_range():
    # 2024-03-20 03:06 UTC (MJD 60389.13): the Sun is at the equinox of date, i.e. ecliptic longitude
    # 0° − 0.34° of precession in the J2000 frame, so the Earth is at 180° − 0.34°.
    x = earth_position(60389.13)
    lon = np.rad2deg(np.arctan2(x[1], x[0])) % 360.0
    assert abs(lon - 180.0) < 0.5
    assert abs(lon - (180.0 - 0.335)) < 0.02
    d = np.linalg.norm(earth_position(np.linspace(60000.0, 60365.25, 731)), axis=0)
    assert 0.983 <= d.min() < 0.984 and 1.016 < d.max() <= 1.017


def test_earth_within_2e4_au_of_erfa():
    """The Standish + lunar-offset Earth against ERFA's epv00 (a 1-km-class series) over 2021–2029."""
    mjd = np.linspace(59200.0, 62200.0, 1501)
    pvh, _ = erfa.epv00(2400000.5, mjd)
    eq = np.asarray(pvh["p"] if pvh.dtype.names else pvh[..., 0, :]).T
    eps = np.deg2rad(OBLIQUITY_J2000_DEG)
    ecl = np.stack([eq[0], np.cos(eps) * eq[1] + np.sin(eps) * eq[2], -np.sin(eps) * eq[1] + np.cos(eps) * eq[2]])
    assert np.linalg.norm(earth_position(mjd) - ecl, axis=0).max() < 2e-4


def test_topocentric_offset_is_one_earth_radius():
    mjd = np.linspace(60218.0, 60219.0, 25)
    off = np.linalg.norm(observer_position(mjd) - observer_position(mjd, topocentric=False), axis=0)
    np.testing.assert_allclose(off * 149597870.7, 6373.0, atol=10.0)


def test_test_set_loads_and_gives_finite_positions():
    orbits = read_des_orbits(DATA / "sspp_testset_orbits.des")
    colours = read_colours(DATA / "sspp_testset_colours.txt")
    assert len(orbits) == 10 and len(colours) == 10
    assert {o.name for o in orbits} == set(colours)
    tno = next(o for o in orbits if o.name == "2011_OB60")
    assert (tno.a, tno.e, tno.epoch) == (103.711231, 0.6461554, 60200.0)
    assert colours["2011_WJ157"].H("y") == pytest.approx(4.92 - 0.70)
    for o in orbits:
        eph = o.radec(np.linspace(60218.0, 60248.0, 7))
        for arr in eph:
            assert arr.shape == (7,) and np.all(np.isfinite(arr))
        assert np.all((eph.phase >= 0.0) & (eph.phase <= 180.0))


def test_readers_report_bad_files(tmp_path):
    bad = tmp_path / "bad.des"
    bad.write_text("ObjID q e inc node argPeri t_p epochMJD_TDB FORMAT\nx 1 0.1 1 1 1 1 60000 COM\n")
    with pytest.raises(ValueError, match="lacks the columns a, ma"):
        read_des_orbits(bad)
    com = tmp_path / "com.des"
    com.write_text("ObjID a e inc node argPeri ma epochMJD_TDB FORMAT\nx 1 0.1 1 1 1 1 60000 COM\n")
    with pytest.raises(ValueError, match="only KEP"):
        read_des_orbits(com)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_colours(tmp_path / "missing.txt")


def test_apparent_magnitude_hg():
    assert apparent_magnitude(15.0, 0.15, 1.0, 1.0, 0.0) == pytest.approx(15.0)
    assert apparent_magnitude(15.0, 0.15, 2.5, 1.5, 0.0) == pytest.approx(15.0 + 5 * np.log10(3.75))
    m = apparent_magnitude(15.0, 0.15, 2.5, 1.5, np.array([0.0, 5.0, 20.0]))
    assert np.all(np.diff(m) > 0)
    # α = 20°, G = 0.15: Φ1 = exp(-3.33 tan(10°)^0.63) = 0.3277, Φ2 = exp(-1.87 tan(10°)^1.22) = 0.7985,
    # -2.5 log10(0.85 Φ1 + 0.15 Φ2) = 1.000 mag.
    assert m[2] - m[0] == pytest.approx(1.000, abs=0.002)


@pytest.mark.parametrize("ra, dec", [(8.0, 1.0), (330.0, -25.0), (120.0, 10.0), (200.0, -80.0)])
def test_orbit_through_recovers_position(ra, dec):
    rng = np.random.default_rng(7)
    mjd = 60218.1
    for k in range(5):
        orbit = orbit_through(ra, dec, mjd, rng, name=f"sim{k}")
        assert orbit.name == f"sim{k}" and 2.1 * 0.8 < orbit.a < 3.3 * 1.3 and orbit.e < 0.4
        eph = orbit.radec(mjd)
        assert angular_separation_mas(ra, dec, eph.ra, eph.dec) < 10.0  # 0.01″
        assert 2.1 - 1e-9 <= eph.r <= 3.3 + 1e-9


def test_orbit_through_moves_like_a_main_belt_object():
    rng = np.random.default_rng(11)
    mjd = 60218.1  # 2023-10-01: opposition is near RA 8°, Dec +1°
    rates = []
    for _ in range(10):
        orbit = orbit_through(8.0, 1.0, mjd, rng)
        eph = orbit.radec(np.array([mjd, mjd + 1.0 / 24.0]))
        rates.append(angular_separation_mas(eph.ra[0], eph.dec[0], eph.ra[1], eph.dec[1]) / 3.6e6 * 24.0)
        assert eph.ra[1] < eph.ra[0], "retrograde at opposition"
    assert 0.1 < min(rates) and max(rates) < 1.0


def test_orbit_through_rejects_distances_inside_earth_orbit():
    with pytest.raises(ValueError, match="above 1.02 AU"):
        orbit_through(0.0, 0.0, 60218.0, np.random.default_rng(0), r_helio_au=(0.5, 2.0))
