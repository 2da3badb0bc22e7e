"""Image characterization against the simulator's truth, and on bad input.

A one-visit, one-snap repository is simulated (``mini`` camera: 512-pixel CCDs; in the slow test one
full-size LSSTCam CCD), ISR'd with the truth calibrations, and characterized from a perturbed initial WCS
(a few arcsec off, rotated by ~0.02–0.03°). The truth is the simulator's: its WCS header (a TAN-SIP fit
good to < 1 mas), the PSF FWHM of every source, and ``zero_point_mag_for_1e`` of the exposure.
"""

import dataclasses
import glob
import json

import numpy as np
import pytest
from astropy.wcs import WCS

from lsstpipe.camera import get_camera
from lsstpipe.io.raw import read_raw
from lsstpipe.io.refcat import read_refcat
from lsstpipe.pipelines.characterize import CharacterizeConfig, characterize, initial_wcs
from lsstpipe.pipelines.exposure import Exposure, MaskBit
from lsstpipe.pipelines.isr import isr_from_truth, raw_metadata, run_isr
from lsstpipe.repo import Repository, read_csv
from lsstpipe.sim.simulate import SimulationRequest, run_simulation
from lsstpipe.sim.wcs import angular_separation_mas


def _simulate(root, camera, detector, band, seed):
    run_simulation(SimulationRequest(repo=str(root), camera=camera, detectors=(detector,), n_visits=1, n_snaps=1,
                                     bands=band, seed=seed, templates=False, cds=False, compress=False,
                                     progress=False))  # fmt: skip
    raw = read_raw(glob.glob(f"{root}/raw/*/*/*_{detector}.fits")[0])
    meta = raw_metadata(raw)
    det, calibs = isr_from_truth(root, detector, meta["band"])
    exp = run_isr(raw.stack(), det, calibs, meta)
    truth = json.loads(open(glob.glob(f"{root}/truth/exposures/*/*/*_{detector}_meta.json")[0]).read())
    sources = read_csv(glob.glob(f"{root}/truth/exposures/*/*/*_{detector}_sources.csv")[0])
    hdr = raw.header
    return {"exp": exp, "truth": truth, "sources": sources, "camera": get_camera(camera), "detector": detector,
            "boresight": (float(hdr["RA"]), float(hdr["DEC"]), float(hdr["ROTPA"])), "root": root}  # fmt: skip


def _perturbed_wcs(sim, dra_arcsec, ddec_arcsec, drot_deg):
    ra, dec, rot = sim["boresight"]
    return initial_wcs(sim["camera"], sim["detector"], ra + dra_arcsec / 3600.0 / np.cos(np.radians(dec)),
                       dec + ddec_arcsec / 3600.0, rot + drot_deg)  # fmt: skip


def _refcat(sim, wcs):
    radius = 0.1 if sim["camera"].name == "mini" else 0.3
    return read_refcat(Repository(sim["root"]).refcat_path, *wcs.wcs.crval, radius)


