"""The whole per-CCD chain (``process_ccd``) against the simulator's truth, and its behaviour on bad input.

Fast cases use a mini-camera repository (512-px CCDs: a few transients per CCD, few PSF stars); the
acceptance statistics of issue 7 (completeness, flux bias, false detections) are checked on a full-size
LSSTCam CCD in the ``slow`` case.
"""

import dataclasses

import ap_truth
import numpy as np
import pytest

from lsstpipe.pipelines.ap import FORCED_DTYPE, CcdProcessingError, process_ccd
from lsstpipe.pipelines.diasources import DIA_DTYPE
from lsstpipe.pipelines.exposure import MaskBit
from lsstpipe.pipelines.inputs import load_ccd_inputs, visit_exposures
from lsstpipe.pipelines.sdqa import SDQA_KEYS
from lsstpipe.repo import Repository
from lsstpipe.sim.simulate import SimulationRequest, run_simulation

DET = "R11_S12"


def _readonly(inputs):
    for a in inputs.raw_snaps:
        a.flags.writeable = False
    return inputs


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("ap") / "repo"
    run_simulation(SimulationRequest(repo=str(root), detectors=(DET,), n_visits=2, bands="r", cds=False, seed=11,
                                     progress=False))  # fmt: skip
    repo = Repository(root)
    visits = sorted({e["visit"] for e in repo.exposures("OBJECT")})
    loaded = {v: _readonly(load_ccd_inputs(repo, v, DET, calibs="truth")) for v in visits}
    results = {v: process_ccd(inputs) for v, inputs in loaded.items()}
    return repo, loaded, results


def test_chain_runs_every_stage(mini):
    repo, loaded, results = mini
    for r in results.values():
        assert "NO_TEMPLATE" not in r.flags and "NOT_CALIBRATED" not in r.flags, r.flags
        assert r.difference is not None and r.dia_sources.dtype == DIA_DTYPE
        assert set(r.sdqa) == set(SDQA_KEYS)
        assert r.sdqa["template_coverage"] == pytest.approx(1.0)
        assert 0.9 < r.sdqa["diff_noise_ratio"] < 1.1, r.sdqa
        assert r.sdqa["good_pixel_fraction"] > 0.95
        assert np.isfinite(r.sdqa["zero_point"]) and np.isfinite(r.sdqa["psf_fwhm_pix"])
        assert {"isr", "characterize", "difference", "dia_sources", "total"} <= set(r.timings)
        assert r.calexp.metadata["snaps"] == 2
        assert np.isfinite(r.dia_sources["ra"]).all() and np.isfinite(r.dia_sources["science_flux"]).any()


def test_bright_transients_are_found_without_many_false_detections(mini):
    repo, _, results = mini
    found = total = false = 0
    for v, r in results.items():
        obsid = visit_exposures(repo, v)[0]["obsid"]
        s = ap_truth.score(r, repo.root, obsid, DET)
        bright = s["snr"] >= 10
        found += int(s["found"][bright].sum())
        total += int(bright.sum())
        false += s["n_false"]
    assert total >= 4, "the mini visits should hold a few bright transients"
    assert found == total, (found, total)
    # ≤ 10 per full-size CCD (16.8 Mpix) is the requirement; a mini CCD is 1/64 of that
    assert false <= 10 * len(results), false


def test_forced_photometry_of_dia_objects(mini):
    repo, loaded, results = mini
    v = min(loaded)
    obsid = visit_exposures(repo, v)[0]["obsid"]
    truth = ap_truth.truth_sources(repo.root, obsid, DET)
    ny, nx = results[v].calexp.shape
    inside = (truth["x"] > 10) & (truth["x"] < nx - 11) & (truth["y"] > 10) & (truth["y"] < ny - 11)
    tr = np.nonzero((truth["kind"] == "transient") & inside)[0]
    wcs = results[v].characterization.wcs
    ra, dec = wcs.all_pix2world(truth["x"][tr], truth["y"][tr], 0)
    objects = np.zeros(len(tr) + 1, [("id", "i8"), ("ra", "f8"), ("dec", "f8")])
    objects["id"] = np.arange(len(objects)) + 100
    objects["ra"][:-1], objects["dec"][:-1] = ra, dec
    objects["ra"][-1], objects["dec"][-1] = ra[0] + 1.0, dec[0]  # far off this CCD: not measured
    r = process_ccd(dataclasses.replace(loaded[v], dia_objects=objects))
    assert r.forced.dtype == FORCED_DTYPE and len(r.forced) == len(tr)
    ok = np.isfinite(r.forced["psf_flux"])
    pull = (r.forced["psf_flux"][ok] - truth["flux_nJy"][tr][ok]) / r.forced["psf_flux_err"][ok]
    snr = truth["flux_nJy"][tr][ok] / r.forced["psf_flux_err"][ok]
    assert ok.sum() >= 3 and np.median(np.abs(pull[snr > 10] / snr[snr > 10])) < 0.15, (pull, snr)


def test_no_template_gives_a_flagged_partial_result(mini):
    _, loaded, _ = mini
    r = process_ccd(dataclasses.replace(loaded[min(loaded)], template_patches=()))
    assert "NO_TEMPLATE" in r.flags and r.difference is None and len(r.dia_sources) == 0
    assert r.characterization is not None and np.isfinite(r.sdqa["zero_point"])
    assert np.isnan(r.sdqa["template_coverage"])


