"""The simulator end to end on the mini camera: determinism, raw round trip, photometry against truth on
the noiseless image, truth consistency, calibrations, templates and the CDS buffer."""

import dataclasses
import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import naive
from kernels.crosstalk import remove_crosstalk
from kernels.render import stamp_radius
from lsstpipe.camera import get_camera
from lsstpipe.cds import CDSClient
from lsstpipe.io import read_raw
from lsstpipe.isr import assemble_ccd, disassemble_ccd
from lsstpipe.repo import Repository, read_csv
from lsstpipe.sim.exposure import SKY_GRID_STEP, ExposureSpec, sky_grid
from lsstpipe.sim.scene import Sources, render_sources
from lsstpipe.sim.simulate import SimulationRequest, check_request, run_simulation
from repo_digest import digest_files

DETS = ("R10_S11", "R11_S12")  # one ITL, one e2v


def _simulate(path, **kw):
    req = dict(repo=str(path), camera="mini", detectors=DETS, n_visits=2, calibs=True, bands="z",
               progress=False, seed=7)  # fmt: skip
    req.update(kw)
    return run_simulation(SimulationRequest(**req))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    path = tmp_path_factory.mktemp("noisy")
    _simulate(path)
    return Repository(path)


@pytest.fixture(scope="module")
def noiseless(tmp_path_factory):
    path = tmp_path_factory.mktemp("noiseless")
    _simulate(path, noise=False, calibs=False, cds=False, templates=False)
    return Repository(path)


def _hashes(repo):
    return {(r["obsid"], r["detector"]): r["sha256"] for r in repo.raws()}


def test_repository_contents(noisy):
    exps = noisy.exposures()
    kinds = {e["imgtype"] for e in exps}
    assert kinds == {"OBJECT", "BIAS", "DARK", "FLAT", "SPOT"}
    assert len(noisy.exposures("OBJECT")) == 4  # 2 visits × 2 snaps
    raws = noisy.raws()
    assert len(raws) == len(exps) * len(DETS)
    for r in raws:
        assert (noisy.root / r["path"]).is_file()
    assert noisy.refcat_path.is_file() and len(read_csv(noisy.refcat_path)) > 10
    assert (noisy.root / "truth" / "ssos.csv").is_file()
    assert (noisy.root / "truth" / "transients.csv").is_file()
    assert noisy.templates()
    for d in DETS:
        with fits.open(noisy.instrument_truth_path(d)) as h:
            assert {"FLAT_Z", "DARK_RATE", "CROSSTALK", "FRINGE", "DEFECTS", "AMPS"} <= {x.name for x in h}


def test_same_seed_gives_byte_identical_repositories(noisy, tmp_path):
    """Raws, CDS raft images, templates and truth: the same bytes from a later run with the same seed."""
    again = Repository(tmp_path / "again")
    _simulate(again.root)
    assert _hashes(again) == _hashes(noisy)
    a, b = digest_files(noisy.root), digest_files(again.root)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_different_seed_gives_different_noise(noisy, tmp_path):
    other = Repository(tmp_path / "other")
    _simulate(other.root, seed=8, templates=False, cds=False)
    h1, h2 = _hashes(noisy), _hashes(other)
    assert h1.keys() == h2.keys()
    assert all(h1[k] != h2[k] for k in h1)
    bias = [e["obsid"] for e in noisy.exposures("BIAS")][0]
    det = get_camera("mini")[DETS[0]]
    a = read_raw(noisy.raw_path(int(bias[5:13]), bias, det.name)).stack().astype(float)
    b = read_raw(other.raw_path(int(bias[5:13]), bias, det.name)).stack().astype(float)
    rows, cols = det.amps[0].raw_serial_overscan
    d = (a - b)[:, rows, cols]
    d -= np.median(d, axis=1, keepdims=True)  # the two seeds' bias structures and drifts
    d -= np.median(d, axis=2, keepdims=True)
    rn = np.array([x.read_noise / x.gain for x in det.amps])
    ratio = d.std(axis=(1, 2)) / (np.sqrt(2) * rn)
    assert np.all(np.abs(ratio - 1) < 0.15), ratio


