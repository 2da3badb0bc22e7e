"""Pre-DRP bandpasses: physical sanity of the atmosphere model, deterministic telemetry, versioned output."""

from dataclasses import asdict

import numpy as np
import pytest

from lsstpipe.calib.bandpass import (
    BAND_EDGES_NM,
    DEFAULT_WAVELENGTHS,
    atmosphere_transmission,
    hardware_throughput,
    make_bandpasses,
    read_bandpasses,
    simulate_efd_telemetry,
)
from lsstpipe.repo import Repository, write_csv
from lsstpipe.sim import opsim

LAM = DEFAULT_WAVELENGTHS


def _visits(n=6, seed=3, start_mjd=60218.05):
    return opsim.synthetic_visits(n, seed=seed, start_mjd=start_mjd, bands="ugrizy")


def _repo(path, visits, seed=3):
    repo = Repository(path)
    repo.create({"camera": "mini", "seed": seed})
    write_csv(path / "visits.csv", (asdict(v) for v in visits), list(asdict(visits[0])))
    return repo


def test_atmosphere_is_a_transmission_that_falls_with_airmass():
    t1 = atmosphere_transmission(LAM, 1.0, 3.0, 0.05, 1.3)
    t2 = atmosphere_transmission(LAM, 2.0, 3.0, 0.05, 1.3)
    assert np.all((t1 > 0) & (t1 <= 1)) and np.all((t2 >= 0) & (t2 <= 1))
    assert np.all(t2 < t1)
    # Beer-Lambert: optical depth is proportional to airmass.
    np.testing.assert_allclose(np.log(t2[t1 > 1e-6]), 2 * np.log(t1[t1 > 1e-6]), rtol=1e-12)
    # Rayleigh + aerosols: the blue is extinguished more than the red continuum.
    at = lambda nm: t1[np.searchsorted(LAM, nm)]  # noqa: E731
    assert at(400) < at(500) < at(650) < at(870)
    # Zenith extinction in g and r near the measured Cerro Pachón values (~0.17 and ~0.10 mag/airmass).
    assert 0.12 < -2.5 * np.log10(at(480)) < 0.25 and 0.06 < -2.5 * np.log10(at(620)) < 0.16


def test_water_band_deepens_with_pwv_and_continuum_does_not_change():
    dry = atmosphere_transmission(LAM, 1.2, 1.0, 0.04, 1.3)
    wet = atmosphere_transmission(LAM, 1.2, 8.0, 0.04, 1.3)
    k = np.searchsorted(LAM, 935.0)
    assert wet[k] < dry[k] * 0.2
    cont = np.searchsorted(LAM, [550.0, 660.0, 870.0, 1040.0])
    np.testing.assert_allclose(wet[cont], dry[cont], rtol=2e-3)
    # y-band throughput drops with PWV, g does not.
    y, g = hardware_throughput(LAM, "y"), hardware_throughput(LAM, "g")
    assert (wet * y).sum() < 0.97 * (dry * y).sum()
    np.testing.assert_allclose((wet * g).sum(), (dry * g).sum(), rtol=1e-6)


def test_aerosols_act_in_the_blue():
    clear = atmosphere_transmission(LAM, 1.0, 2.0, 0.01, 1.3)
    hazy = atmosphere_transmission(LAM, 1.0, 2.0, 0.2, 1.3)
    ratio = hazy / clear
    assert np.all(ratio < 1) and ratio[np.searchsorted(LAM, 400)] < ratio[np.searchsorted(LAM, 1000)]


@pytest.mark.parametrize("band", sorted(BAND_EDGES_NM))
def test_hardware_is_a_bounded_filter_curve(band):
    h = hardware_throughput(LAM, band)
    lo, hi = BAND_EDGES_NM[band]
    assert np.all((h >= 0) & (h <= 1))
    centre = h[np.searchsorted(LAM, (lo + hi) / 2)]
    assert 0.2 < centre < 0.9
    outside = (LAM < lo - 30) | (LAM > hi + 30)
    assert h[outside].max() < 1e-3 * h.max()


