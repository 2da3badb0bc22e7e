"""Crosstalk estimation: kernel against its reference, recovery of a known matrix, pooling, file format, ISR.

The known matrices come from the simulator itself: :func:`kernels.crosstalk.apply_crosstalk` (what
``render_exposure`` applies) on synthetic stacks, and ``render_exposure`` of a mini CCD lit by bright
spots in a dark dome (a spot-projector exposure: the science frames of a small mini night hold too few
saturated stars, see the report of issue 3).
"""

import numpy as np
import pytest
from naive_xtalk import naive_fit_crosstalk

from kernels.crosstalk import apply_crosstalk
from kernels.xtalk_fit import fit_crosstalk
from lsstpipe.calib.crosstalk import (
    CrosstalkEstimate,
    CrosstalkFormatError,
    matrix_for_detector,
    measure_ccd_crosstalk,
    pool_crosstalk,
    read_crosstalk,
    write_crosstalk,
)
from lsstpipe.camera import get_camera
from lsstpipe.isr.assembly import disassemble_ccd
from lsstpipe.pipelines.isr import IsrCalibs, IsrConfig, run_isr
from lsstpipe.sim import opsim
from lsstpipe.sim.camera_daq import daq_crosstalk_correct
from lsstpipe.sim.exposure import render_exposure
from lsstpipe.sim.instrument import crosstalk_template, make_signature
from lsstpipe.sim.scene import Sources
from lsstpipe.sim.simulate import science_specs

SEED = 11


def _synthetic(n_exp, shape=(60, 40), vendor="ITL", noise=4.0, seed=0, sky=300.0):
    """Float stacks with a few saturated spots on some amplifiers, coupled by a jittered vendor matrix."""
    rng = np.random.default_rng(seed)
    truth = crosstalk_template(vendor) * (1.0 + 0.1 * rng.standard_normal((16, 16)))
    np.fill_diagonal(truth, 0.0)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    stacks = []
    for e in range(n_exp):
        sig = np.full((16, h, w), sky, np.float32)
        for a in range(e % 4, 16, 4):
            y, x = rng.uniform(8, h - 8), rng.uniform(8, w - 8)
            spot = 4e5 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 2.5**2))
            sig[a] += np.minimum(spot, 80000.0).astype(np.float32)
        obs = apply_crosstalk(sig, truth) + rng.normal(0, noise, sig.shape).astype(np.float32)
        obs.flags.writeable = False
        stacks.append(obs)
    return stacks, truth


def test_kernel_matches_reference_and_leaves_inputs_alone():
    stacks, _ = _synthetic(4)
    copies = [s.copy() for s in stacks]
    fit = fit_crosstalk(stacks, cell=(16, 16))
    coeff, err, npix = naive_fit_crosstalk(stacks, cell=(16, 16))
    np.testing.assert_array_equal(fit.npix, npix)
    np.testing.assert_allclose(fit.coeff, coeff, rtol=1e-9, atol=1e-15, equal_nan=True)
    np.testing.assert_allclose(fit.error, err, rtol=1e-6, equal_nan=True)
    assert all(np.array_equal(s, c) for s, c in zip(stacks, copies))
    assert np.all(np.isnan(np.diag(fit.coeff))) and np.all(fit.npix.diagonal() == 0)


def test_kernel_matches_reference_with_nan_and_float64():
    stacks, _ = _synthetic(3, vendor="E2V", seed=5)
    rng = np.random.default_rng(3)
    bad = []
    for s in stacks:
        s = s.astype(np.float64)
        s[rng.integers(0, 16, 200), rng.integers(0, 60, 200), rng.integers(0, 40, 200)] = np.nan
        s[7] = np.nan  # a dead amplifier
        s.flags.writeable = False
        bad.append(s)
    fit = fit_crosstalk(bad, cell=(20, 13), ceiling=70000.0)
    coeff, err, npix = naive_fit_crosstalk(bad, cell=(20, 13), ceiling=70000.0)
    np.testing.assert_array_equal(fit.npix, npix)
    np.testing.assert_allclose(fit.coeff, coeff, rtol=1e-9, atol=1e-15, equal_nan=True)
    assert np.all(np.isnan(fit.coeff[7])) and np.all(np.isnan(fit.coeff[:, 7]))
    assert np.all(fit.npix[7] == 0) and np.all(fit.npix[:, 7] == 0)


def test_kernel_without_bright_pixels_measures_nothing():
    rng = np.random.default_rng(1)
    flat = [rng.normal(500.0, 5.0, (16, 30, 20)).astype(np.float32)]
    fit = fit_crosstalk(flat)
    assert np.all(np.isnan(fit.coeff)) and np.all(np.isinf(fit.error)) and not fit.npix.any()