def test_simulated_ccd_round_trips_through_raw_segments(noisy):
    det = get_camera("mini")[DETS[1]]
    obsid = noisy.exposures("OBJECT")[0]["obsid"]
    raw = read_raw(noisy.raw_path(int(obsid[5:13]), obsid, det.name))
    image = assemble_ccd(raw)
    segs = disassemble_ccd(image, det)
    for a in det.amps:
        np.testing.assert_array_equal(segs[a.hdu - 1][a.raw_data], raw.segments[a.segment][a.raw_data])
    rebuilt = dataclasses.replace(raw, segments={a.segment: segs[a.hdu - 1] for a in det.amps})
    np.testing.assert_array_equal(assemble_ccd(rebuilt), image)


def _calibrated_electrons(repo, det, obsid, meta):
    """Undo the instrument exactly with the truth: bias, crosstalk, gain, dark, flat, sky (and fringes)."""
    raw = read_raw(repo.raw_path(int(obsid[5:13]), obsid, det.name))
    with fits.open(repo.instrument_truth_path(det.name)) as h:
        amps = h["AMPS"].data
        segs = raw.stack().astype(np.float64)
        segs -= amps["bias_level"][:, None, None] + h["BIAS_ROWS"].data[:, :, None] + h["BIAS_COLS"].data[:, None, :]
        segs = remove_crosstalk(segs, h["CROSSTALK"].data) * amps["gain"][:, None, None]
        flat = h[f"FLAT_{meta['band'].upper()}"].data.astype(np.float64)
        dark = h["DARK_RATE"].data.astype(np.float64)
        fringe = h["FRINGE"].data.astype(np.float64) if "FRINGE" in h else None
        defects = h["DEFECTS"].data
        bad_x = set(defects["x"])
    img = assemble_ccd(dataclasses.replace(raw, segments={a.segment: segs[a.hdu - 1] for a in det.amps}),
                       dtype=np.float64)  # fmt: skip
    spec = ExposureSpec(obsid=obsid, day_obs=0, seq_num=0, imgtype="OBJECT", band=meta["band"], mjd=meta["mjd"],
                        exptime=meta["exptime"], dark_time=meta["exptime"] + 2.0,
                        sky_gradient=tuple(meta["sky_gradient_per_100mm"]))  # fmt: skip
    grid = sky_grid(get_camera("mini"), det, spec, meta["sky_e_per_pixel"] / meta["exptime"])
    zero = np.zeros(img.shape)
    sky = naive.compose_expectation(zero, np.ones(img.shape), zero, grid, SKY_GRID_STEP, meta["exptime"], 0.0,
                                    fringe, meta["fringe_amplitude"])  # fmt: skip
    return (img - dark * spec.dark_time) / flat - sky, bad_x


def _truth_sources(truth):
    cols = {f: np.array([t[f if f not in ("fwhm",) else "fwhm_pix"] for t in truth]) for f in
            ("id", "kind", "ra", "dec", "x", "y", "x_end", "y_end", "mag", "flux_e", "fwhm", "e1", "e2")}  # fmt: skip
    return Sources(**cols)


