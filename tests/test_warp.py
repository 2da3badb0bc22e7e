"""Lanczos-3 warping (kernels.warp) against the slow reference, analytic images, flux conservation, the
coarse-grid interpolation error on a real CCD WCS, and the noise transfer of interpolated white noise."""

import numpy as np
import pytest
from naive_warp import warp as naive_warp

from kernels.arrays import readonly
from kernels.warp import (
    NO_DATA,
    _source_flags,
    _target_box,
    grid_nodes,
    lanczos_noise_power,
    lanczos_weights,
    warp_image,
)


def affine_grid(shape, step, a, b, c, d, x0, y0, quad=0.0):
    """Source coordinates of the coarse nodes for sx = x0 + a x + b y (+ quad x²), sy = y0 + c x + d y."""
    xs, ys = grid_nodes(shape, step)
    X, Y = np.meshgrid(xs, ys)
    return x0 + a * X + b * Y + quad * X**2, y0 + c * X + d * Y


def rotation(theta, scale=1.0):
    c, s = np.cos(theta) * scale, np.sin(theta) * scale
    return c, -s, s, c


@pytest.mark.parametrize("mode", ["density", "pixel"])
@pytest.mark.parametrize("conserve", [True, False])
def test_against_reference_with_edges_nan_inf_and_mask(mode, conserve):
    rng = np.random.default_rng(4)
    src = rng.normal(10, 3, (40, 45)).astype(np.float32)
    var = rng.uniform(1, 2, src.shape).astype(np.float32)
    mask = np.zeros(src.shape, np.int32)
    src[12, 20] = np.nan
    var[30, 8] = np.inf
    mask[5, 33] = 4  # BAD: propagates
    mask[25, 25] = NO_DATA  # unusable
    shape, step = (37, 41), 8
    # rotated, shifted, slightly scaled and curved: part of the target falls outside the source (edges)
    gx, gy = affine_grid(shape, step, *rotation(0.3, 1.01), 6.3, -3.7, quad=1e-3)
    ins = [readonly(a) for a in (src, var, mask, gx, gy)]
    got = warp_image(*ins[:3], ins[3], ins[4], step, shape, conserve_flux=conserve, variance_mode=mode)
    ref_i, ref_v, ref_m = naive_warp(src, var, mask, gx, gy, step, shape, conserve, mode)
    np.testing.assert_array_equal(got.mask, ref_m)
    np.testing.assert_array_equal(np.isnan(got.image), np.isnan(ref_i))
    assert 0.2 < np.isnan(ref_i).mean() < 0.8  # edges and the bad pixels' neighbourhoods are exercised
    np.testing.assert_allclose(got.image, ref_i, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got.variance, ref_v, rtol=2e-5, atol=2e-5)
    assert ((got.mask & 4) != 0).sum() > 0 and ((got.mask & NO_DATA) != 0).sum() > 0


@pytest.mark.parametrize("dtypes", [(np.float32, np.float32), (np.float64, np.float32), (np.float32, np.float64)])
def test_source_flags_match_numpy(dtypes):
    """The one-pass scan that decides which summed-area tables a source needs says what numpy says: any mask
    bit (both tables), any non-finite image or variance pixel (NaN, +inf, -inf, in either plane, anywhere: the
    unusable-pixel table), on inputs it leaves untouched."""
    rng = np.random.default_rng(11)
    shape = (37, 53)  # rows of odd length: the vectorised loop's remainder is exercised
    for trial in range(60):
        img = rng.normal(0, 3, shape).astype(dtypes[0])
        var = rng.uniform(0.5, 2, shape).astype(dtypes[1])
        msk = np.zeros(shape, np.int32)
        kind = trial % 6
        y, x = rng.integers(shape[0]), rng.integers(shape[1])
        if kind == 1:
            img[y, x] = [np.nan, np.inf, -np.inf][trial % 3]
        elif kind == 2:
            var[y, x] = [np.nan, np.inf, -np.inf][trial % 3]
        elif kind == 3:
            msk[y, x] = 1 << int(rng.integers(0, 31))
        elif kind == 4:
            img[y, x], msk[shape[0] - 1, shape[1] - 1] = np.nan, 4
        elif kind == 5:
            img[:] = np.finfo(dtypes[0]).max  # huge but finite
        before = (img.copy(), var.copy(), msk.copy())
        want_bad = not (np.isfinite(img).all() and np.isfinite(var).all())
        assert _source_flags(*readonly_all(img, var, msk)) == (bool(msk.any()), want_bad or bool(msk.any()))
        assert _source_flags(*readonly_all(img, var, np.zeros((1, 1), np.int32))) == (False, want_bad)
        for a, b in zip((img, var, msk), before):
            np.testing.assert_array_equal(a, b)


def readonly_all(*arrays):
    return tuple(readonly(a) for a in arrays)