@pytest.mark.parametrize("shape, cell", [((16, 3, 3), (32, 32)), ((2, 9, 7), (1, 1)), ((5, 40, 1), (4, 3))])
def test_kernel_edge_shapes_match_reference(shape, cell):
    rng = np.random.default_rng(sum(shape))
    stacks = []
    for _ in range(2):
        s = rng.normal(100.0, 3.0, shape)
        s[rng.integers(0, shape[0], 6), rng.integers(0, shape[1], 6), rng.integers(0, shape[2], 6)] = 5e4
        s[0, 0, 0] = np.inf  # an infinite pixel is bright but beyond any ceiling
        s.flags.writeable = False
        stacks.append(s)
    fit = fit_crosstalk(stacks, cell=cell, ceiling=1e6)
    coeff, err, npix = naive_fit_crosstalk(stacks, cell=cell, ceiling=1e6)
    np.testing.assert_array_equal(fit.npix, npix)
    np.testing.assert_allclose(fit.coeff, coeff, rtol=1e-9, atol=1e-15, equal_nan=True)
    all_nan = [np.full(shape, np.nan)]
    assert not fit_crosstalk(all_nan, cell=cell).npix.any()


@pytest.mark.parametrize(
    "stacks, kwargs, match",
    [
        ([], {}, "no segment stacks"),
        ([np.zeros((16, 5, 5), np.int32)], {}, "float"),
        ([np.zeros((16, 5, 5), np.float32), np.zeros((16, 5, 6), np.float32)], {}, "same shape"),
        ([np.zeros((16, 5, 5), np.float32)], {"bright": -1.0}, "bright"),
        ([np.zeros((16, 5, 5), np.float32)], {"ceiling": 10.0}, "ceiling"),
        ([np.zeros((16, 5, 5), np.float32)], {"cell": (0, 4)}, "cells"),
        ([np.zeros((16, 5, 5), np.float32)], {"quiet": 0.0}, "quiet"),
        ([np.zeros((16, 5, 5), np.float32)], {"niter": 0}, "niter"),
    ],
)
def test_kernel_rejects_bad_input(stacks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_crosstalk(stacks, **kwargs)


@pytest.mark.parametrize("vendor", ["ITL", "E2V"])
def test_known_matrix_recovered_within_ten_percent(vendor):
    stacks, truth = _synthetic(16, shape=(120, 64), vendor=vendor, seed=2)
    fit = fit_crosstalk(stacks)
    big = np.abs(truth) > 1e-4
    rel = fit.coeff[big] / truth[big] - 1
    assert np.abs(rel).max() < 0.10, rel
    # The errors are honest: the deviations are of their size.
    pull = (fit.coeff[big] - truth[big]) / fit.error[big]
    assert 0.65 < np.std(pull) < 1.4  # 0.94-0.95 here; ±0.13 is the spread of a width from 28 pulls


def _spot_exposures(camera, det, n_exp, seed=SEED):
    """Raw segments of ``det`` lit by one saturating spot on every fourth amplifier (dark dome, no sky)."""
    sig = make_signature(camera, det, seed)
    visits = opsim.synthetic_visits(n_exp, seed=seed, n_snaps=1, bands="r")
    specs = [s for v in visits for s in science_specs(v, seed)]
    amps = sorted(det.amps, key=lambda a: a.hdu)
    raws = []
    for k, spec in enumerate(specs):
        rng = np.random.default_rng(1000 + k)
        lit = amps[k % 4 :: 4]
        xs = np.array([rng.uniform(a.bbox[2] + 10, a.bbox[3] - 10) for a in lit])
        ys = np.array([rng.uniform(a.bbox[0] + 40, a.bbox[1] - 40) for a in lit])
        z = np.zeros(len(lit))
        src = Sources(id=np.arange(len(lit)), kind=np.array(["star"] * len(lit)), ra=z, dec=z, x=xs, y=ys,
                      x_end=xs, y_end=ys, mag=z + 10.0, flux_e=np.full(len(lit), 1e7), fwhm=np.full(len(lit), 4.0),
                      e1=z, e2=z)  # fmt: skip
        raw = render_exposure(camera, sig, spec, src, 0.0, seed).segments
        raw.flags.writeable = False
        raws.append(raw)
    return sig, raws


@pytest.fixture(scope="module")
def mini_spots():
    camera = get_camera("mini")
    return {name: _spot_exposures(camera, camera[name], 8) for name in ("R10_S00", "R11_S00")}


@pytest.mark.parametrize("name", ["R10_S00", "R11_S00"])
def test_simulated_spot_exposures_recover_the_truth(mini_spots, name):
    camera = get_camera("mini")
    sig, raws = mini_spots[name]
    est = measure_ccd_crosstalk(list(raws), camera[name])
    big = np.abs(sig.crosstalk) > 1e-4
    assert np.all(est.weights[big] > 0)
    rel = est.coeffs[big] / sig.crosstalk[big] - 1
    assert np.abs(rel).max() < 0.10, rel
    small = ~big & ~np.eye(16, dtype=bool)
    assert np.abs(est.coeffs[small] - sig.crosstalk[small]).max() < 1e-4
    assert est.n_sources >= 16 and np.all(np.diag(est.coeffs) == 0) and np.all(np.diag(est.weights) == 0)


def test_measure_accepts_overscan_corrected_segments(mini_spots):
    camera = get_camera("mini")
    det = camera["R10_S00"]
    sig, raws = mini_spots["R10_S00"]
    from lsstpipe.calib.crosstalk import _data_region

    corrected = [_data_region(r, det, False) for r in raws]
    a = measure_ccd_crosstalk(list(raws), det)
    b = measure_ccd_crosstalk(corrected, det, overscan_corrected=True)
    np.testing.assert_array_equal(a.coeffs, b.coeffs)
    with pytest.raises(ValueError, match="overscan_corrected=True"):
        measure_ccd_crosstalk(corrected, det)
    with pytest.raises(ValueError, match="must be float"):
        measure_ccd_crosstalk(list(raws), det, overscan_corrected=True)
    with pytest.raises(ValueError, match="no exposures"):
        measure_ccd_crosstalk([], det)


def _estimate(rng, vendor):
    truth = crosstalk_template(vendor)
    w = np.where(np.eye(16, dtype=bool), 0.0, rng.uniform(1e8, 1e10, (16, 16)))
    c = np.where(w > 0, truth + rng.normal(0, 1.0, (16, 16)) / np.sqrt(np.where(w > 0, w, 1.0)), 0.0)
    return CrosstalkEstimate(coeffs=c, weights=w, n_sources=int(rng.integers(1, 50)))


def test_pool_is_the_weighted_mean_and_independent_of_order():
    rng = np.random.default_rng(4)
    ests = [("ITL", _estimate(rng, "ITL")) for _ in range(5)] + [("E2V", _estimate(rng, "E2V")) for _ in range(3)]
    pooled = pool_crosstalk(None, ests)
    assert sorted(pooled) == ["E2V", "ITL"]
    for vendor in pooled:
        w = np.array([e.weights for v, e in ests if v == vendor])
        c = np.array([e.coeffs for v, e in ests if v == vendor])
        np.testing.assert_allclose(pooled[vendor], (w * c).sum(0) / np.where(w.sum(0) > 0, w.sum(0), 1), rtol=1e-12)
    for perm in (ests[::-1], ests[3:] + ests[:3]):
        again = pool_crosstalk(None, perm)
        assert all(again[v].tobytes() == pooled[v].tobytes() for v in pooled)


def test_pool_leaves_unmeasured_pairs_at_zero_and_rejects_bad_input():
    c = np.zeros((16, 16))
    c[0, 1] = 3e-4
    w = np.zeros((16, 16))
    w[0, 1] = 1.0
    pooled = pool_crosstalk(None, [("ITL", CrosstalkEstimate(c, w, 1))])
    assert pooled["ITL"][0, 1] == 3e-4 and np.count_nonzero(pooled["ITL"]) == 1
    with pytest.raises(ValueError, match="vendor"):
        pool_crosstalk(None, [("", CrosstalkEstimate(c, w, 1))])
    with pytest.raises(ValueError, match="CrosstalkEstimate"):
        pool_crosstalk(None, [("ITL", c)])
    with pytest.raises(ValueError, match="NaN"):
        CrosstalkEstimate(c * np.nan, w, 1)
    with pytest.raises(ValueError, match="float64 16×16"):
        CrosstalkEstimate(c[:8], w, 1)


def test_file_round_trip_is_deterministic(tmp_path):
    rng = np.random.default_rng(8)
    m = {"ITL": pool_crosstalk(None, [("ITL", _estimate(rng, "ITL"))])["ITL"], "E2V": -crosstalk_template("E2V")}
    prov = {"software": "lsstpipe 0.1.0", "inputs": ["a.fits", "b.fits"], "bright_adu": 20000.0}
    write_crosstalk(tmp_path / "a.fits", m, prov)
    write_crosstalk(tmp_path / "b.fits", dict(reversed(m.items())), dict(reversed(prov.items())))
    assert (tmp_path / "a.fits").read_bytes() == (tmp_path / "b.fits").read_bytes()
    back, prov_back = read_crosstalk(tmp_path / "a.fits")
    assert prov_back == prov and sorted(back) == ["E2V", "ITL"]
    assert all(back[v].tobytes() == np.asarray(m[v], np.float64).tobytes() for v in m)
    with pytest.raises(FileExistsError, match="already exists"):
        write_crosstalk(tmp_path / "a.fits", m, prov)
    with pytest.raises(ValueError, match="diagonal"):
        write_crosstalk(tmp_path / "c.fits", {"ITL": np.eye(16)}, prov)
    with pytest.raises(ValueError, match="JSON"):
        write_crosstalk(tmp_path / "c.fits", m, {"when": object()})


def test_corrupt_or_foreign_files_are_rejected(tmp_path):
    with pytest.raises(CrosstalkFormatError, match="does not exist"):
        read_crosstalk(tmp_path / "missing.fits")
    write_crosstalk(tmp_path / "x.fits", {"ITL": crosstalk_template("ITL")}, {})
    data = bytearray((tmp_path / "x.fits").read_bytes())
    data[2880 * 2 + 100] ^= 0xFF  # a byte of the ITL matrix (after the primary and ITL headers)
    (tmp_path / "y.fits").write_bytes(bytes(data))
    with pytest.raises(CrosstalkFormatError, match="y.fits"):
        read_crosstalk(tmp_path / "y.fits")
    (tmp_path / "z.fits").write_bytes(b"not fits at all" * 300)
    with pytest.raises(CrosstalkFormatError):
        read_crosstalk(tmp_path / "z.fits")


def test_isr_and_daq_apply_the_file(tmp_path, mini_spots):
    """The matrix read back from the file drives our ISR (source × victim orientation) and the DAQ."""
    camera = get_camera("mini")
    det = camera["R10_S00"]
    sig, raws = mini_spots["R10_S00"]
    est = measure_ccd_crosstalk(list(raws), det)
    write_crosstalk(tmp_path / "xt.fits", pool_crosstalk(None, [("ITL", est)]), {"detectors": [det.name]})
    matrix = matrix_for_detector(read_crosstalk(tmp_path / "xt.fits")[0], det)
    meta = {"exptime": 15.0, "dark_time": 15.0, "band": "r"}
    cfg = IsrConfig(crosstalk_tolerance=0.0)
    with_xt = run_isr(raws[0], det, IsrCalibs(crosstalk=matrix), meta, cfg).image
    without = run_isr(raws[0], det, IsrCalibs(), meta, cfg).image
    gains = np.array([a.gain for a in sorted(det.amps, key=lambda a: a.hdu)])
    rows, cols = det.amps[0].raw_data
    removed = disassemble_ccd(with_xt - without, det)[:, rows, cols] / gains[:, None, None]
    before = disassemble_ccd(without, det)[:, rows, cols] / gains[:, None, None]
    src = 0  # amplifier 0 is lit in exposure 0
    bright = before[src] > 20000
    for j in (1, 2, 8):
        np.testing.assert_allclose(removed[j][bright], -matrix[src, j] * before[src][bright], rtol=0.02, atol=0.05)
    # After the ISR's correction, the crosstalk left is below 10 % of the truth.
    resid = fit_crosstalk([disassemble_ccd(with_xt, det)[:, rows, cols] / gains[:, None, None]], niter=3)
    big = np.abs(sig.crosstalk[src]) > 1e-4
    assert np.all(np.abs(resid.coeff[src][big]) < 0.1 * np.abs(sig.crosstalk[src][big]))
    daq = daq_crosstalk_correct(np.asarray(raws[0]), det, matrix)
    assert daq.shape == raws[0].shape and daq.dtype == np.int32
    with pytest.raises(KeyError, match="E2V"):
        matrix_for_detector({"ITL": matrix}, camera["R11_S00"])


def test_pooled_vendor_matrix_matches_the_mean_truth_of_its_ccds(mini_spots):
    """The simulator jitters each CCD's matrix by 10 % around its vendor template; the pooled vendor
    matrix is compared with the mean of the truth matrices of that vendor's CCDs."""
    camera = get_camera("mini")
    estimates, truths = [], {}
    for name in ("R10_S00", "R10_S11", "R10_S22", "R11_S00", "R11_S11", "R11_S22"):
        det = camera[name]
        sig, raws = mini_spots[name] if name in mini_spots else _spot_exposures(camera, det, 8)
        estimates.append((det.vendor.name, measure_ccd_crosstalk(list(raws), det)))
        truths.setdefault(det.vendor.name, []).append(sig.crosstalk)
    pooled = pool_crosstalk(None, estimates[::-1])
    for vendor, mats in truths.items():
        mean = np.mean(mats, axis=0)
        big = np.abs(mean) > 1e-4
        assert np.abs(pooled[vendor][big] / mean[big] - 1).max() < 0.10
        assert np.sign(pooled[vendor][big]).tolist() == np.sign(mean[big]).tolist()