def test_aperture_photometry_on_the_noiseless_image_recovers_truth(noiseless):
    """Aperture photometry of every unsaturated source of > 1e4 e- away from edges and bad columns
    recovers its truth flux within 0.5 % on the noiseless image. Neighbours' light inside the aperture,
    predicted from the truth table, is subtracted; sources whose neighbours add more than 10 % are
    skipped. The aperture is the source's whole PSF stamp."""
    cam = get_camera("mini")
    checked, worst = 0, 0.0
    for exp in noiseless.exposures("OBJECT"):
        obsid = exp["obsid"]
        tdir = noiseless.truth_dir(exp["day_obs"], obsid)
        for name in DETS:
            det = cam[name]
            meta = json.loads((tdir / f"{obsid}_{name}_meta.json").read_text())
            truth = read_csv(tdir / f"{obsid}_{name}_sources.csv")
            img, bad_x = _calibrated_electrons(noiseless, det, obsid, meta)
            model = np.zeros(img.shape, np.float64)
            render_sources(model, _truth_sources(truth))
            ny, nx = img.shape
            yy, xx = np.mgrid[0:ny, 0:nx]
            radii = stamp_radius(np.array([t["flux_e"] for t in truth]), np.array([t["fwhm_pix"] for t in truth]), 3.5)
            for k, t in enumerate(truth):
                r = radii[k] + 1.0
                if t["kind"] == "sso" or t["flux_e"] < 1e4 or not (r < t["x"] < nx - 1 - r and r < t["y"] < ny - 1 - r):
                    continue
                alpha = t["fwhm_pix"] / (2 * np.sqrt(2 ** (1 / 3.5) - 1))
                if t["flux_e"] * 2.5 / (np.pi * alpha**2) > 0.25 * det.vendor.full_well_e:
                    continue  # may saturate
                if any(abs(x - t["x"]) < r for x in bad_x):
                    continue
                inside = (xx - t["x"]) ** 2 + (yy - t["y"]) ** 2 <= r**2
                neighbours = model[inside].sum() - t["flux_e"]
                if neighbours > 0.1 * t["flux_e"]:
                    continue
                measured = img[inside].sum() - neighbours
                assert measured == pytest.approx(t["flux_e"], rel=0.005), (obsid, name, t)
                worst = max(worst, abs(measured / t["flux_e"] - 1))
                checked += 1
    print(f"{checked} sources checked, worst relative error {worst:.2e}")
    assert checked >= 20


def test_truth_positions_agree_with_the_wcs(noisy):
    exp = noisy.exposures("OBJECT")[0]
    tdir = noisy.truth_dir(exp["day_obs"], exp["obsid"])
    for name in DETS:
        meta = json.loads((tdir / f"{exp['obsid']}_{name}_meta.json").read_text())
        w = WCS(fits.Header(meta["wcs"]))
        truth = read_csv(tdir / f"{exp['obsid']}_{name}_sources.csv")
        ra = np.array([t["ra"] for t in truth])
        dec = np.array([t["dec"] for t in truth])
        x, y = w.all_world2pix(ra, dec, 0)
        np.testing.assert_allclose(x, [t["x"] for t in truth], atol=1e-3)
        np.testing.assert_allclose(y, [t["y"] for t in truth], atol=1e-3)
        kinds = {t["kind"] for t in truth}
        assert {"star"} <= kinds


def test_asteroids_move_between_snaps_and_visits(noisy):
    seen = {}
    for exp in noisy.exposures("OBJECT"):
        tdir = noisy.truth_dir(exp["day_obs"], exp["obsid"])
        for name in DETS:
            for t in read_csv(tdir / f"{exp['obsid']}_{name}_sources.csv"):
                if t["kind"] == "sso":
                    seen.setdefault(t["id"], []).append((exp["mjd_obs"], t["ra"], t["dec"], t["trail_length"]))
    ssos = {r["id"]: r for r in read_csv(noisy.root / "truth" / "ssos.csv")}
    assert seen, "no asteroid crossed the simulated detectors"
    for sid, obs in seen.items():
        assert sid in ssos
        assert all(o[3] > 0 for o in obs)
        if len(obs) > 1:
            assert len({(round(o[1], 7), round(o[2], 7)) for o in obs}) == len(obs)


def test_calibration_frames_have_the_expected_levels(noisy):
    det = get_camera("mini")[DETS[0]]
    a = det.amps[0]
    by_type = {}
    for e in noisy.exposures():
        by_type.setdefault(e["imgtype"], e["obsid"])
    levels = {}
    for kind, obsid in by_type.items():
        raw = read_raw(noisy.raw_path(int(obsid[5:13]), obsid, det.name))
        assert raw.header["IMGTYPE"] == kind
        levels[kind] = np.median(raw.segments[a.segment][a.raw_data])
    assert levels["BIAS"] == pytest.approx(a.bias_level, abs=10)
    assert levels["DARK"] == pytest.approx(a.bias_level, abs=10)
    assert levels["FLAT"] - a.bias_level == pytest.approx(30000 / a.gain, rel=0.1)


