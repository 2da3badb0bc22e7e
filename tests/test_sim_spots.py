"""Crosstalk spot exposures of ``lsstpipe simulate --calibs``: which amplifiers are lit, determinism, the
saturated spots in the pixels where the truth puts them, and the crosstalk matrix recovered from them."""

import numpy as np
import pytest
from astropy.io import fits

from kernels.render import bleed_saturation
from lsstpipe.calib.crosstalk import measure_ccd_crosstalk
from lsstpipe.camera import get_camera
from lsstpipe.io import read_raw
from lsstpipe.isr import assemble_ccd
from lsstpipe.repo import Repository, read_csv, sha256_file
from lsstpipe.sim import opsim, spots
from lsstpipe.sim.scene import Sources, render_sources
from lsstpipe.sim.simulate import SimulationRequest, calibration_specs, run_simulation

DETS = ("R10_S01", "R11_S10")  # one ITL, one e2v
SEED = 5


def _simulate(path, **kw):
    req = dict(repo=str(path), camera="mini", detectors=DETS, n_visits=1, n_snaps=1, calibs=True, bands="r",
               progress=False, seed=SEED, templates=False, cds=False)  # fmt: skip
    req.update(kw)
    return run_simulation(SimulationRequest(**req))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("spots")
    _simulate(path)
    return Repository(path)


def _spot_truth(repo, exp, name):
    return read_csv(repo.truth_dir(exp["day_obs"], exp["obsid"]) / f"{exp['obsid']}_{name}_spots.csv")


def _raw(repo, exp, name):
    return read_raw(repo.raw_path(exp["day_obs"], exp["obsid"], name))


# ---------------------------------------------------------------------------------------------------
# The patterns and the exposure list
# ---------------------------------------------------------------------------------------------------


def test_patterns_light_every_fourth_amplifier_each_in_two_exposures():
    patterns = [spots.lit_amplifiers(k) for k in range(spots.N_SPOT_EXPOSURES)]
    assert patterns[:4] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert all(len(p) == 4 for p in patterns)
    assert len({tuple(p) for p in patterns}) == len(patterns)  # a different subset in each exposure
    counts = np.bincount(np.concatenate(patterns), minlength=16)
    assert counts.tolist() == [2] * 16
    all16 = [spots.lit_amplifiers(k) for k in range(16)]
    assert len({tuple(p) for p in all16}) == 16
    assert np.bincount(np.concatenate(all16), minlength=16).tolist() == [4] * 16
    for p in all16:
        assert sorted(p) == p and all(b - a > 1 for a, b in zip(p, p[1:]))  # never two neighbours at once
    with pytest.raises(ValueError, match="not an integer"):
        spots.lit_amplifiers(-1)


@pytest.mark.parametrize("bad", [-4, 3, 6, 2.0, True, "8"])
def test_bad_spot_counts_are_rejected_before_anything_is_written(tmp_path, bad):
    with pytest.raises(ValueError, match="spot exposures"):
        spots.check_spot_count(bad)
    with pytest.raises(ValueError, match="spot exposures"):
        _simulate(tmp_path / "bad", n_spot=bad)
    assert not (tmp_path / "bad").exists()


def test_calibration_specs_end_with_the_spot_exposures():
    visits = opsim.synthetic_visits(2, seed=1, bands="gr")
    plain = calibration_specs(visits, n_spot=0)
    specs = calibration_specs(visits)
    assert [s for s in specs if s.imgtype != "SPOT"] == plain  # biases, darks and flats unchanged
    spot = specs[len(plain) :]
    assert len(spot) == spots.N_SPOT_EXPOSURES and {s.imgtype for s in spot} == {"SPOT"}
    assert [s.spot_pattern for s in spot] == list(range(spots.N_SPOT_EXPOSURES))
    assert all(s.band == "NONE" and s.exptime == spots.SPOT_EXPTIME for s in spot)
    assert [s.seq_num for s in spot] == list(range(plain[-1].seq_num + 1, plain[-1].seq_num + 1 + len(spot)))
    assert all(a.mjd < b.mjd for a, b in zip(specs, specs[1:])) and specs[-1].mjd < visits[0].mjd
    assert len({s.obsid for s in specs}) == len(specs)