@pytest.mark.parametrize(
    "src_shape, offset",
    [((30, 25), (-7.77, -71.22)), ((7, 7), (-24.5, -83.47))],  # a rotated patch; one inside one grid cell
)
def test_only_the_box_a_source_can_reach_is_scanned(src_shape, offset):
    """The kernel scans only the target box the source can cover (``_target_box``): it must hold every
    covered pixel, including those of a source too small to contain any grid node."""
    rng = np.random.default_rng(7)
    src = rng.normal(5, 1, src_shape).astype(np.float32)
    var = np.ones(src_shape, np.float32)
    shape, step = (120, 130), 16
    gx, gy = affine_grid(shape, step, *rotation(0.6), *offset)
    gx[0, 0] = np.nan  # a node without a source position: its cells cover nothing
    got = warp_image(src, var, None, gx, gy, step, shape)
    ref_i, ref_v, ref_m = naive_warp(src, var, np.zeros(src_shape, np.int32), gx, gy, step, shape, True, "density")
    covered = ~np.isnan(ref_i)
    assert 0 < covered.sum() < 0.2 * covered.size
    np.testing.assert_array_equal(np.isnan(got.image), ~covered)
    np.testing.assert_array_equal(got.mask, ref_m)
    np.testing.assert_allclose(got.image[covered], ref_i[covered], rtol=2e-5)
    np.testing.assert_allclose(got.variance[covered], ref_v[covered], rtol=2e-5)
    y0, y1, x0, x1 = _target_box(gx, gy, step, src_shape, shape)
    ys, xs = np.nonzero(covered)
    assert y0 <= ys.min() and ys.max() < y1 and x0 <= xs.min() and xs.max() < x1
    assert (y1 - y0) * (x1 - x0) < 0.5 * covered.size  # the rest of the target is not scanned
    assert _target_box(gx + 1e4, gy, step, src_shape, shape) == (0, 0, 0, 0)  # nowhere near: nothing


def test_constant_image_stays_constant_and_integer_input():
    src = np.full((30, 30), 7, np.int16)
    shape, step = (20, 20), 4
    gx, gy = affine_grid(shape, step, *rotation(1.1), 15.2, 3.3)
    out = warp_image(src, np.ones(src.shape), None, gx, gy, step, shape, conserve_flux=False)
    ok = ~np.isnan(out.image)
    assert ok.sum() > 100
    np.testing.assert_allclose(out.image[ok], 7.0, rtol=1e-6)
    # with flux conservation a pure rotation has unit Jacobian; a 2 % scale has 1.02² per pixel
    gx, gy = affine_grid(shape, step, *rotation(1.1, 1.02), 15.2, 3.3)
    out = warp_image(src, np.ones(src.shape), None, gx, gy, step, shape)
    np.testing.assert_allclose(out.image[~np.isnan(out.image)], 7.0 * 1.02**2, rtol=1e-5)


def test_analytic_image_shift_and_rotation():
    """A smooth image (a σ = 3 px Gaussian on a low-frequency wave) is recovered at the exact source positions
    to < 0.5 % of its peak (Lanczos-3's own interpolation error: 0.32 % measured)."""
    n = 96
    Y, X = np.mgrid[0:n, 0:n].astype(float)

    def f(x, y):
        return 100 * np.exp(-((x - 47.3) ** 2 + (y - 45.1) ** 2) / (2 * 3.0**2)) + 5 * np.sin(0.2 * x + 0.1 * y)

    src = f(X, Y)
    shape, step = (40, 40), 8
    for theta, x0, y0 in ((0.0, 27.25, 25.6), (0.7, 45.0, 18.0)):
        gx, gy = affine_grid(shape, step, *rotation(theta), x0, y0)
        out = warp_image(src, np.ones_like(src), None, gx, gy, step, shape, conserve_flux=False)
        xs, ys = np.meshgrid(np.arange(40.0), np.arange(40.0))
        a, b, c, d = rotation(theta)
        truth = f(x0 + a * xs + b * ys, y0 + c * xs + d * ys)
        assert not np.isnan(out.image).any()
        assert np.max(np.abs(out.image - truth)) < 5e-3 * 100


