"""Visit sequences: the opsim reader, the synthetic generator and the VisitSpec conventions."""

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from lsstpipe.sim.opsim import (
    BANDS,
    DARK_SKY_MAG,
    OPSIM_COLUMNS,
    RUBIN_LAT_DEG,
    RUBIN_LON_DEG,
    VisitSpec,
    airmass,
    day_obs_of,
    m5_from_sky,
    read_opsim,
    sky_from_m5,
    synthetic_visits,
)

DATA = Path(__file__).parent / "data"
EXTRACT = DATA / "opsim_extract.db"
FULL_DB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "opsim" / "baseline_v2.0_1yr.db"


def _write_db(path, rows, columns=OPSIM_COLUMNS, table="observations"):
    con = sqlite3.connect(path)
    con.execute(f"CREATE TABLE {table} ({', '.join(columns)})")
    con.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(columns))})", rows)
    con.commit()
    con.close()
    return path


def test_read_extract():
    visits = read_opsim(EXTRACT)
    assert len(visits) == 50
    v0 = visits[0]
    assert v0.observation_id == 0 and v0.band == "y"
    assert v0.mjd == pytest.approx(60218.001805555556)
    assert v0.day_obs == 20230930  # MJD 60218.0018 is 2023-10-01 00:02 UTC
    assert [v.seq_num for v in visits[:3]] == [1, 3, 5]
    assert v0.visit == 2023093000001 and visits[1].visit == 2023093000003
    assert v0.obsid(0) == "MC_O_20230930_000001" and v0.obsid(1) == "MC_O_20230930_000002"
    assert v0.exposure_id(1) == 2023093000002
    assert (v0.ra, v0.dec, v0.rot_sky_pos) == pytest.approx((310.02448010095446, -60.81292801655155, 62.7507746))
    assert v0.seeing_fwhm == pytest.approx(0.7486257803188012)
    assert (v0.exptime, v0.n_snaps, v0.snap_exptime, v0.visit_time) == (30.0, 2, 15.0, 34.0)
    mjd = np.array([v.mjd for v in visits])
    assert np.all(np.diff(mjd) > 0)
    assert all(1.0 <= v.airmass < 3.0 for v in visits)
    assert all(abs(v.sky_mag - DARK_SKY_MAG[v.band]) < 1.5 for v in visits)


def test_sky_mag_reproduces_the_opsim_depth():
    for v in read_opsim(EXTRACT, visits=10):
        m5 = m5_from_sky(v.band, v.sky_mag, v.seeing_fwhm, v.exptime, v.airmass)
        assert m5 == pytest.approx(v.five_sigma_depth, abs=1e-9)


def test_m5_formula_matches_ivezic_table():
    """Dark sky, 0.7″ effective seeing, 30 s at zenith gives Cm + 0.5 (m_sky − 21) (Ivezić et al. 2019)."""
    assert m5_from_sky("r", 21.20, 0.7, 30.0, 1.0) == pytest.approx(24.44 + 0.1)
    assert sky_from_m5("g", np.nan, 0.8, 30.0, 1.2) == DARK_SKY_MAG["g"]


def test_airmass_matches_astropy():
    from astropy import units as u
    from astropy.coordinates import AltAz, EarthLocation, SkyCoord
    from astropy.time import Time
    from astropy.utils import iers

    visits = read_opsim(EXTRACT, visits=20)
    ra, dec, mjd = (np.array([getattr(v, k) for v in visits]) for k in ("ra", "dec", "mjd"))
    with iers.conf.set_temp("auto_download", False), iers.conf.set_temp("auto_max_age", None):
        site = EarthLocation(lon=RUBIN_LON_DEG * u.deg, lat=RUBIN_LAT_DEG * u.deg, height=2650 * u.m)
        frame = AltAz(obstime=Time(mjd, format="mjd", scale="tai"), location=site)
        alt = SkyCoord(ra * u.deg, dec * u.deg).transform_to(frame).alt.rad
    # Precession since J2000 (ignored here) moves the pole by ~0.1°: 0.3 % at these airmasses.
    np.testing.assert_allclose(airmass(ra, dec, mjd), 1.0 / np.sin(alt), rtol=3e-3)
    assert np.isnan(airmass(0.0, 80.0, 60218.0))  # never rises at Cerro Pachón


def test_limits_and_consecutive_ids():
    visits = read_opsim(EXTRACT, night=1, visits=5, first_visit_id=1000)
    assert [v.visit for v in visits] == [1000, 1001, 1002, 1003, 1004]
    assert [v.seq_num for v in visits] == [1, 3, 5, 7, 9]


def test_night_without_visits_says_which_exist():
    with pytest.raises(ValueError, match=r"night 3 .* has no visits.*between night 1 and night 1"):
        read_opsim(EXTRACT, night=3)
    with pytest.raises(ValueError, match="counts from 1"):
        read_opsim(EXTRACT, night=0)