def test_spot_positions_are_drawn_from_the_seed_inside_their_amplifier():
    det = get_camera("mini")["R11_S10"]
    a = spots.spot_sources(det, "MC_C_20230930_050021", 5, seed=1, camera_name="mini")
    b = spots.spot_sources(det, "MC_C_20230930_050021", 5, seed=1, camera_name="mini")
    c = spots.spot_sources(det, "MC_C_20230930_050021", 5, seed=2, camera_name="mini")
    d = spots.spot_sources(det, "MC_C_20230930_050022", 5, seed=1, camera_name="mini")
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert np.all(a.x != c.x) and np.all(a.x != d.x)
    amps = {amp.hdu: amp for amp in det.amps}
    assert a.id.tolist() == [i + 1 for i in spots.lit_amplifiers(5)]
    mx, my = spots.SPOT_MARGIN_PIX
    for hdu, x, y in zip(a.id, a.x, a.y):
        y0, y1, x0, x1 = amps[hdu].bbox
        assert x0 + mx <= x <= x1 - 1 - mx and y0 + my <= y <= y1 - 1 - my
    assert np.all(a.flux_e == spots.SPOT_FLUX_E) and np.all(a.fwhm == spots.SPOT_FWHM_PIX)
    assert np.all(spots.spot_peak_e(a.flux_e, a.fwhm) > 2 * det.vendor.full_well_e)


# ---------------------------------------------------------------------------------------------------
# The simulated repository
# ---------------------------------------------------------------------------------------------------


def test_spot_exposures_exist_for_every_ccd(repo):
    exps = repo.exposures("SPOT")
    assert len(exps) == spots.N_SPOT_EXPOSURES
    assert {e["imgtype"] for e in repo.exposures()} == {"OBJECT", "BIAS", "DARK", "FLAT", "SPOT"}
    raws = {(r["obsid"], r["detector"]) for r in repo.raws()}
    for e in exps:
        assert e["exptime"] == spots.SPOT_EXPTIME and e["band"] == "NONE" and e["visit"] is None
        for name in DETS:
            assert (e["obsid"], name) in raws
            raw = _raw(repo, e, name)
            assert raw.header["IMGTYPE"] == "SPOT" and raw.header["EXPTIME"] == spots.SPOT_EXPTIME
            truth = _spot_truth(repo, e, name)
            assert len(truth) == 4 and all(t["saturated"] for t in truth)


def _saturated_in_column(det, t):
    """(pixels above full well, saturated pixels after bleeding) in the spot's column, noiseless."""
    one = np.ones(1)
    src = Sources(id=one.astype(np.int64), kind=np.array(["spot"], object), ra=one, dec=one, x=one * t["x"],
                  y=one * t["y"], x_end=one * t["x"], y_end=one * t["y"], mag=one, flux_e=one * t["flux_e"],
                  fwhm=one * t["fwhm_pix"], e1=0 * one, e2=0 * one)  # fmt: skip
    model = np.zeros(det.shape, np.float32)
    render_sources(model, src)
    x = int(round(t["x"]))
    core = int((model[:, x] > t["full_well_e"]).sum())
    bleed_saturation(model, t["full_well_e"])
    return core, int((model[:, x] >= t["full_well_e"]).sum())