def test_cds_holds_every_raft_image_as_written(noisy):
    client = CDSClient(noisy.cds_root)
    exp = noisy.exposures("OBJECT")[0]
    det = get_camera("mini")[DETS[0]]
    raw_file = read_raw(noisy.raw_path(exp["day_obs"], exp["obsid"], det.name)).stack()
    image = client.retrieve(exp["obsid"], det.raft, "raw", timeout=1.0)
    np.testing.assert_array_equal(image.ccds[det.name], raw_file)
    corrected = client.retrieve(exp["obsid"], det.raft, "crosstalk_corrected", timeout=1.0)
    diff = corrected.ccds[det.name].astype(float) - raw_file
    assert 0 < np.abs(diff).max() < 0.01 * raw_file.max()
    assert len(client.scan()) == 2 * len(noisy.exposures()) * len({d[:3] for d in DETS})


def test_templates_show_the_stars_where_the_wcs_puts_them(noisy):
    t = noisy.templates()[0]
    with fits.open(noisy.root / t["path"]) as h:
        img = h["IMAGE"].data
        w = WCS(h["IMAGE"].header)
        assert h[0].header["BUNIT"] == "nJy"
        assert np.all(h["VARIANCE"].data > 0)
    stars = [s for s in read_csv(noisy.refcat_path) if s[f"{t['band']}_mag"] < 20.5]
    x, y = w.all_world2pix([s["ra"] for s in stars], [s["dec"] for s in stars], 0)
    inside = (x > 5) & (x < img.shape[1] - 6) & (y > 5) & (y < img.shape[0] - 6)
    assert inside.any()
    for xi, yi in zip(x[inside], y[inside]):
        cut = img[int(round(yi)) - 3 : int(round(yi)) + 4, int(round(xi)) - 3 : int(round(xi)) + 4]
        py, px = np.unravel_index(np.argmax(cut), cut.shape)
        assert abs(py - 3) <= 1 and abs(px - 3) <= 1


# ----------------------------------------------------------------------- simulating into a repository again
def _small(path, **kw):
    """One mini CCD, no templates nor CDS: a few seconds."""
    req = dict(detectors=DETS[:1], n_visits=2, bands="i", templates=False, cds=False, calibs=False)
    req.update(kw)
    return _simulate(path, **req)


def _state(repo):
    """Everything a refused simulation must leave alone: every file's bytes and the registry's rows."""
    return digest_files(repo.root), repo.exposures(), repo.raws()


def _visit_bands(repo):
    return {int(e["visit"]): e["band"] for e in repo.exposures("OBJECT")}


def test_options_that_do_not_apply_to_the_visit_source_are_refused(tmp_path):
    for kw, option in ((dict(opsim="x.db", n_snaps=1), "--snaps"), (dict(opsim="x.db", bands="r"), "--bands"),
                       (dict(n_visits=2, max_visits=1), "--max-visits"), (dict(night=2), "--night"),
                       (dict(opsim="x.db", n_visits=3), "--visits"), (dict(max_visits=0, opsim="x.db"), "at least 1")):  # fmt: skip
        request = SimulationRequest(repo=str(tmp_path / "r"), progress=False, **kw)
        with pytest.raises(ValueError, match=option):
            check_request(request)
        with pytest.raises(ValueError, match=option):
            run_simulation(request)
    assert not (tmp_path / "r").exists()
    check_request(SimulationRequest(repo="r", opsim="x.db", night=2, max_visits=3))
    check_request(SimulationRequest(repo="r", n_visits=3, n_snaps=1, bands="ri"))