def test_telemetry_is_deterministic_realistic_and_varies_night_to_night():
    visits = _visits(8) + _visits(8, start_mjd=60219.05) + _visits(8, start_mjd=60230.05)
    a = simulate_efd_telemetry(visits, seed=5)
    assert a == simulate_efd_telemetry(visits, seed=5)
    assert a != simulate_efd_telemetry(visits, seed=6)
    # A visit's telemetry does not depend on the other visits in the table.
    assert simulate_efd_telemetry(visits[9:10], seed=5)[0] == a[9]
    assert all(0.2 <= r["pwv_mm"] <= 20 and 0.002 <= r["aod_500"] <= 0.6 for r in a)
    pwv = {}
    for r in a:
        pwv.setdefault(r["day_obs"], []).append(r["pwv_mm"])
    assert len(pwv) == 3
    within = max(np.ptp(v) / np.mean(v) for v in pwv.values())
    means = [np.mean(v) for v in pwv.values()]
    assert within < 0.35 and np.ptp(means) / np.mean(means) > within
    # Across many nights the spread is that of a lognormal around 2.5 mm.
    nights = [asdict(v) | {"day_obs": 20240000 + k} for k, v in enumerate(_visits(1) * 200)]
    med = np.median([r["pwv_mm"] for r in simulate_efd_telemetry(nights, seed=1)])
    assert 1.8 < med < 3.4


def test_telemetry_rejects_bad_visits():
    v = asdict(_visits(1)[0])
    with pytest.raises(ValueError, match="band"):
        simulate_efd_telemetry([v | {"band": "w"}], seed=1)
    with pytest.raises(ValueError, match="airmass"):
        simulate_efd_telemetry([v | {"airmass": 0.5}], seed=1)
    with pytest.raises(ValueError, match="lacks"):
        simulate_efd_telemetry([{"visit": 1}], seed=1)


def test_make_bandpasses_writes_versions_and_never_overwrites(tmp_path):
    visits = _visits(6)
    repo = _repo(tmp_path / "repo", visits)
    v1 = make_bandpasses(repo, "run1")
    assert v1 == repo.root / "calib" / "bandpass" / "run1"
    lam, per_visit = read_bandpasses(v1)
    np.testing.assert_array_equal(lam, LAM)
    assert sorted(per_visit) == sorted(v.visit for v in visits)
    for v in visits:
        got = per_visit[v.visit]
        assert got["band"] == v.band and got["airmass"] == v.airmass
        assert np.all((got["total"] >= 0) & (got["total"] <= 1)) and np.all(got["total"] <= got["atmosphere"])
        expect = atmosphere_transmission(LAM, v.airmass, got["pwv_mm"], got["aod_500"], got["angstrom"])
        np.testing.assert_array_equal(got["atmosphere"], expect)
        np.testing.assert_array_equal(got["total"], expect * hardware_throughput(LAM, v.band))
    before = {p.name: p.read_bytes() for p in v1.iterdir()}
    with pytest.raises(FileExistsError, match="run1.*never overwritten"):
        make_bandpasses(repo, "run1")
    v2 = make_bandpasses(repo, "run2", wavelengths=np.arange(320.0, 1080.0, 2.0))
    assert {p.name: p.read_bytes() for p in v1.iterdir()} == before  # the old version is untouched
    assert read_bandpasses(v2)[0].size == 380
    assert sorted(p.name for p in (repo.root / "calib" / "bandpass").iterdir()) == ["run1", "run2"]
    with pytest.raises(ValueError, match="run_id"):
        make_bandpasses(repo, "../escape")
    with pytest.raises(ValueError, match="wavelengths"):
        make_bandpasses(repo, "run3", wavelengths=np.array([900.0, 500.0]))
    assert not (repo.root / "calib" / "bandpass" / "run3").exists()


def test_same_inputs_give_the_same_bytes(tmp_path):
    visits = _visits(4)
    a = make_bandpasses(_repo(tmp_path / "a", visits), "r")
    b = make_bandpasses(_repo(tmp_path / "b", visits), "r")
    for name in ("bandpasses.fits", "telemetry.csv", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_missing_repository_or_visits(tmp_path):
    with pytest.raises(FileNotFoundError, match="repo.yaml"):
        make_bandpasses(tmp_path / "nothing", "r")
    Repository(tmp_path / "empty").create({"camera": "mini", "seed": 1})
    with pytest.raises(FileNotFoundError, match="visits.csv"):
        make_bandpasses(tmp_path / "empty", "r")
