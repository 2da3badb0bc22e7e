"""Background mesh statistics and spline surface against numpy/scipy references; NaN/inf, masks, edges."""

import numpy as np
import pytest
from scipy.interpolate import CubicSpline

from kernels.background import (
    clipped_std_correction,
    estimate_background,
    fill_and_filter,
    interpolate_mesh,
    mesh_centres,
    mesh_statistics,
    subtract_background,
)


# ------------------------------------------------------------------------------------------ references
def clipped_stats_ref(values, nsigma, iters):
    """Median/std clipping as the kernel defines it: stats of the current set, clip about the median."""
    v = np.asarray(values, np.float64)
    for it in range(iters + 1):
        med, std = np.median(v), v.std()
        if it == iters:
            break
        keep = (v >= med - nsigma * std) & (v <= med + nsigma * std)
        if keep.all() or keep.sum() < 2:
            break
        v = v[keep]
    return med, std, v.size


def mesh_ref(image, mask, box, nsigma=3.0, iters=5, min_fraction=0.5):
    ny, nx = image.shape
    my, mx = -(-ny // box), -(-nx // box)
    level, rms, count = np.zeros((my, mx)), np.zeros((my, mx)), np.zeros((my, mx), int)
    for j in range(my):
        for i in range(mx):
            cell = image[j * box : (j + 1) * box, i * box : (i + 1) * box]
            cm = mask[j * box : (j + 1) * box, i * box : (i + 1) * box]
            good = cell[(cm == 0) & np.isfinite(cell)]
            if good.size < max(np.ceil(min_fraction * cell.size), 2):
                continue
            level[j, i], rms[j, i], count[j, i] = clipped_stats_ref(good, nsigma, iters)
    return level, rms, count


def spline_ref(mesh, ty, tx, shape):
    """Natural bicubic spline, linear beyond the end knots, by scipy's CubicSpline along y then x."""

    def along(t, v, x):
        if t.size == 1:
            return np.full(x.shape + v.shape[1:], v[0], dtype=float)
        cs = CubicSpline(t, v, bc_type="natural", axis=0)
        out = cs(x)
        d = cs.derivative()
        for edge, sel in ((t[0], x < t[0]), (t[-1], x > t[-1])):
            out[sel] = cs(edge) + d(edge) * (x[sel] - edge)[(...,) + (None,) * (v.ndim - 1)]
        return out

    cols = along(ty, mesh, np.arange(shape[0], dtype=float))  # (ny, mx)
    return along(tx, cols.T, np.arange(shape[1], dtype=float)).T


def assert_mesh_close(level, rms, count, rl, rr, rc):
    """The kernel clips on a fine histogram: in full cells its median is within 1e-2 σ of the exact clipped
    median and its σ within 1 %; in cells of a few pixels (image edges), within the statistics' own noise
    (2σ/√n for the median, σ/√(2n) for σ), since a pixel on a clip limit may fall either side of a bin edge."""
    np.testing.assert_array_equal(count > 0, rc > 0)
    ok = rc > 0
    n = rc[ok]
    assert np.all(np.abs(level - rl)[ok] <= rr[ok] * (0.01 + 2 / np.sqrt(n)))
    assert np.all(np.abs(rms / np.where(ok, rr, 1) - 1)[ok] <= 0.01 + 1 / np.sqrt(2 * n))
    assert np.all(np.abs(count - rc)[ok] <= np.maximum(0.002 * n, 3))
    big = ok & (rc > 1000)
    assert np.all(np.abs(level - rl)[big] <= 0.01 * rr[big])
    np.testing.assert_allclose(rms[big], rr[big], rtol=0.01)


def readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("shape,box", [((200, 260), 64), ((130, 97), 32), ((64, 64), 64), ((50, 300), 128)])
def test_mesh_matches_numpy_reference(shape, box):
    rng = np.random.default_rng(sum(shape))
    img = rng.normal(100.0, 5.0, shape)
    stars = rng.random(shape) < 0.01
    img[stars] += rng.uniform(50, 5000, stars.sum())  # "stars"
    img[rng.random(shape) < 0.02] = np.nan
    img[rng.random(shape) < 0.005] = np.inf
    mask = (rng.random(shape) < 0.05).astype(np.int32)
    readonly(img, mask)
    level, rms, count = mesh_statistics(img, mask, box)
    rl, rr, rc = mesh_ref(img, mask, box)
    assert_mesh_close(level, rms, count, rl, rr, rc)


def test_float32_and_integer_images():
    rng = np.random.default_rng(3)
    img = rng.poisson(500, (96, 96)).astype(np.uint16)
    (img,) = readonly(img)
    level, rms, count = mesh_statistics(img, None, 32)
    rl, rr, rc = mesh_ref(img.astype(float), np.zeros(img.shape), 32)
    assert_mesh_close(level, rms, count, rl, rr, rc)
    f32 = img.astype(np.float32)
    np.testing.assert_allclose(mesh_statistics(f32, None, 32)[0], level, rtol=1e-6)


def test_constant_and_two_valued_cells():
    level, rms, count = mesh_statistics(np.full((64, 64), 7.5), None, 32)
    assert (level == 7.5).all() and (rms == 0).all() and (count == 1024).all()
    img = np.zeros((32, 32))
    img[:, ::2] = 1.0
    level, rms, _ = mesh_statistics(img, None, 32)
    # discrete data: the median interpolated in its bin lies between the two middle values (numpy: 0.5)
    assert 0.0 <= level[0, 0] <= 1.0 and rms[0, 0] == pytest.approx(0.5, rel=0.01)


@pytest.mark.parametrize("my,mx", [(1, 1), (1, 4), (3, 1), (2, 2), (5, 7)])
def test_spline_matches_scipy(my, mx):
    rng = np.random.default_rng(my * 10 + mx)
    shape = (my * 40 - 7, mx * 40 - 3)
    ty, tx = mesh_centres(shape[0], 40), mesh_centres(shape[1], 40)
    mesh = rng.normal(0, 3, (ty.size, tx.size))
    readonly(mesh, ty, tx)
    out = interpolate_mesh(mesh, ty, tx, shape, np.float64)
    np.testing.assert_allclose(out, spline_ref(mesh, ty, tx, shape), rtol=1e-10, atol=1e-10)


def test_spline_reproduces_linear_and_passes_knots():
    ty, tx = mesh_centres(300, 64), mesh_centres(250, 64)
    yy, xx = np.meshgrid(ty, tx, indexing="ij")
    plane = 3.0 + 0.01 * yy - 0.02 * xx
    out = interpolate_mesh(plane, ty, tx, (300, 250), np.float64)
    Y, X = np.mgrid[0:300, 0:250]
    np.testing.assert_allclose(out, 3.0 + 0.01 * Y - 0.02 * X, atol=1e-9)  # a plane is exact, edges too
    rng = np.random.default_rng(1)
    m = rng.normal(size=(4, 3))
    t_y, t_x = np.array([0.0, 10, 20, 30]), np.array([0.0, 10, 20])
    out = interpolate_mesh(m, t_y, t_x, (31, 21), np.float64)
    np.testing.assert_allclose(out[::10, ::10], m, atol=1e-12)


def test_fill_and_filter():
    v = np.arange(25, dtype=float).reshape(5, 5)
    valid = np.ones((5, 5), bool)
    valid[2, 2] = valid[0, 0] = False
    out = fill_and_filter(v, valid, filter_size=1)
    assert out[2, 2] == pytest.approx(np.mean([6, 7, 8, 11, 13, 16, 17, 18]))
    assert out[0, 0] == pytest.approx(np.mean([1, 5, 6]))
    big = np.zeros((5, 5))
    big[2, 2] = 1e6  # a cell biased by a big galaxy is removed by the median filter
    out = fill_and_filter(big, np.ones((5, 5), bool), filter_size=3)
    assert out.max() == 0
    with pytest.raises(ValueError, match="all NaN"):
        fill_and_filter(v, np.zeros((5, 5), bool))


def test_estimate_background_recovers_gradient_and_noise():
    rng = np.random.default_rng(7)
    Y, X = np.mgrid[0:512, 0:640]
    sky = 1000 + 0.05 * X - 0.03 * Y + 5e-5 * (X - 300) ** 2
    img = (sky + rng.normal(0, 10, sky.shape)).astype(np.float32)
    stars = rng.random(sky.shape) < 0.002
    img[stars] += 3000
    img[100:140, 200:260] = np.nan  # a NaN block
    (img,) = readonly(img)
    bkg = estimate_background(img, box=64, filter_size=1)  # a 3×3 median filter would flatten the curvature
    surf = bkg.image()
    assert surf.dtype == np.float32 and surf.shape == img.shape
    resid = (surf - sky)[8:-8, 8:-8]
    assert np.abs(resid).max() < 2.0  # well under the 10 e- noise
    assert abs(bkg.global_rms - 10) < 0.3  # clipping corrected
    assert np.isfinite(surf).all() and np.isfinite(bkg.rms_image()).all()
    assert clipped_std_correction(3.0) == pytest.approx(1.0135, abs=2e-4)


def test_subtract_background_is_image_minus_surface():
    rng = np.random.default_rng(12)
    img = (rng.normal(300, 4, (150, 170)) + np.arange(170) * 0.1).astype(np.float32)
    img[3, 4] = np.nan
    (img,) = readonly(img)
    bkg = estimate_background(img, box=32)
    out = subtract_background(img, bkg)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(out), np.isnan(img))
    np.testing.assert_allclose(out, img - bkg.image(np.float64), atol=2e-4, equal_nan=True)
    ints = subtract_background(np.round(np.nan_to_num(img)).astype(np.int16), bkg)
    assert ints.dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        subtract_background(img[:10], bkg)


def test_all_nan_or_masked_image_is_a_clear_error():
    with pytest.raises(ValueError, match="all NaN"):
        estimate_background(np.full((100, 100), np.nan))
    with pytest.raises(ValueError, match="masked"):
        estimate_background(np.zeros((100, 100)), mask=np.ones((100, 100), bool))
    with pytest.raises(ValueError, match="2-D"):
        estimate_background(np.zeros(10))


def test_partly_masked_image_fills_cells():
    rng = np.random.default_rng(2)
    img = rng.normal(50, 2, (256, 256))
    img[:128, :128] = np.nan  # four empty cells get their neighbours' level
    bkg = estimate_background(img, box=64)
    assert np.isfinite(bkg.level).all()
    assert np.abs(bkg.image() - 50).max() < 1.0
