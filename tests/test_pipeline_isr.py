"""ISR and snap combination against the simulator's truth, on mini-camera exposures rendered in memory.

The exposures come from the simulator's own functions (the same scene rendered with and without noise),
the master calibrations from its instrument truth written as ``lsstpipe simulate`` writes it and read
back by :func:`isr_from_truth`. The expected image is the simulator's noiseless electrons with a unit
flat and no dark: ``signal + sky * (1 + fringe_amp * fringe)``.
"""

import dataclasses

import numpy as np
import pytest

from kernels.overscan import overscan_levels
from kernels.render import compose_exposure
from lsstpipe.camera import get_camera
from lsstpipe.pipelines.exposure import Exposure, MaskBit
from lsstpipe.pipelines.isr import IsrCalibs, IsrConfig, combine_snaps, isr_from_truth, run_isr
from lsstpipe.repo import Repository
from lsstpipe.sim import scene
from lsstpipe.sim import sky as skymod
from lsstpipe.sim.exposure import SKY_GRID_STEP, render_exposure, sky_grid
from lsstpipe.sim.instrument import make_signature
from lsstpipe.sim.simulate import SimulationRequest, default_sky, exposure_scene, science_specs, visits_for
from lsstpipe.sim.solar_system import Ephemerides, make_ssos
from lsstpipe.sim.truth import write_instrument_truth

SEED = 3


def _simulate(tmp, name):
    """Both snaps of one z-band visit of one detector: noisy raw, noiseless raw, expected electrons, truth."""
    camera = get_camera("mini")
    det = camera[name]
    request = SimulationRequest(repo=str(tmp), detectors=(name,), n_visits=1, bands="z", seed=SEED, progress=False)
    visits = visits_for(request)
    cfg = default_sky(camera)
    radius = camera.field_radius_deg + 0.05
    cells = sorted({c for v in visits for c in skymod.cells_around(v.ra, v.dec, radius, cfg)})
    stars = skymod.stars_in_cells(cells, SEED, cfg)
    transients = skymod.transients_in_cells(cells, SEED, cfg, (visits[0].mjd, visits[0].mjd))
    specs = science_specs(visits[0], SEED)
    ephem = Ephemerides(
        make_ssos(visits, camera, cfg, SEED), [t for s in specs for t in (s.mjd, s.mjd + s.exptime / 86400.0)]
    )
    sig = make_signature(camera, det, SEED)
    repo = Repository(tmp)
    write_instrument_truth(repo.instrument_truth_path(name), sig, ["z"])
    # The bright star goes on the amplifier whose saturation lies furthest below full well: the simulator
    # clips charge at the vendor's full well, while each amplifier's saturation (ADU) is drawn around it.
    amp = min(det.amps, key=lambda a: a.saturation - _full_well_adu(det, a))
    star_x = (amp.bbox[2] + amp.bbox[3]) / 2 + 0.3
    star_y = (amp.bbox[0] + amp.bbox[1]) / 2 + 0.7
    snaps = []
    for spec in specs:
        sources, _, _ = exposure_scene(camera, det, spec, stars, transients, ephem)
        # One star bright enough to saturate and bleed.
        bright = dataclasses.replace(
            sources,
            **{f: getattr(sources, f)[:1] for f in ("id", "kind", "ra", "dec", "mag", "fwhm", "e1", "e2")},
            x=np.array([star_x]),
            y=np.array([star_y]),  # fmt: skip
            x_end=np.array([star_x]),
            y_end=np.array([star_y]),
            flux_e=np.array([4e7]),
        )
        sources = scene.Sources.concat([sources, bright])
        rate = skymod.sky_electrons_per_pixel(spec.sky_mag, spec.band, camera.pixel_scale_arcsec)
        noisy = render_exposure(camera, sig, spec, sources, rate, SEED, noise=True)
        clean = render_exposure(camera, sig, spec, sources, rate, SEED, noise=False)
        signal = np.zeros(det.shape, np.float32)
        scene.render_sources(signal, sources)
        grid = sky_grid(camera, det, spec, rate)
        ones = np.ones(det.shape, np.float32)
        expected = compose_exposure(signal, ones, ones * 0, grid, SKY_GRID_STEP, spec.exptime, 0.0, fringe=sig.fringe,
                                    fringe_amp=spec.fringe_amp, noise=False)  # fmt: skip
        meta = {"exptime": spec.exptime, "dark_time": spec.dark_time, "band": spec.band}
        snaps.append({"noisy": noisy, "clean": clean, "expected": expected, "meta": meta, "spec": spec,
                      "sky": rate * spec.exptime})  # fmt: skip
    return det, sig, snaps


def _full_well_adu(det, amp):
    return amp.bias_level + det.vendor.full_well_e / amp.gain