def test_flux_conservation_of_a_star_under_scale_and_rotation():
    n = 80
    Y, X = np.mgrid[0:n, 0:n].astype(float)
    sigma = 2.0
    star = 1e4 * np.exp(-((X - 40.2) ** 2 + (Y - 39.6) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    shape, step = (60, 60), 16
    scale = 0.97  # target pixels are 3 % smaller in each axis
    gx, gy = affine_grid(shape, step, *rotation(0.4, scale), 0.0, 0.0)
    # centre the target on the star
    gx += 40.2 - gx[2, 2] + 0.0
    gy += 39.6 - gy[2, 2]
    out = warp_image(star, np.ones_like(star), None, gx, gy, step, shape)
    assert abs(np.nansum(out.image) / 1e4 - 1) < 1e-4
    plain = warp_image(star, np.ones_like(star), None, gx, gy, step, shape, conserve_flux=False)
    assert abs(np.nansum(plain.image) / 1e4 - 1 / scale**2) < 1e-3


def test_grid_interpolation_error_on_an_lsstcam_ccd():
    """The bilinear interpolation of an exact TAN-SIP → TAN mapping on 32-pixel nodes errs by < 1e-4 pixel
    (a corner LSSTCam CCD, the simulator's optical distortion, a template tract at the field centre)."""
    from naive_warp import bilinear

    from lsstpipe.camera import get_camera
    from lsstpipe.sim.templates import tract_wcs
    from lsstpipe.sim.wcs import DetectorSkyModel

    camera = get_camera("lsstcam")
    det = camera.science[0]
    model = DetectorSkyModel.build(camera, det, 150.0, -30.0, 37.0)
    wcs = model.fit_tan_sip()
    tract = tract_wcs(150.0, -30.0, camera.pixel_scale_arcsec)
    shape, step = det.shape, 32
    xs, ys = grid_nodes(shape, step)
    ra, dec = wcs.all_pix2world(*np.meshgrid(xs, ys), 0)
    gx, gy = tract.all_world2pix(ra, dec, 0)
    rng = np.random.default_rng(1)
    px, py = rng.uniform(0, shape[1] - 1, 300), rng.uniform(0, shape[0] - 1, 300)
    ex, ey = tract.all_world2pix(*wcs.all_pix2world(px, py, 0), 0)
    err = [
        np.hypot(bilinear(gx, step, x, y)[0] - a, bilinear(gy, step, x, y)[0] - b) for x, y, a, b in zip(px, py, ex, ey)
    ]
    assert max(err) < 1e-4


def test_noise_transfer_matches_warped_white_noise():
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((300, 300))
    shape, step = (250, 250), 10
    gx, gy = affine_grid(shape, step, *rotation(0.37), 20.0, 10.0)
    pix = warp_image(noise, np.ones_like(noise), None, gx, gy, step, shape, variance_mode="pixel")
    dens = warp_image(noise, np.ones_like(noise), None, gx, gy, step, shape, variance_mode="density")
    f = np.fft.fftfreq(256)
    p = lanczos_noise_power(f)
    assert lanczos_noise_power(np.array([0.0]))[0] == pytest.approx(1.0, abs=1e-12)
    expected = p.mean() ** 2  # per-pixel variance of 2-D interpolated unit white noise, phase-averaged
    measured = np.nanvar(pix.image)
    assert measured == pytest.approx(expected, rel=0.03)
    assert np.nanmean(pix.variance) == pytest.approx(expected, rel=0.03)
    np.testing.assert_allclose(dens.variance[~np.isnan(dens.variance)], 1.0, rtol=1e-6)


def test_weights_and_out_planes():
    w = lanczos_weights(0.5)
    assert w.sum() == pytest.approx(1.0) and w[2] == pytest.approx(w[3])
    np.testing.assert_allclose(lanczos_weights(0.0), [0, 0, 1, 0, 0, 0])
    src = np.arange(400, dtype=np.float32).reshape(20, 20)
    shape, step = (10, 10), 4
    left, _ = affine_grid(shape, step, 1, 0, 0, 1, 3.0, 3.0)
    out = warp_image(src, np.ones_like(src), None, left, affine_grid(shape, step, 1, 0, 0, 1, 3.0, 3.0)[1], step, shape)
    np.testing.assert_allclose(out.image, src[3:13, 3:13])  # integer shift: exact copy
    # a second source fills only what is still NO_DATA
    first = warp_image(src, np.ones_like(src), None, *affine_grid(shape, step, 1, 0, 0, 1, 8.0, 3.0), step, shape)
    assert np.isnan(first.image).any()
    filled = warp_image(src + 1000, np.ones_like(src), None, *affine_grid(shape, step, 1, 0, 0, 1, 2.0, 3.0), step,
                        shape, out=first)  # fmt: skip
    assert not np.isnan(filled.image).any()
    ok = ~np.isnan(
        warp_image(src, np.ones_like(src), None, *affine_grid(shape, step, 1, 0, 0, 1, 8.0, 3.0), step, shape).image
    )
    np.testing.assert_allclose(filled.image[ok], src[3:13, 8:18][ok])
    assert (filled.image[~ok] >= 1000).all()


def test_errors():
    src = np.zeros((10, 10), np.float32)
    gx, gy = affine_grid((8, 8), 4, 1, 0, 0, 1, 0, 0)
    with pytest.raises(ValueError, match="coarse grid"):
        warp_image(src, src, None, gx[:1], gy, 4, (8, 8))
    with pytest.raises(ValueError, match="variance has shape"):
        warp_image(src, src[:5], None, gx, gy, 4, (8, 8))
    with pytest.raises(ValueError, match="variance_mode"):
        warp_image(src, src, None, gx, gy, 4, (8, 8), variance_mode="nope")
    with pytest.raises(ValueError, match="step"):
        grid_nodes((8, 8), 0)
    with pytest.raises(ValueError, match="integer array"):
        warp_image(src, src, src, gx, gy, 4, (8, 8))