def test_u_band_single_snap_and_day_rollover(tmp_path):
    rows = [
        (7, 60300.70, 31.0, 30.0, "u", 0.8, 0.9, 23.5, 10.0, -30.0, 5.0),
        (8, 60300.99, 34.0, 30.0, "g", 0.8, 0.9, 24.5, 60.0, -30.0, 5.0),
        (9, 60301.10, 34.0, 30.0, "r", 0.8, 0.9, 24.2, 90.0, -30.0, 5.0),
        (10, 60302.05, 34.0, 30.0, "r", 0.8, 0.9, 24.2, 80.0, -30.0, 5.0),
    ]
    db = _write_db(tmp_path / "mini.db", rows)
    visits = read_opsim(db)
    assert [v.n_snaps for v in visits] == [1, 2, 2, 2]
    assert [v.day_obs for v in visits] == [20231222, 20231222, 20231222, 20231223]
    assert [v.seq_num for v in visits] == [1, 2, 4, 1]
    assert read_opsim(db, night=2)[0].observation_id == 10
    assert visits[0].snap_exptime == 30.0 and visits[0].visit_time == 32.0
    with pytest.raises(IndexError, match="no snap 1"):
        visits[0].obsid(1)


def test_clear_errors_for_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_opsim(tmp_path / "nope.db")
    text = tmp_path / "notes.db"
    text.write_text("not a database\n")
    with pytest.raises(ValueError, match="not an SQLite database"):
        read_opsim(text)
    other = _write_db(tmp_path / "other.db", [], columns=("a", "b"), table="summary")
    with pytest.raises(ValueError, match="no 'observations' table.*summary"):
        read_opsim(other)
    partial = _write_db(tmp_path / "partial.db", [], columns=OPSIM_COLUMNS[:-2])
    with pytest.raises(ValueError, match="lacks the columns fieldDec, rotSkyPos"):
        read_opsim(partial)
    empty = _write_db(tmp_path / "empty.db", [])
    with pytest.raises(ValueError, match="has no visits"):
        read_opsim(empty)


def test_snap_times():
    v = read_opsim(EXTRACT, visits=1)[0]
    assert v.snap_mjd(0) == v.mjd
    assert (v.snap_mjd(1) - v.mjd) * 86400.0 == pytest.approx(17.0, abs=1e-4)


def test_visit_spec_validation():
    good = {"visit": 1, "mjd": 60218.05, "band": "r", "ra": 330.0, "dec": -25.0, "rot_sky_pos": 0.0}
    good["seeing_fwhm"] = 0.8
    v = VisitSpec.create(**good)
    assert v.sky_mag == DARK_SKY_MAG["r"] and np.isfinite(v.five_sigma_depth)
    with pytest.raises(ValueError, match="unknown band 'w'"):
        VisitSpec.create(**{**good, "band": "w"})
    with pytest.raises(ValueError, match="below the horizon"):
        VisitSpec.create(**{**good, "ra": 150.0})
    with pytest.raises(ValueError, match="n_snaps must be 1 or 2"):
        VisitSpec.create(**good, n_snaps=3)


def test_day_obs_convention():
    assert day_obs_of(60218.49) == 20230930  # 2023-10-01 11:45 UTC is still the night of Sept 30
    assert day_obs_of(60218.51) == 20231001


def test_synthetic_visits_are_deterministic_and_realistic():
    a = synthetic_visits(40, seed=5)
    assert a == synthetic_visits(40, seed=5)
    assert a != synthetic_visits(40, seed=6)
    assert len(a) == 40 and all(v.observation_id == -1 for v in a)
    mjd = np.array([v.mjd for v in a])
    gaps = np.diff(mjd) * 86400.0
    assert np.all(gaps > 0)
    assert np.sum(np.isclose(gaps, 34.0)) >= 25  # consecutive visits within a block
    # Every block of 4 has a revisit of the same field in the same band 27–33 minutes later.
    for start in range(0, 40, 8):
        dt = (mjd[start + 4] - mjd[start]) * 1440.0
        assert 27.0 <= dt <= 33.0 and a[start].band == a[start + 4].band
    ra, dec = np.array([v.ra for v in a]), np.array([v.dec for v in a])
    assert np.all(np.abs(dec + 25.0) <= 0.2) and np.all(np.abs((ra - 330.0) * np.cos(np.deg2rad(dec))) <= 0.2)
    assert all(v.airmass < 1.2 for v in a)
    assert 0.6 < np.median([v.seeing_fwhm for v in a]) < 1.0
    assert {v.band for v in a} <= set(BANDS)
    assert [v.visit for v in a] == sorted({v.visit for v in a})
    assert len({round(v.rot_sky_pos) for v in a}) > 20


def test_synthetic_options():
    v = synthetic_visits(6, seed=1, n_snaps=1, bands="gr", block_size=1, ra=0.05, dec=-30.0, start_mjd=60218.25)
    assert [x.band for x in v] == ["g", "g", "r", "r", "g", "g"]
    assert all(x.n_snaps == 1 and x.snap_exptime == 30.0 for x in v)
    assert [x.seq_num for x in v] == [1, 2, 3, 4, 5, 6]
    assert all(x.ra < 0.3 or x.ra > 359.7 for x in v)
    with pytest.raises(ValueError, match="unknown band"):
        synthetic_visits(3, bands=["r", "q"])
    with pytest.raises(ValueError, match="below the horizon"):
        synthetic_visits(3, ra=150.0)


@pytest.mark.skipif(not FULL_DB.is_file(), reason="the full opsim database is not in ../shared/data/opsim")
def test_full_database_nights():
    night1 = read_opsim(FULL_DB, night=1)
    assert len(night1) > 500 and night1[0].observation_id == 0
    assert len({v.day_obs for v in night1}) == 1
    later = read_opsim(FULL_DB, night=30, visits=100)
    assert len(later) == 100 and later[0].day_obs > night1[0].day_obs
    assert {v.band for v in later} <= set(BANDS)
    with pytest.raises(ValueError, match="between night 1 and night"):
        read_opsim(FULL_DB, night=400)