def test_simulating_again_with_the_same_visits_adds_calibrations_and_detectors(tmp_path):
    repo = Repository(tmp_path / "r")
    _small(repo.root)
    visits_csv = (repo.root / "visits.csv").read_bytes()
    first = _hashes(repo)
    _small(repo.root, calibs=True)
    assert {e["imgtype"] for e in repo.exposures()} == {"OBJECT", "BIAS", "DARK", "FLAT", "SPOT"}
    _small(repo.root, detectors=DETS[1:])
    again = _hashes(repo)
    assert {k: again[k] for k in first} == first  # the science raws of the first run, the same bytes
    assert {d for _, d in again} == set(DETS)
    assert (repo.root / "visits.csv").read_bytes() == visits_csv


@pytest.mark.parametrize("change", [dict(n_visits=1), dict(bands="g"), dict(n_snaps=1), dict(seed=8),
                                    dict(noise=False)])  # fmt: skip
def test_simulating_other_visits_into_a_repository_is_refused_and_changes_nothing(tmp_path, change):
    repo = Repository(tmp_path / "r")
    _small(repo.root)
    before = _state(repo)
    with pytest.raises(ValueError, match="--overwrite") as info:
        _small(repo.root, **change)
    assert str(repo.root) in str(info.value) and "--repo" in str(info.value)
    if "n_visits" in change:
        assert "it has 2 visits (band i, 2 snaps each" in str(info.value)
        assert "this run makes 1 visit (band i" in str(info.value)
    assert _state(repo) == before


def test_overwrite_replaces_the_simulation_and_leaves_nothing_of_the_old_one(tmp_path):
    """The review's case: 3 i-band visits, then 1 g-band visit with --overwrite: only the new visit remains,
    on disk and in the registry, and the calibration products made from the old raws are gone."""
    repo = Repository(tmp_path / "r")
    _small(repo.root, n_visits=3, calibs=True)
    (repo.root / "calib" / "bias").mkdir(parents=True)
    (repo.root / "calib" / "bias" / "master.fits").write_bytes(b"old master")
    (repo.root / "calib.sqlite3").write_bytes(b"old certifications")
    (repo.root / "notes.txt").write_text("mine")  # not the simulation's: kept
    summary = _small(repo.root, n_visits=1, bands="g", overwrite=True)
    assert {"raw", "truth", "registry.sqlite3", "visits.csv", "calib", "calib.sqlite3"} <= set(summary["replaced"])
    assert _visit_bands(repo) == {v: "g" for v in _visit_bands(repo)} and len(_visit_bands(repo)) == 1
    assert len(read_csv(repo.root / "visits.csv")) == 1
    assert {e["imgtype"] for e in repo.exposures()} == {"OBJECT"}
    on_disk = sorted(str(p.relative_to(repo.root)) for p in (repo.root / "raw").rglob("*.fits"))
    assert on_disk == sorted(r["path"] for r in repo.raws()) and len(on_disk) == 2  # 1 visit x 2 snaps
    obsids = {e["obsid"] for e in repo.exposures()}
    assert {p.name for p in (repo.root / "truth" / "exposures").glob("*/*")} == obsids
    assert not (repo.root / "calib").exists() and not (repo.root / "calib.sqlite3").exists()
    assert (repo.root / "notes.txt").read_text() == "mine"
    # the repository now records the new simulation: simulating it again is accepted, other visits are not
    _small(repo.root, n_visits=1, bands="g", calibs=True)
    with pytest.raises(ValueError, match="other settings"):
        _small(repo.root, n_visits=3)


def test_overwrite_deletes_nothing_in_a_directory_that_is_not_an_lsstpipe_repository(tmp_path):
    root = tmp_path / "project"
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "data.bin").write_bytes(b"precious")
    (root / "repo.yaml").write_text("name: something else\n")
    with pytest.raises(ValueError, match="not describe an lsstpipe data repository"):
        _small(root, overwrite=True)
    assert (root / "raw" / "data.bin").read_bytes() == b"precious"
