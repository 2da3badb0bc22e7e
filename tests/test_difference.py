"""The differencing stage on pairs built from the simulator's own pieces: template patches rendered by
``lsstpipe.sim.templates.render_patch`` (nJy, 0.75" Moffat, coadd noise, tract TAN WCS) and a science
exposure of the same stars (mean magnitudes: no variables, no transients) rendered with the simulator's PSF
model and photometry, with sky and Gaussian photon noise, its TAN-SIP WCS fitted to the exact optical model.
"""

import dataclasses
import math
import os
import time

import numpy as np
import pytest
from astropy.io import fits

from kernels.render import add_moffat_sources
from lsstpipe.camera import get_camera
from lsstpipe.pipelines.detection import detect_and_measure
from lsstpipe.pipelines.difference import Difference, DifferenceConfig, difference_exposure, subtract
from lsstpipe.pipelines.exposure import Exposure, MaskBit
from lsstpipe.pipelines.templates import TemplatePatch, read_template_patches, warp_template
from lsstpipe.repo import Repository
from lsstpipe.sim import scene
from lsstpipe.sim import sky as skymod
from lsstpipe.sim.simulate import default_sky
from lsstpipe.sim.templates import (
    PATCH_CENTER,
    TEMPLATE_FWHM_ARCSEC,
    patch_geometry,
    render_patch,
    tract_wcs,
    write_template,
)
from lsstpipe.sim.wcs import DetectorSkyModel

BAND, EXPTIME, AIRMASS, SKY_MAG = "r", 30.0, 1.2, 21.0
RA, DEC, ROT = 150.0, 2.0, 23.0


@dataclasses.dataclass
class Pair:
    science: Exposure
    wcs: object
    patches: list
    zero_point: float
    fwhm: float
    stars_xy: np.ndarray  # (n, 3): x, y, flux_e of the stars on the science image
    clean: np.ndarray  # noiseless science