def test_template_with_a_hole_flags_partial_coverage(mini):
    _, loaded, _ = mini
    inputs = loaded[min(loaded)]
    patches = []
    for p in inputs.template_patches:
        img = p.image.copy()
        img[:, : img.shape[1] // 2] = np.nan
        patches.append(dataclasses.replace(p, image=img))
    r = process_ccd(dataclasses.replace(inputs, template_patches=tuple(patches)))
    assert r.difference is not None
    assert any("TEMPLATE_COVERAGE" in f for f in r.flags), r.flags
    nodata = (r.difference.mask & int(MaskBit.NO_DATA)) != 0
    assert 0.05 < nodata.mean() < 0.95
    if len(r.dia_sources):
        ix = np.rint(r.dia_sources["x"]).astype(int)
        iy = np.rint(r.dia_sources["y"]).astype(int)
        assert not nodata[iy, ix].any()


def test_nan_block_in_the_flat_is_masked_not_fatal(mini):
    _, loaded, _ = mini
    inputs = loaded[min(loaded)]
    flat = inputs.calibs.flat.copy()
    flat[100:200, 50:300] = np.nan
    r = process_ccd(dataclasses.replace(inputs, calibs=dataclasses.replace(inputs.calibs, flat=flat)))
    assert ((r.calexp.mask[100:200, 50:300] & int(MaskBit.NO_DATA)) != 0).all()
    assert r.difference is not None and np.isfinite(r.sdqa["zero_point"])
    if len(r.dia_sources):
        inside = (r.dia_sources["x"] > 50) & (r.dia_sources["x"] < 300)
        inside &= (r.dia_sources["y"] > 100) & (r.dia_sources["y"] < 200)
        assert not inside.any()


def test_saturated_ccd_gives_flags_not_a_crash(mini):
    _, loaded, _ = mini
    inputs = loaded[min(loaded)]
    sat = max(a.saturation for a in inputs.detector.amps)
    raws = tuple(np.full_like(raw, int(sat) + 10) for raw in inputs.raw_snaps)
    r = process_ccd(dataclasses.replace(inputs, raw_snaps=raws))
    assert r.flags and r.sdqa["good_pixel_fraction"] < 0.01
    assert len(r.dia_sources) == 0


def test_unprocessable_inputs_raise_a_clear_error(mini):
    _, loaded, _ = mini
    inputs = loaded[min(loaded)]
    with pytest.raises(CcdProcessingError, match="ISR cannot run"):
        process_ccd(dataclasses.replace(inputs, raw_snaps=(inputs.raw_snaps[0][:, :-3],) * 2))
    with pytest.raises(CcdProcessingError, match="1 or 2 snaps"):
        process_ccd(dataclasses.replace(inputs, raw_snaps=(), snap_metadata=()))


def test_inputs_are_not_modified(mini):
    _, loaded, results = mini
    v = min(loaded)
    before = [raw.copy() for raw in loaded[v].raw_snaps]
    patches = [p.image.copy() for p in loaded[v].template_patches]
    r = process_ccd(loaded[v])
    assert all(np.array_equal(a, b) for a, b in zip(before, loaded[v].raw_snaps))
    assert all(np.array_equal(a, p.image, equal_nan=True) for a, p in zip(patches, loaded[v].template_patches))
    np.testing.assert_array_equal(r.dia_sources, results[v].dia_sources)  # deterministic


@pytest.mark.slow
def test_full_size_ccd_meets_the_acceptance_statistics(tmp_path):
    """Issue 7 on a full-size LSSTCam CCD (R22_S11, two r-band visits of two snaps): transients at
    S/N ≥ 10 found ≥ 98 %, at 5.5 ≤ S/N < 10 ≥ 50 %; PSF fluxes of S/N ≥ 20 transients unbiased within
    2 %; ≤ 10 false detections per CCD."""
    root = tmp_path / "repo"
    run_simulation(SimulationRequest(repo=str(root), camera="lsstcam", detectors=("R22_S11",), n_visits=2,
                                     bands="r", cds=False, seed=1, progress=False))  # fmt: skip
    repo = Repository(root)
    snr, found, ratios, false = [], [], [], []
    for v in sorted({e["visit"] for e in repo.exposures("OBJECT")}):
        r = process_ccd(load_ccd_inputs(repo, v, "R22_S11", calibs="truth"))
        assert not r.flags, r.flags
        s = ap_truth.score(r, root, visit_exposures(repo, v)[0]["obsid"], "R22_S11")
        snr.append(s["snr"])
        found.append(s["found"])
        ratios.append(s["flux_ratio_median"])
        false.append(s["n_false"])
    snr, found = np.concatenate(snr), np.concatenate(found)
    bright, faint = snr >= 10, (snr >= 5.5) & (snr < 10)
    assert bright.sum() >= 50 and found[bright].mean() >= 0.98, (bright.sum(), found[bright].mean())
    assert faint.sum() >= 5 and found[faint].mean() >= 0.5, (faint.sum(), found[faint].mean())
    assert all(abs(r - 1) < 0.02 for r in ratios), ratios
    assert all(n <= 10 for n in false), false