@pytest.fixture(scope="module", params=["R10_S11", "R11_S12"])
def sim(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    det, sig, snaps = _simulate(tmp, request.param)
    det2, calibs = isr_from_truth(tmp, request.param, "z", camera="mini")
    assert det2 == det
    return det, sig, snaps, calibs


def test_calibs_from_truth(sim):
    det, sig, _, calibs = sim
    np.testing.assert_array_equal(calibs.flat, sig.flat("z"))
    np.testing.assert_array_equal(calibs.dark, sig.dark_rate)
    np.testing.assert_allclose(calibs.crosstalk, sig.crosstalk)
    assert calibs.bias.shape == det.shape and calibs.bias.dtype == np.float32
    assert len(calibs.defects) == len(sig.bad_columns)


def _unsaturated(det, exp, calibs, margin=2):
    """Pixels well below full well (the expectation knows nothing of saturation and bleeding)."""
    from scipy import ndimage

    high = exp.image * calibs.flat >= 0.5 * det.vendor.full_well_e
    return (exp.mask == 0) & ~ndimage.binary_dilation(high, iterations=margin)


def test_noiseless_isr_recovers_the_signal(sim):
    """ISR of the noiseless raw equals signal + sky (with its fringes) to < 0.1 %.

    Per pixel the raw is rounded to whole ADU, which alone is up to half a gain (~0.8 e-, 0.06 % of this
    sky) divided by the flat; 8×8-pixel sums average that away and must agree to 0.1 % everywhere.
    """
    det, _, snaps, calibs = sim
    s = snaps[0]
    exp = run_isr(s["clean"].segments, det, dataclasses.replace(calibs, fringe=None), s["meta"])
    good = _unsaturated(det, exp, calibs)
    assert good.mean() > 0.97
    diff = exp.image - s["expected"]
    gains = np.empty(det.shape, np.float32)
    for a in det.amps:
        gains[a.data_slices] = a.gain
    quant = 0.5 * gains / calibs.flat
    assert np.all(np.abs(diff[good]) <= 1e-3 * s["expected"][good] + quant[good])
    rel = diff[good] / s["expected"][good]
    assert np.median(np.abs(rel)) < 5e-4 and abs(np.mean(rel)) < 1e-4
    ny, nx = det.shape
    blk = (ny // 8 * 8, nx // 8 * 8)

    def sums(a):
        return a[: blk[0], : blk[1]].reshape(blk[0] // 8, 8, blk[1] // 8, 8).sum(axis=(1, 3))

    full = sums(good.astype(float)) == 64
    brel = (sums(np.where(good, diff, 0)) / sums(np.where(good, s["expected"], 1)))[full]
    assert full.mean() > 0.8
    assert np.abs(brel).max() < 1e-3, np.abs(brel).max()


def test_fringe_fit_and_subtraction(sim):
    det, sig, snaps, calibs = sim
    s = snaps[0]
    exp = run_isr(s["clean"].segments, det, calibs, s["meta"])
    want = s["spec"].fringe_amp * np.median(s["expected"])  # the local sky (the gradient moves it off the nominal)
    assert abs(exp.metadata["fringe_amplitude"] / want - 1) < 0.03
    resid = (exp.image - (s["expected"] - want * sig.fringe))[_unsaturated(det, exp, calibs)]
    assert np.std(resid) < 0.01 * s["sky"]


def test_noisy_isr_statistics(sim):
    """Sky pixels: ISR minus the noiseless expectation has mean ≈ 0 (5σ/√N) and rms = √variance within 5 %."""
    det, _, snaps, calibs = sim
    for s in snaps:
        exp = run_isr(s["noisy"].segments, det, dataclasses.replace(calibs, fringe=None), s["meta"])
        assert isinstance(exp, Exposure)
        sky = _unsaturated(det, exp, calibs) & (s["expected"] < 1.05 * np.median(s["expected"]))
        # Stay away from cosmic rays (their charge is not in the expectation).
        for k in range(len(s["noisy"].cosmics.get("x0", []))):
            c = s["noisy"].cosmics
            for t in np.linspace(0, 1, 50):
                x = int(c["x0"][k] + t * (c["x1"][k] - c["x0"][k]) + 0.5)
                y = int(c["y0"][k] + t * (c["y1"][k] - c["y0"][k]) + 0.5)
                sky[max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3] = False
        d = (exp.image - s["expected"])[sky].astype(np.float64)
        var = exp.variance[sky].astype(np.float64)
        assert sky.sum() > 0.5 * sky.size
        # The mean of the difference itself: d / sqrt(variance) is biased by -σ/2μ (~0.014 here), since the
        # variance plane is estimated from the noisy pixel.
        assert abs(d.mean()) < 5 * np.sqrt(var.mean() / d.size), (d.mean(), np.sqrt(var.mean() / d.size))
        z = d / np.sqrt(var)
        assert abs(z.std() - 1) < 0.05, z.std()


def test_saturated_and_bad_pixels_are_masked(sim):
    """Pixels at full well are SAT on amplifiers that saturate below it; bad columns are BAD."""
    det, sig, snaps, calibs = sim
    s = snaps[0]
    exp = run_isr(s["noisy"].segments, det, calibs, s["meta"])
    clean = run_isr(s["clean"].segments, det, calibs, s["meta"])
    at_full_well = clean.image * calibs.flat >= 0.999 * det.vendor.full_well_e
    checked = 0
    for amp in det.amps:
        if amp.saturation < _full_well_adu(det, amp) - 30:  # bias structure, crosstalk, read noise
            sl = amp.data_slices
            assert np.all(exp.mask[sl][at_full_well[sl]] & MaskBit.SAT)
            checked += int(at_full_well[sl].sum())
    assert checked >= 0.5 * s["noisy"].n_saturated > 0
    for d in sig.bad_columns:
        assert np.all(exp.mask[d["y0"] : d["y1"], d["x"]] & MaskBit.BAD)
    assert not np.any(exp.mask & MaskBit.NO_DATA)


def test_snap_combination_finds_truth_cosmic_rays(sim):
    det, _, snaps, calibs = sim
    no_fringe = dataclasses.replace(calibs, fringe=None)  # so that the expectation (with fringes) applies
    exps = [run_isr(s["noisy"].segments, det, no_fringe, s["meta"]) for s in snaps]
    visit = combine_snaps(*exps)
    assert visit.metadata["exptime"] == pytest.approx(2 * snaps[0]["meta"]["exptime"])
    cr = (visit.mask & MaskBit.CR) != 0
    found = total = 0
    for s in snaps:
        c = s["noisy"].cosmics
        for k in range(len(c["x0"])):
            xs = np.linspace(c["x0"][k], c["x1"][k], 20)
            ys = np.linspace(c["y0"][k], c["y1"][k], 20)
            inside = (xs >= 0) & (xs <= det.shape[1] - 1) & (ys >= 0) & (ys <= det.shape[0] - 1)
            if not inside.any():
                continue
            total += 1
            px = np.floor(xs[inside] + 0.5).astype(int).clip(0, det.shape[1] - 1)
            py = np.floor(ys[inside] + 0.5).astype(int).clip(0, det.shape[0] - 1)
            found += bool(cr[py, px].any())
    assert total >= 3
    assert found >= 0.95 * total, (found, total)
    # Few false positives: flagged pixels far from every ray (stars are in both snaps).
    near = np.zeros(det.shape, bool)
    for s in snaps:
        c = s["noisy"].cosmics
        for k in range(len(c["x0"])):
            for t in np.linspace(0, 1, 60):
                x = int(c["x0"][k] + t * (c["x1"][k] - c["x0"][k]) + 0.5)
                y = int(c["y0"][k] + t * (c["y1"][k] - c["y0"][k]) + 0.5)
                near[max(y - 3, 0) : y + 4, max(x - 3, 0) : x + 4] = True
    false_pix = cr & ~near
    assert false_pix.sum() <= 50, false_pix.sum()
    # Repaired: the combined image has no ray charge left (ray pixels ≈ expectation × 2).
    expect = snaps[0]["expected"] + snaps[1]["expected"]
    rep = cr & near & ((visit.mask & MaskBit.INTRP) != 0)
    z = ((visit.image - expect) / np.sqrt(visit.variance))[rep]
    assert abs(np.median(z)) < 1.0


def test_run_isr_overscan_measured_in_the_pass(sim):
    """run_isr measures the overscan inside the fused pass (serial), or first on threads (parallel), or with
    smoothing first (overscan_levels): the levels it reports are overscan_levels' in every case."""
    det, _, snaps, calibs = sim
    s = snaps[0]
    raw = s["noisy"].segments
    rows, cols = det.amps[0].raw_serial_overscan
    serial = run_isr(raw, det, calibs, s["meta"])
    threads = run_isr(raw, det, calibs, s["meta"], IsrConfig(parallel=True))
    for plane in ("image", "variance", "mask"):
        np.testing.assert_array_equal(getattr(serial, plane), getattr(threads, plane))
    levels = overscan_levels(np.asarray(raw), rows, cols)
    np.testing.assert_array_equal(serial.metadata["overscan_mean_adu"], levels.mean(axis=1))
    assert serial.metadata["overscan_mean_adu"] == threads.metadata["overscan_mean_adu"]
    smooth = run_isr(raw, det, calibs, s["meta"], IsrConfig(overscan_smooth=5))
    np.testing.assert_allclose(smooth.metadata["overscan_mean_adu"],
                               overscan_levels(np.asarray(raw), rows, cols, smooth=5).mean(axis=1), atol=1e-9)  # fmt: skip


def test_run_isr_validation(sim):
    det, _, snaps, calibs = sim
    s = snaps[0]
    with pytest.raises(ValueError, match="dark_time"):
        run_isr(s["noisy"].segments, det, calibs, {"exptime": 15.0, "band": "z"})
    with pytest.raises(ValueError, match="shape"):
        run_isr(s["noisy"].segments[:, :10], det, calibs, s["meta"])
    raw = s["noisy"].segments.copy()
    raw.flags.writeable = False
    exp = run_isr(raw, det, IsrCalibs(), s["meta"])  # no calibrations at all: overscan, gain, assembly
    assert exp.image.shape == det.shape and np.isfinite(exp.image).all()