def make_pair(camera_name="mini", detector=None, seeing=1.0, seed=7, stars=True, transient=None, shift_patch=None,
              density=None):  # fmt: skip
    camera = get_camera(camera_name)
    det = camera[detector] if detector else camera.science[len(camera.science) // 2]
    model = DetectorSkyModel.build(camera, det, RA, DEC, ROT)
    wcs = model.fit_tan_sip()
    scale = camera.pixel_scale_arcsec
    ny, nx = det.shape
    cra, cdec = (float(v) for v in model.pixel_to_sky((nx - 1) / 2, (ny - 1) / 2))
    cfg = default_sky(camera)
    if density is not None:
        cfg = dataclasses.replace(cfg, star_density=density)
    radius = math.hypot(nx, ny) * scale / 3600 / 2 + 0.02
    cat = skymod.stars_in_cells(skymod.cells_around(cra, cdec, radius, cfg), seed, cfg)
    if not stars:
        cat = skymod.stars_in_cells([], seed, cfg)
    # template patches covering the detector
    tract = tract_wcs(RA, DEC, scale)
    size, overlap = patch_geometry(camera)
    corners = model.pixel_to_sky(np.array([-20, nx + 20, nx + 20, -20.0]), np.array([-20, -20, ny + 20, ny + 20.0]))
    tx, ty = tract.all_world2pix(*corners, 0)
    i0, i1 = (int(np.floor((a + size / 2) / size)) + PATCH_CENTER for a in (tx.min(), tx.max()))
    j0, j1 = (int(np.floor((b + size / 2) / size)) + PATCH_CENTER for b in (ty.min(), ty.max()))
    cells = [(i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]
    patches = []
    for i, j in sorted(cells):
        if shift_patch is not None:
            i += shift_patch
        img, var, pw = render_patch(tract, i, j, size, overlap, cat, BAND, scale, seed, 0)
        patches.append(TemplatePatch(img, var, pw, TEMPLATE_FWHM_ARCSEC / scale, None))
    # science: the same stars at their mean magnitude, the simulator's PSF and photometry
    psf = scene.PsfModel(seeing, scale, scene.mm_scale(camera))
    x, y = model.sky_to_pixel(cat.ra, cat.dec)
    keep = (x > -30) & (x < nx + 30) & (y > -30) & (y < ny + 30)
    x, y = x[keep], y[keep]
    flux = skymod.electrons_per_second(cat.mags[BAND][keep], BAND, AIRMASS) * EXPTIME
    fwhm, e1, e2, _ = psf.at(*det.pixel_to_focal_plane(x, y))
    clean = np.zeros(det.shape, np.float32)
    if len(x):
        add_moffat_sources(clean, x, y, flux, fwhm, scene.PSF_BETA, e1, e2)
    if transient is not None:
        tx_, ty_, tf = transient
        f1, a1, b1, _ = psf.at(*det.pixel_to_focal_plane(np.array([tx_]), np.array([ty_])))
        add_moffat_sources(clean, [tx_], [ty_], [tf], f1, scene.PSF_BETA, a1, b1)
    sky = skymod.sky_electrons_per_pixel(SKY_MAG, BAND, scale) * EXPTIME
    read_noise = 8.0
    var = (clean + sky + read_noise**2).astype(np.float32)
    rng = np.random.default_rng(seed + 1000)
    image = clean + rng.standard_normal(det.shape, dtype=np.float32) * np.sqrt(var)
    exp = Exposure(image.astype(np.float32), var, np.zeros(det.shape, np.int32), {"band": BAND})
    zp = skymod.exposure_zero_point(BAND, AIRMASS, EXPTIME)
    fw = float(psf.at(*det.pixel_to_focal_plane((nx - 1) / 2, (ny - 1) / 2))[0])
    return Pair(exp, wcs, patches, zp, fw, np.column_stack([x, y, flux]), clean)


def blank_pixels(pair, diff, mag_limit_e=2e4, radius_fwhm=5.0):
    """Pixels of the difference away from every star brighter than ``mag_limit_e`` electrons."""
    ok = diff.mask == 0
    ny, nx = ok.shape
    r = int(radius_fwhm * pair.fwhm)
    for x, y, f in pair.stars_xy:
        if f > mag_limit_e:
            ix, iy = int(round(x)), int(round(y))
            ok[max(iy - r, 0) : max(iy + r + 1, 0), max(ix - r, 0) : max(ix + r + 1, 0)] = False
    return ok


def check_noise(diff, ok, tol=0.05):
    d = diff.image[ok].astype(float)
    v = diff.variance[ok].astype(float)
    n = d.size
    assert n > 20000
    assert abs(d.mean()) < 5 * math.sqrt(v.mean() / n), (d.mean(), math.sqrt(v.mean() / n))
    ratio = d.std() / math.sqrt(v.mean())
    assert abs(ratio - 1) < tol, ratio
    return ratio


@pytest.fixture(scope="module")
def pair():
    return make_pair(transient=(200.3, 260.7, 5.0e5))


@pytest.fixture(scope="module")
def diff(pair):
    return difference_exposure(pair.science, pair.patches, pair.wcs, pair.zero_point, pair.fwhm)


def test_star_field_difference_is_noise_with_the_predicted_variance(pair, diff):
    assert isinstance(diff, Difference)
    assert diff.flags == ()
    info = diff.kernel_info
    assert info["method"] == "alard-lupton" and info["matched_side"] == "template"
    assert info["n_stamps"] >= 5 and 0.5 < info["chi2"] < 2.0
    assert info["flux_scale"] == pytest.approx(1.0, abs=0.02)  # the zero point makes the template electrons
    assert diff.metrics["template_coverage"] == 1.0
    assert set(diff.metrics["seconds"]) >= {"warp", "kernel_fit", "convolution", "decorrelation", "total"}
    ok = blank_pixels(pair, diff)
    ok[230:292, 170:232] = False  # the transient
    check_noise(diff, ok)
    assert diff.template.shape == pair.science.shape and np.isfinite(diff.template[diff.mask == 0]).all()
    # the template was warped beyond the frame: only a 2-pixel EDGE margin
    assert not (diff.mask[2:-2, 2:-2] & MaskBit.EDGE).any() and (diff.mask[:2] & MaskBit.EDGE).all()


def test_injected_point_source_flux_is_recovered(pair, diff):
    """Aperture flux (radius 5 FWHM) of the transient in the difference vs the injected 5e5 e-."""
    yy, xx = np.mgrid[0 : diff.image.shape[0], 0 : diff.image.shape[1]]
    ap = np.hypot(xx - 200.3, yy - 260.7) <= 5 * pair.fwhm
    assert (diff.mask[ap] == 0).all()
    flux = float(diff.image[ap].sum())
    err = math.sqrt(float(diff.variance[ap].sum()))
    assert err < 0.005 * 5e5
    assert flux == pytest.approx(5.0e5, rel=0.02)


def test_few_false_detections_on_a_mini_ccd(pair, diff):
    cat = detect_and_measure(diff.image, diff.variance, diff.mask, psf_fwhm=pair.fwhm, threshold=5.0, negative=True,
                             subtract_background=False)  # fmt: skip
    near = np.hypot(cat["x"] - 200.3, cat["y"] - 260.7) < 3 * pair.fwhm
    assert near.sum() >= 1 and cat["sign"][near].max() == 1  # the transient
    # 1/64 of a full-size CCD's area: the ≤ 10 per full CCD acceptance scales to < 1; allow 1
    assert (~near).sum() <= 1, cat[~near][["x", "y", "snr"]]


def test_science_sharper_than_template():
    """0.6" seeing against the 0.75" template: "auto" sharpens the deep template (few false detections); the
    science can be convolved instead, with the same noise and flux properties."""
    p = make_pair(seeing=0.6, transient=(300.0, 150.0, 2.0e5))
    yy, xx = np.mgrid[0 : p.science.shape[0], 0 : p.science.shape[1]]
    ap = np.hypot(xx - 300.0, yy - 150.0) <= 5 * 3.75
    for mode, side in (("auto", "template"), ("convolve_science", "science")):
        d = difference_exposure(p.science, p.patches, p.wcs, p.zero_point, p.fwhm, DifferenceConfig(mode=mode))
        assert d.kernel_info["matched_side"] == side and d.flags == ()
        assert 0.7 < d.kernel_info["chi2"] < 1.5
        ok = blank_pixels(p, d)
        ok[120:180, 270:330] = False
        check_noise(d, ok)
        assert float(d.image[ap].sum()) == pytest.approx(2.0e5, rel=0.02)
        if mode == "auto":
            cat = detect_and_measure(d.image, d.variance, d.mask, psf_fwhm=p.fwhm, negative=True,
                                     subtract_background=False)  # fmt: skip
            assert len(cat) <= 2  # the transient and at most one false detection


def test_blank_sky_falls_back_to_the_psf_kernel():
    p = make_pair(stars=False)
    d = difference_exposure(p.science, p.patches, p.wcs, p.zero_point, p.fwhm)
    assert "KERNEL_FIT_FAILED" in d.flags and d.kernel_info["method"] == "gaussian-from-psf-fwhm"
    check_noise(d, d.mask == 0)
    # without any FWHM the stage measures none on blank sky and uses a delta kernel, still flagged
    t = warp_template(p.patches, p.wcs, p.science.shape, p.zero_point)
    d2 = subtract(p.science, *t, None, None)
    assert "KERNEL_FIT_FAILED" in d2.flags and d2.kernel_info["method"] == "delta"
    check_noise(d2, d2.mask == 0)


def test_partial_and_missing_template_coverage():
    p = make_pair()
    img, var, msk = warp_template(p.patches, p.wcs, p.science.shape, p.zero_point)
    img, var = img.copy(), var.copy()
    img[:, :200] = np.nan  # the template covers only the right part
    msk = msk.copy()
    msk[:, :200] |= int(MaskBit.NO_DATA)
    d = subtract(p.science, img, var, msk, p.fwhm, 3.75)
    assert "PARTIAL_TEMPLATE_COVERAGE" in d.flags
    assert d.metrics["template_coverage"] == pytest.approx(1 - 200 / p.science.shape[1], abs=1e-6)
    nd = (d.mask & MaskBit.NO_DATA) != 0
    assert nd[:, :200].all() and np.isnan(d.image[nd]).all() and not nd[:, 260:].any()
    ok = blank_pixels(p, d)
    check_noise(d, ok)
    # a patch elsewhere on the sky: no coverage, a flagged all-NO_DATA result
    far = make_pair(shift_patch=5)
    d = difference_exposure(p.science, far.patches, p.wcs, p.zero_point, p.fwhm)
    assert d.flags == ("NO_TEMPLATE_COVERAGE",) and np.isnan(d.image).all()
    assert ((d.mask & MaskBit.NO_DATA) != 0).all() and d.metrics["template_coverage"] == 0.0
    d = difference_exposure(p.science, [], p.wcs, p.zero_point, p.fwhm)
    assert d.flags == ("NO_TEMPLATE_COVERAGE",)
    # a template with a border beyond the frame, missing 20 of its 25 border columns on the left: the
    # frame's first columns are within the kernel's reach of the gap and become NO_DATA
    img, var, msk = warp_template(p.patches, p.wcs, p.science.shape, p.zero_point, border=25)
    img = img.copy()
    img[:, :20] = np.nan
    d = subtract(p.science, img, var, msk, p.fwhm, 3.75, template_border=25)
    half = d.kernel_info["kernel_half"]
    nd = (d.mask & MaskBit.NO_DATA) != 0
    assert d.flags == () and nd[:, : half - 5].all() and not nd[:, 3 * half :].any()
    assert np.isfinite(d.image[d.mask == 0]).all()
    with pytest.raises(ValueError, match="border of 3 pixels"):
        subtract(p.science, img, var, msk, p.fwhm, 3.75, template_border=3)


def test_nan_block_and_masked_science_pixels():
    p = make_pair()
    sci = p.science
    image = sci.image.copy()
    mask = sci.mask.copy()
    image[100:140, 300:360] = np.nan
    mask[400:410, :] |= int(MaskBit.SAT)
    mask[p.science.image > 5 * np.sqrt(p.science.variance)] |= int(MaskBit.DETECTED)  # the calexp's detections
    exp = Exposure(image, sci.variance, mask)
    d = difference_exposure(exp, p.patches, p.wcs, p.zero_point, p.fwhm)
    assert "KERNEL_FIT_FAILED" not in d.flags
    assert ((d.mask[100:140, 300:360] & MaskBit.NO_DATA) != 0).all()
    assert ((d.mask[400:410, 40:-40] & MaskBit.SAT) != 0).all()
    assert np.isfinite(d.image[d.mask == 0]).all()
    assert not (d.mask & (MaskBit.DETECTED | MaskBit.DETECTED_NEGATIVE)).any() and d.kernel_info["n_stamps"] >= 5


def test_inputs_unmodified_and_errors(pair):
    sci = pair.science
    ro = Exposure(*(np.asarray(a).copy() for a in (sci.image, sci.variance, sci.mask)))
    for a in (ro.image, ro.variance, ro.mask):
        a.flags.writeable = False
    img, var, msk = warp_template(pair.patches, pair.wcs, sci.shape, pair.zero_point)
    for a in (img, var, msk):
        a.flags.writeable = False
    d = subtract(ro, img, var, msk, pair.fwhm, 3.75)
    assert d.flags == ()
    with pytest.raises(ValueError, match="differ from the science"):
        subtract(sci, img[:10], var, msk, pair.fwhm, 3.75)
    with pytest.raises(ValueError, match="positive number"):
        subtract(sci, img, var, msk, -1.0, 3.75)
    with pytest.raises(ValueError, match="mode"):
        DifferenceConfig(mode="zogy")
    with pytest.raises(ValueError, match="spatial_order"):
        DifferenceConfig(spatial_order=5)
    with pytest.raises(ValueError, match="min_kernel_stars"):
        DifferenceConfig(min_kernel_stars=0)
    with pytest.raises(ValueError, match="unknown mask bit"):
        DifferenceConfig(bad_mask_bits=("SATURATED",))
    with pytest.raises(ValueError, match="zero point"):
        warp_template(pair.patches, pair.wcs, sci.shape, float("nan"))


def test_read_template_patches_from_a_repository(tmp_path, pair):
    repo = Repository(tmp_path / "repo")
    repo.create({"camera": "mini", "seed": 7})
    scale = 0.2
    for k, p in enumerate(pair.patches):
        path = repo.template_path(BAND, 0, f"{k},0")
        write_template(path, p.image, p.variance, p.wcs, BAND, 0, f"{k},0", scale)
        ra, dec = p.wcs.all_pix2world(p.image.shape[1] / 2, p.image.shape[0] / 2, 0)
        repo.register_template(BAND, 0, f"{k},0", path, float(ra), float(dec), p.image.shape[0])
    cra, cdec = pair.wcs.all_pix2world(255.5, 249.5, 0)
    got = read_template_patches(repo, BAND, float(cra), float(cdec), 0.02)
    assert len(got) == len(pair.patches)
    np.testing.assert_array_equal(got[0].image, pair.patches[0].image)
    assert got[0].psf_fwhm_pix == pytest.approx(3.75) and got[0].mask is None  # an all-good mask is not kept
    assert read_template_patches(str(repo.root), "g", float(cra), float(cdec), 0.02) == []
    assert read_template_patches(repo, BAND, float(cra) + 5, float(cdec), 0.02) == []
    paths = [repo.template_path(BAND, 0, "0,0")]
    assert len(read_template_patches(paths, BAND, float(cra), float(cdec), 0.05)) == 1
    with pytest.raises(FileNotFoundError):
        read_template_patches([tmp_path / "nope.fits"], BAND, 0.0, 0.0, 1.0)
    bad = tmp_path / "bad.fits"
    fits.HDUList([fits.PrimaryHDU(np.zeros((4, 4)))]).writeto(bad)
    with pytest.raises(ValueError, match="IMAGE/VARIANCE"):
        read_template_patches([bad], BAND, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("layout", ["plain", "scaled-variance", "tiled-mask", "one-tile-mask"])
def test_template_cut_is_the_same_pixels_whatever_the_storage(tmp_path, pair, layout):
    # a CCD's footprint reads only part of a patch: by plain reads of the cut's rows (plain planes), astropy's
    # section (scaled planes, compressed planes of one or many tiles); the pixels must be the file's own
    p = pair.patches[0]
    ny, nx = p.image.shape
    rng = np.random.default_rng(4)
    hdr = p.wcs.to_header()
    image = rng.normal(0, 1, (ny, nx)).astype(np.float32)
    variance = rng.uniform(1, 2, (ny, nx)).astype(np.float32)
    mask = rng.integers(0, 1 << 12, (ny, nx)).astype(np.int32)
    primary = fits.PrimaryHDU()
    primary.header.update({"BAND": BAND, "PSFFWHM": 0.75, "PIXSCALE": 0.2})
    hdus = [primary, fits.ImageHDU(image, header=hdr, name="IMAGE")]
    if layout == "scaled-variance":  # 16-bit integers with BSCALE/BZERO: astropy scales on read
        v = fits.ImageHDU(np.round((variance - 1.5) * 20000).astype(np.int16), header=hdr, name="VARIANCE")
        v.header["BSCALE"], v.header["BZERO"] = 1 / 20000, 1.5
        hdus.append(v)
        variance = (np.round((variance - 1.5) * 20000).astype(np.int16) / 20000 + 1.5).astype(np.float32)
    else:
        hdus.append(fits.ImageHDU(variance, header=hdr, name="VARIANCE"))
    tile = {"tiled-mask": (64, 64), "one-tile-mask": (ny, nx)}.get(layout)
    if tile:
        hdus.append(fits.CompImageHDU(mask, header=hdr, name="MASK", compression_type="RICE_1", tile_shape=tile))
    else:
        hdus.append(fits.ImageHDU(mask, header=hdr, name="MASK"))
    path = tmp_path / f"{layout}.fits"
    fits.HDUList(hdus).writeto(path)
    px, py = np.array([150.0, 330.0, 330.0, 150.0]), np.array([140.0, 140.0, 300.0, 300.0])
    fra, fdec = p.wcs.all_pix2world(px, py, 0)
    ra, dec = p.wcs.all_pix2world(nx / 2, ny / 2, 0)
    (got,) = read_template_patches([path], BAND, float(ra), float(dec), 0.05, footprint=(fra, fdec), margin=10)
    x0, y0 = (np.round(p.wcs.wcs.crpix - got.wcs.wcs.crpix)).astype(int)
    h, w = got.image.shape
    assert abs(x0 - 140) <= 1 and abs(y0 - 130) <= 1 and 201 <= w <= 203 and 181 <= h <= 183  # the cut, not all
    np.testing.assert_array_equal(got.image, image[y0 : y0 + h, x0 : x0 + w])
    np.testing.assert_allclose(got.variance, variance[y0 : y0 + h, x0 : x0 + w], rtol=1e-6)
    np.testing.assert_array_equal(got.mask, mask[y0 : y0 + h, x0 : x0 + w])
    # flags only outside the part read: the patch comes without a mask (a worker holds no plane of zeros)
    hdus[-1].data[y0 - 2 : y0 + h + 2, x0 - 2 : x0 + w + 2] = 0
    fits.HDUList(hdus).writeto(path, overwrite=True)
    (clean,) = read_template_patches([path], BAND, float(ra), float(dec), 0.05, footprint=(fra, fdec), margin=10)
    assert clean.mask is None and hdus[-1].data.any()
    np.testing.assert_array_equal(clean.image, got.image)


def test_template_patch_headers_are_read_once_per_process(tmp_path, pair, monkeypatch):
    """A worker asks for a CCD's templates every visit: the patches' headers are parsed once, only the
    overlapping patches are opened again for their pixels, and a patch rewritten in place is read afresh."""
    import lsstpipe.pipelines.templates as tmod

    repo = Repository(tmp_path / "repo")
    repo.create({"camera": "mini", "seed": 7})
    for k, p in enumerate(pair.patches):
        path = repo.template_path(BAND, 0, f"{k},0")
        write_template(path, p.image, p.variance, p.wcs, BAND, 0, f"{k},0", 0.2)
        ra, dec = p.wcs.all_pix2world(p.image.shape[1] / 2, p.image.shape[0] / 2, 0)
        repo.register_template(BAND, 0, f"{k},0", path, float(ra), float(dec), p.image.shape[0])
    cra, cdec = pair.wcs.all_pix2world(255.5, 249.5, 0)
    first = read_template_patches(repo, BAND, float(cra), float(cdec), 0.02)
    opened = []
    real_open = fits.open
    monkeypatch.setattr(fits, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    again = read_template_patches(repo, BAND, float(cra), float(cdec), 0.02)
    assert len(opened) == len(first)  # pixels only, no header pass
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.image, b.image)
        assert a.wcs.to_header() == b.wcs.to_header()
    assert read_template_patches(repo, BAND, float(cra) + 5, float(cdec), 0.02) == []
    assert len(opened) == len(first)  # nothing overlaps: nothing opened
    p0 = pair.patches[0]
    path0 = repo.template_path(BAND, 0, "0,0")
    write_template(path0, p0.image + 1, p0.variance, p0.wcs, BAND, 0, "0,0", 0.3)  # rewritten: new PSF scale
    os.utime(path0, ns=(time.time_ns(), time.time_ns() + 10**9))
    n_keys = len(tmod._PATCH_INFO)
    third = read_template_patches(repo, BAND, float(cra), float(cdec), 0.02)
    assert len(tmod._PATCH_INFO) == n_keys + 1
    np.testing.assert_array_equal(third[0].image, p0.image + 1)
    assert third[0].psf_fwhm_pix != first[0].psf_fwhm_pix


@pytest.mark.slow
def test_full_size_ccd_false_detections_and_noise():
    """A full-size LSSTCam CCD of static sky (stars at their mean flux): ≤ 10 false ≥ 5σ detections, mean ≈ 0
    and the noise matching the variance plane within 5 %."""
    p = make_pair(camera_name="lsstcam", detector="R22_S11", seeing=0.9)
    d = difference_exposure(p.science, p.patches, p.wcs, p.zero_point, p.fwhm)
    assert d.flags == ()
    check_noise(d, blank_pixels(p, d))
    cat = detect_and_measure(d.image, d.variance, d.mask, psf_fwhm=p.fwhm, threshold=5.0, negative=True,
                             subtract_background=False)  # fmt: skip
    assert len(cat) <= 10, cat[["x", "y", "snr", "sign"]]
    p = make_pair(camera_name="lsstcam", detector="R22_S11", seeing=0.9, stars=False)
    d = difference_exposure(p.science, p.patches, p.wcs, p.zero_point, p.fwhm)
    check_noise(d, d.mask == 0)
    cat = detect_and_measure(d.image, d.variance, d.mask, psf_fwhm=p.fwhm, threshold=5.0, negative=True,
                             subtract_background=False)  # fmt: skip
    assert len(cat) <= 10