def test_every_amplifier_is_a_saturated_source_in_two_exposures_where_the_truth_says(repo):
    """From the pixels: each lit amplifier holds a saturated spot at the truth position, with the bleed
    trail that the truth's spot predicts along its column (longer than the saturated core); unlit
    amplifiers hold no saturated pixel and no sky (bias level)."""
    cam = get_camera("mini")
    for name in DETS:
        det = cam[name]
        amps = sorted(det.amps, key=lambda a: a.hdu)
        sat = np.array([a.saturation for a in amps])
        rows, cols = amps[0].raw_data
        lit_count = np.zeros(16, int)
        for e in repo.exposures("SPOT"):
            raw = _raw(repo, e, name)
            data = raw.stack()[:, rows, cols]
            saturated = (data >= sat[:, None, None]).sum(axis=(1, 2))
            truth = _spot_truth(repo, e, name)
            lit = sorted(t["hdu"] - 1 for t in truth)
            assert np.nonzero(saturated)[0].tolist() == lit, (e["obsid"], name)
            lit_count[lit] += 1
            unlit = [i for i in range(16) if i not in lit]
            med = np.median(data[unlit], axis=(1, 2))
            bias = np.array([amps[i].bias_level for i in unlit])
            assert np.all(np.abs(med - bias) < 10), (med, bias)
            image = assemble_ccd(raw)
            for t in truth:
                x, y = int(round(t["x"])), int(round(t["y"]))
                a = amps[t["hdu"] - 1]
                assert a.name == t["amp"]
                column = image[a.bbox[0] : a.bbox[1], x] >= a.saturation
                assert column[y - a.bbox[0]]
                run = np.flatnonzero(column)
                assert np.all(np.diff(run) == 1)  # one saturated run through the spot centre
                core, bled = _saturated_in_column(det, t)
                assert bled > core and abs(run.size - bled) <= 2, (run.size, core, bled)
        assert lit_count.tolist() == [spots.N_SPOT_EXPOSURES // 4] * 16


def test_spot_exposures_are_deterministic_for_a_seed(repo, tmp_path):
    """The same seed gives byte-identical spot raws and truth, whatever other detectors are simulated and
    however many spot exposures are asked for (here 4: every amplifier lit once)."""
    again = Repository(tmp_path / "again")
    _simulate(again.root, detectors=DETS[1:], n_spot=4)
    exps = again.exposures("SPOT")
    assert [e["obsid"] for e in exps] == [e["obsid"] for e in repo.exposures("SPOT")[:4]]
    for e in exps:
        a = repo.truth_dir(e["day_obs"], e["obsid"]) / f"{e['obsid']}_{DETS[1]}_spots.csv"
        b = again.truth_dir(e["day_obs"], e["obsid"]) / f"{e['obsid']}_{DETS[1]}_spots.csv"
        assert a.read_bytes() == b.read_bytes()
        pa, pb = (r.raw_path(e["day_obs"], e["obsid"], DETS[1]) for r in (repo, again))
        assert sha256_file(pa) == sha256_file(pb)
    lit = sorted(t["hdu"] - 1 for e in exps for t in _spot_truth(again, e, DETS[1]))
    assert lit == list(range(16))
    positions = {(t["x"], t["y"]) for e in repo.exposures("SPOT") for t in _spot_truth(repo, e, DETS[0])}
    assert len(positions) == 4 * spots.N_SPOT_EXPOSURES  # every spot somewhere else


@pytest.mark.parametrize("name", DETS)
def test_crosstalk_measured_on_the_spot_exposures_recovers_the_truth(repo, name):
    det = get_camera("mini")[name]
    raws = [_raw(repo, e, name) for e in repo.exposures("SPOT")]
    with fits.open(repo.instrument_truth_path(name)) as h:
        truth = h["CROSSTALK"].data.astype(np.float64)
    est = measure_ccd_crosstalk(raws, det)
    big = np.abs(truth) > 1e-4
    assert big.sum() >= 16
    assert np.all(est.weights[big] > 0)
    rel = est.coeffs[big] / truth[big] - 1
    assert np.abs(rel).max() < 0.10, rel
    assert est.n_sources >= 2 * 16


def test_without_calibs_there_are_no_spot_exposures(tmp_path):
    repo = Repository(tmp_path / "nocal")
    _simulate(repo.root, calibs=False, detectors=DETS[:1])
    assert repo.exposures("SPOT") == [] and {e["imgtype"] for e in repo.exposures()} == {"OBJECT"}
    assert not list((repo.root / "truth").rglob("*_spots.csv"))