def _scores(sim, result):
    """(WCS rms vs truth over the CCD in mas, largest |FWHM/truth − 1| at the sources, ZP − truth)."""
    ny, nx = sim["exp"].shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 21), np.linspace(0, ny - 1, 21))
    a = WCS(sim["truth"]["wcs"]).all_pix2world(gx.ravel(), gy.ravel(), 0)
    b = result.wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    rms = float(np.sqrt(np.mean(angular_separation_mas(a[0], a[1], b[0], b[1]) ** 2)))
    x = np.array([s["x"] for s in sim["sources"]], float)
    y = np.array([s["y"] for s in sim["sources"]], float)
    f = np.array([s["fwhm_pix"] for s in sim["sources"]], float)
    on = (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1)
    fwhm_err = float(np.max(np.abs(result.psf.fwhm(x[on], y[on]) / f[on] - 1)))
    return rms, fwhm_err, result.zero_point - sim["truth"]["zero_point_mag_for_1e"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return _simulate(tmp_path_factory.mktemp("mini"), "mini", "R11_S12", "i", 7)


def test_mini_ccd_against_truth(mini):
    wcs0 = _perturbed_wcs(mini, 6.0, -5.0, 0.03)
    refcat = _refcat(mini, wcs0)
    exp = mini["exp"]
    for plane in (exp.image, exp.variance, exp.mask):
        plane.flags.writeable = False
    before = exp.image.copy()
    res = characterize(exp, refcat, wcs0, "i")
    np.testing.assert_array_equal(exp.image, before)
    rms, fwhm_err, dzp = _scores(mini, res)
    msg = f"WCS rms {rms:.1f} mas, FWHM error {fwhm_err:.4f}, ZP error {dzp:+.4f} mag; {res.flags} {res.metrics}"
    assert res.flags == (), msg
    # a 512-pixel CCD holds only ~20 reference stars: looser than the full-size acceptance (test below)
    assert rms <= 40.0 and fwhm_err <= 0.03 and abs(dzp) <= 0.01, msg
    assert res.metrics["n_refcat_matches"] >= 10 and res.metrics["n_psf_stars"] >= 5, msg
    assert res.exposure.metadata["zero_point"] == res.zero_point and res.exposure.metadata["psf_fwhm"] > 0
    assert res.exposure.metadata["band"] == "i"
    # the calexp is background-subtracted: its sky is ~0 where the input's was ~background_level
    assert abs(np.median(res.exposure.image[exp.mask == 0])) < 0.05 * res.metrics["background_level"], msg
    matched = res.sources["ref_index"] >= 0
    sep = angular_separation_mas(res.sources["ra"][matched], res.sources["dec"][matched],
                                 refcat["ra"][res.sources["ref_index"][matched]],
                                 refcat["dec"][res.sources["ref_index"][matched]])  # fmt: skip
    assert np.median(sep) < 50.0, msg
    st = res.psf.stamp(100.3, 200.7, 25)
    assert st.shape == (25, 25) and st.sum() == pytest.approx(1.0)


def test_empty_refcat_and_far_pointing_flag_astrometry(mini):
    wcs0 = _perturbed_wcs(mini, 3.0, 3.0, 0.0)
    refcat = _refcat(mini, wcs0)
    res = characterize(mini["exp"], refcat[:0], wcs0, "i")
    assert res.flags == ("ASTROMETRY_FAILED", "PHOTOMETRY_FAILED"), res.metrics
    assert res.wcs is None and np.isnan(res.zero_point) and np.all(np.isnan(res.sources["ra"]))
    assert res.metrics["n_psf_stars"] >= 5  # the PSF does not need the references
    far = _perturbed_wcs(mini, 300.0, 0.0, 0.0)  # 5 arcmin off: beyond the search
    res = characterize(mini["exp"], _refcat(mini, far), far, "i")
    assert "ASTROMETRY_FAILED" in res.flags and res.wcs is None, res.metrics


def test_nan_block_and_saturated_ccd(mini):
    wcs0 = _perturbed_wcs(mini, 2.0, -2.0, 0.01)
    refcat = _refcat(mini, wcs0)
    exp = mini["exp"]
    img = exp.image.copy()
    img[100:300, 50:250] = np.nan
    res = characterize(dataclasses.replace(exp, image=img), refcat, wcs0, "i")
    assert "NO_DATA" not in res.flags and res.metrics["n_sources"] > 0, (res.flags, res.metrics)
    assert not np.any(np.isfinite(res.sources["x"]) & (res.sources["x"] > 60) & (res.sources["x"] < 240)
                      & (res.sources["y"] > 110) & (res.sources["y"] < 290))  # fmt: skip
    sat = Exposure(np.full(exp.shape, 1.5e5, np.float32), exp.variance, np.full(exp.shape, int(MaskBit.SAT), np.int32),
                   dict(exp.metadata))  # fmt: skip
    res = characterize(sat, refcat, wcs0, "i")
    assert res.flags == ("NO_DATA", "NO_STARS", "ASTROMETRY_FAILED", "PHOTOMETRY_FAILED"), res.flags
    assert res.wcs is None and len(res.sources) == 0 and res.psf.fwhm(10, 10) > 0
    allnan = dataclasses.replace(exp, image=np.full(exp.shape, np.nan, np.float32))
    assert "NO_DATA" in characterize(allnan, refcat, wcs0, "i").flags
    corner = np.full(exp.shape, int(MaskBit.NO_DATA), np.int32)
    corner[:30, :30] = 0  # too few usable pixels for any background cell
    assert "NO_DATA" in characterize(dataclasses.replace(exp, mask=corner), refcat, wcs0, "i").flags
    striped = exp.image.copy()
    striped[::3] = np.nan
    striped[:, ::2] = np.inf
    res = characterize(dataclasses.replace(exp, image=striped), refcat, wcs0, "i")
    assert "NO_STARS" in res.flags and np.all(np.isfinite(res.exposure.image[1::3, 1::2])), res.flags


def test_blank_sky_has_no_stars(mini):
    wcs0 = _perturbed_wcs(mini, 0.0, 0.0, 0.0)
    rng = np.random.default_rng(1)
    shape = mini["exp"].shape
    blank = Exposure((1000.0 + rng.normal(0, 31.6, shape)).astype(np.float32), np.full(shape, 1000.0, np.float32),
                     np.zeros(shape, np.int32), {"band": "i"})  # fmt: skip
    res = characterize(blank, _refcat(mini, wcs0), wcs0, "i")
    assert "NO_STARS" in res.flags and "ASTROMETRY_FAILED" in res.flags, res.flags
    assert res.metrics["background_level"] == pytest.approx(1000.0, abs=2.0)
    assert res.metrics["background_rms"] == pytest.approx(31.6, rel=0.05)


def test_bad_arguments(mini):
    wcs0 = _perturbed_wcs(mini, 0.0, 0.0, 0.0)
    refcat = _refcat(mini, wcs0)
    with pytest.raises(ValueError, match="i_mag"):
        characterize(mini["exp"], refcat[["ra", "dec"]], wcs0, "i")
    with pytest.raises(ValueError, match="Exposure"):
        characterize(mini["exp"].image, refcat, wcs0, "i")
    with pytest.raises(ValueError, match="WCS"):
        characterize(mini["exp"], refcat, None, "i")
    for bad in (dict(psf_order=7), dict(sip_order=0), dict(match_radius_arcsec=-1.0), dict(psf_beta=0.5),
                dict(min_matches=1)):  # fmt: skip
        with pytest.raises(ValueError):
            CharacterizeConfig(**bad)


@pytest.mark.slow
def test_full_size_lsstcam_ccd_against_truth(tmp_path):
    """Acceptance: WCS ≤ 20 mas rms over the CCD, PSF FWHM within 3 %, zero point within 0.01 mag."""
    sim = _simulate(tmp_path, "lsstcam", "R22_S11", "r", 5)
    wcs0 = _perturbed_wcs(sim, 5.0, -4.0, 0.02)
    res = characterize(sim["exp"], _refcat(sim, wcs0), wcs0, "r")
    rms, fwhm_err, dzp = _scores(sim, res)
    msg = f"WCS rms {rms:.2f} mas, FWHM error {fwhm_err:.4f}, ZP error {dzp:+.4f} mag; {res.flags} {res.metrics}"
    assert res.flags == (), msg
    assert rms <= 20.0 and fwhm_err <= 0.03 and abs(dzp) <= 0.01, msg
    assert res.metrics["n_refcat_matches"] >= 50 and res.metrics["n_psf_stars"] >= 50, msg
