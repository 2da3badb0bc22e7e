"""Measurement kernels against loop/numpy references: exact apertures, windowed centroid, PSF flux, moments."""

import math

import numpy as np
import pytest
from extras import need_extra
from scipy import ndimage
from scipy.special import erf

from kernels import measure as M
from kernels.detect import find_footprints, matched_filter

FWHM = 4.0
SIGMA = FWHM / 2.3548200450309493


# ------------------------------------------------------------------------------------------ references
def overlap_ref(x0, x1, y0, y1, r, n=400):
    """Area of a rectangle inside a circle by an n×n midpoint grid."""
    xs = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
    ys = y0 + (np.arange(n) + 0.5) * (y1 - y0) / n
    return float((xs[None, :] ** 2 + ys[:, None] ** 2 < r * r).mean() * (x1 - x0) * (y1 - y0))


def aperture_ref(data, var, xc, yc, r, n=200):
    flux = fvar = 0.0
    for y in range(data.shape[0]):
        for x in range(data.shape[1]):
            if (abs(x - xc) - 0.5) ** 2 + (abs(y - yc) - 0.5) ** 2 > r * r and abs(x - xc) > 1 and abs(y - yc) > 1:
                continue
            w = overlap_ref(x - 0.5 - xc, x + 0.5 - xc, y - 0.5 - yc, y + 0.5 - yc, r, n)
            if w and np.isfinite(data[y, x]):
                flux += w * data[y, x]
                fvar += w * var[y, x]
    return flux, math.sqrt(fvar)


def windowed_centroid_ref(data, x, y, sigma, sign=1.0, iters=10):
    Y, X = np.mgrid[0 : data.shape[0], 0 : data.shape[1]]
    d = np.where(np.isfinite(data), data, 0.0) * sign
    R = math.ceil(4 * sigma) + 1
    for _ in range(iters):
        ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
        box = (abs(X - ix) <= R) & (abs(Y - iy) <= R)
        w = np.exp(-((X - x) ** 2 + (Y - y) ** 2) / (2 * sigma**2)) * d * box
        dx, dy = 2 * (w * (X - x)).sum() / w.sum(), 2 * (w * (Y - y)).sum() / w.sum()
        x, y = x + dx, y + dy
        if dx * dx + dy * dy < 1e-6:
            break
    return x, y


def psf_flux_ref(data, var, x, y, sigma):
    R = math.ceil(4 * sigma) + 1
    ix, iy = math.floor(x + 0.5), math.floor(y + 0.5)
    s = sigma * math.sqrt(2)
    i = np.arange(-R, R + 1)
    px = 0.5 * (erf((ix + i + 0.5 - x) / s) - erf((ix + i - 0.5 - x) / s))
    py = 0.5 * (erf((iy + i + 0.5 - y) / s) - erf((iy + i - 0.5 - y) / s))
    P = py[:, None] * px[None, :]
    D = data[iy - R : iy + R + 1, ix - R : ix + R + 1]
    V = var[iy - R : iy + R + 1, ix - R : ix + R + 1]
    return (P * D).sum() / (P * P).sum(), math.sqrt((P * P * V).sum()) / (P * P).sum()


def moments_ref(data, pixels, sign=1.0):
    ys, xs = np.array(pixels).T
    w = np.maximum(sign * data[ys, xs], 0)
    xb, yb = (w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()
    return ((w * (xs - xb) ** 2).sum() / w.sum(), (w * (ys - yb) ** 2).sum() / w.sum(),
            (w * (xs - xb) * (ys - yb)).sum() / w.sum())  # fmt: skip


def gaussian_image(shape, sources, sigma=SIGMA):
    """Pixel-integrated Gaussians: sources = [(x, y, flux), ...]."""
    img = np.zeros(shape)
    s = sigma * math.sqrt(2)
    X, Y = np.arange(shape[1]), np.arange(shape[0])
    for x, y, f in sources:
        px = 0.5 * (erf((X + 0.5 - x) / s) - erf((X - 0.5 - x) / s))
        py = 0.5 * (erf((Y + 0.5 - y) / s) - erf((Y - 0.5 - y) / s))
        img += f * py[:, None] * px[None, :]
    return img


def detect(img, var, threshold=5.0, negative=True):
    sn = matched_filter(np.array(img, np.float64), var, FWHM)
    return find_footprints(sn, threshold, negative=negative)


def readonly(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("r", [0.3, 1.0, 2.7, 5.5])
def test_circle_rect_overlap_matches_grid(r):
    rng = np.random.default_rng(int(r * 10))
    pts = np.empty(6)
    for _ in range(60):
        x0, y0 = rng.uniform(-r - 1, r), rng.uniform(-r - 1, r)
        x1, y1 = x0 + rng.uniform(0.1, 2), y0 + rng.uniform(0.1, 2)
        got = M.circle_rect_overlap(x0, x1, y0, y1, r, pts)
        assert got == pytest.approx(overlap_ref(x0, x1, y0, y1, r), abs=3 * (x1 - x0) * (y1 - y0) / 400)
    assert M.circle_rect_overlap(-10, 10, -10, 10, r, pts) == pytest.approx(math.pi * r * r, rel=1e-12)


def test_aperture_flux_matches_reference_and_edges():
    rng = np.random.default_rng(5)
    data = rng.normal(0, 1, (24, 26))
    var = rng.uniform(1, 2, data.shape)
    data[12, 14] = np.nan
    readonly(data, var)
    xs = np.array([6.3, 13.7, 0.2, 25.0])
    ys = np.array([11.6, 12.1, 3.4, 23.5])
    flux, err, flags = M.aperture_flux(data, var, xs, ys, 3.3)
    for i in range(xs.size):
        f, e = aperture_ref(data, var, xs[i], ys[i], 3.3)
        assert flux[i] == pytest.approx(f, abs=0.02) and err[i] == pytest.approx(e, abs=0.02)
    assert flags[0] == 0 and flags[1] == M.BAD_PIXELS
    assert flags[2] & M.APERTURE_TRUNCATED and flags[3] & M.APERTURE_TRUNCATED


def test_aperture_flux_vs_sep_exact_overlap():
    """SEP's sum_circle with subpix=0 computes the same exact overlap; it rounds the pixel overlaps to
    ~1e-7 (single precision in its geometry), hence the tolerance."""
    sep = need_extra("sep")
    rng = np.random.default_rng(8)
    data = rng.normal(0, 1, (60, 70))
    xs, ys = rng.uniform(10, 60, 40), rng.uniform(10, 50, 40)
    flux, err, _ = M.aperture_flux(data, 2.0, xs, ys, 4.2)
    sflux, serr, _ = sep.sum_circle(data, xs, ys, 4.2, err=np.sqrt(2.0), subpix=0)
    np.testing.assert_allclose(flux, sflux, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(err, serr, rtol=1e-6)


def test_measure_matches_references_on_random_field():
    rng = np.random.default_rng(11)
    shape = (120, 150)
    srcs = [(30.3, 40.7, 3000.0), (90.6, 30.2, 800.0), (120.1, 95.4, 12000.0), (60.0, 85.5, 1500.0)]
    var = np.full(shape, 4.0)
    img = gaussian_image(shape, srcs) + rng.normal(0, 2, shape)
    img[rng.random(shape) < 0.003] = np.nan  # scattered NaN pixels, then clean, noiseless source cores
    for x, y, f in srcs:
        iy, ix = int(round(y)), int(round(x))
        img[iy - 2 : iy + 3, ix - 2 : ix + 3] = gaussian_image(shape, [(x, y, f)])[iy - 2 : iy + 3, ix - 2 : ix + 3]
    (img,) = readonly(img)
    var_before = var.copy()  # writable (one compiled specialisation fewer), checked unmodified below
    fp = detect(img, var)
    vals, flags = M.measure_footprints(img, var, fp, FWHM, 6.0)
    np.testing.assert_array_equal(var, var_before)
    assert len(fp) == len(srcs)
    for i in range(len(fp)):
        col = dict(zip(M.COLUMNS, vals[i]))
        rx, ry = windowed_centroid_ref(img, float(fp.peak_x[i]), float(fp.peak_y[i]), SIGMA)
        assert col["x"] == pytest.approx(rx, abs=2e-3) and col["y"] == pytest.approx(ry, abs=2e-3)
        good = np.where(np.isfinite(img), img, 0.0)
        pf, pe = psf_flux_ref(good, var, col["x"], col["y"], SIGMA)
        has_nan = flags[i] & M.BAD_PIXELS
        if not has_nan:
            assert col["psf_flux"] == pytest.approx(pf, rel=1e-9) and col["psf_flux_err"] == pytest.approx(pe)
        pixels = [(fp.span_y[s], x) for s in range(fp.offsets[i], fp.offsets[i + 1])
                  for x in range(fp.span_x0[s], fp.span_x1[s]) if np.isfinite(img[fp.span_y[s], x])]  # fmt: skip
        x2, y2, xy = moments_ref(img, pixels)
        assert (col["x2"], col["y2"], col["xy"]) == pytest.approx((x2, y2, xy), rel=1e-9, abs=1e-12)
        a, b = col["a"], col["b"]
        assert a >= b > 0 and a * a + b * b == pytest.approx(x2 + y2, rel=1e-9)
        f = min(srcs, key=lambda s: (s[0] - col["x"]) ** 2 + (s[1] - col["y"]) ** 2)
        assert col["psf_flux"] == pytest.approx(f[2], abs=4 * col["psf_flux_err"])


def test_noiseless_gaussian_centroid_and_fluxes_are_unbiased():
    srcs = [(20.0 + 0.13 * k + 20 * k, 25.37 + 0.21 * k, 1e4) for k in range(5)]
    img = gaussian_image((50, 130), srcs)
    (img,) = readonly(img)
    fp = detect(img, 1.0, negative=False)
    vals, flags = M.measure_footprints(img, 1.0, fp, FWHM, 5 * SIGMA)
    order = np.argsort(vals[:, 0])
    for (x, y, f), v in zip(srcs, vals[order]):
        col = dict(zip(M.COLUMNS, v))
        assert col["x"] == pytest.approx(x, abs=1e-3) and col["y"] == pytest.approx(y, abs=1e-3)
        assert col["psf_flux"] == pytest.approx(f, rel=1e-6)
        assert col["flux"] == pytest.approx(f, rel=1e-3)  # 5σ aperture: all but 4e-6 of the flux
    assert (flags == 0).all()


def test_negative_sources_edges_nan_and_saturation():
    shape = (80, 100)
    img = gaussian_image(shape, [(40.2, 40.1, 5e3), (2.0, 50.0, 5e3), (70.0, 20.0, 5e4)])
    img -= gaussian_image(shape, [(80.2, 60.5, 4e3)])
    img[40, 40] = np.nan  # NaN at a source centre
    sat = np.zeros(shape, bool)
    core = img > 400
    sat[core & (np.arange(shape[1])[None, :] > 60) & (np.arange(shape[0])[:, None] < 30)] = True
    img_sat = np.where(sat, 400.0, img)  # a clipped, saturated core
    readonly(img_sat, sat)
    fp = detect(np.where(np.isfinite(img_sat), img_sat, 0), 1.0)
    vals, flags = M.measure_footprints(img_sat, 1.0, fp, FWHM, 6.0, saturated=sat)
    by_x = {round(v[0]): (v, fl) for v, fl in zip(vals, flags)}
    assert set(by_x) == {40, 2, 70, 80}
    v, fl = by_x[80]
    assert fl & M.NEGATIVE and v[2] < 0 and v[4] < 0
    # the exact flag sets: at the edge, a NaN at the centre, a clipped saturated core, a negative source
    assert by_x[2][1] == M.EDGE | M.APERTURE_TRUNCATED
    assert by_x[40][1] == M.BAD_PIXELS and np.isfinite(by_x[40][0][:6]).all()
    assert by_x[70][1] == M.BAD_PIXELS | M.SATURATED
    assert fl == M.NEGATIVE
    assert np.isfinite(vals[:, :6]).all()


def test_trail_length_and_angle():
    L, ang = 30.0, math.radians(35)
    t = np.linspace(-L / 2, L / 2, 301)
    srcs = [(60 + s * math.cos(ang), 50 + s * math.sin(ang), 2e5 / t.size) for s in t]
    (img,) = readonly(gaussian_image((100, 120), srcs))
    fp = detect(img, 1.0, threshold=3.0, negative=False)
    vals, _ = M.measure_footprints(img, 1.0, fp, FWHM, 6.0)
    col = dict(zip(M.COLUMNS, vals[0]))
    assert len(fp) == 1
    assert col["trail_length"] == pytest.approx(L, rel=0.05)
    assert col["trail_angle"] == pytest.approx(ang, abs=0.01)
    assert col["b"] == pytest.approx(SIGMA, rel=0.1)


def test_blank_image_and_bad_arguments():
    (blank,) = readonly(np.zeros((30, 30)))
    fp = detect(blank, 1.0)
    vals, flags = M.measure_footprints(blank, 1.0, fp, FWHM, 3.0)
    assert vals.shape == (0, len(M.COLUMNS)) and flags.shape == (0,)
    with pytest.raises(ValueError, match="FWHM"):
        M.measure_footprints(np.zeros((30, 30)), 1.0, fp, -1.0, 3.0)
    with pytest.raises(ValueError, match="radius"):
        M.aperture_flux(np.zeros((30, 30)), 1.0, [1.0], [1.0], 0.0)
    with pytest.raises(ValueError, match="shape"):
        M.measure_footprints(np.zeros((30, 30)), np.ones((3, 3)), fp, FWHM, 3.0)


def test_labels_reference_for_windowed_window():
    """The footprints measured are those scipy labels (guards the span plumbing into measurement)."""
    rng = np.random.default_rng(3)
    (img,) = readonly(gaussian_image((60, 60), [(20, 20, 2000), (45, 40, 2000)]) + rng.normal(0, 1, (60, 60)))
    sn = matched_filter(img, 1.0, FWHM)
    labels, n = ndimage.label(sn >= 5, structure=np.ones((3, 3)))
    fp = find_footprints(sn, 5.0, negative=False)
    assert len(fp) == n
    vals, _ = M.measure_footprints(img, 1.0, fp, FWHM, 5.0)
    for v in vals:
        assert labels[int(round(v[1])), int(round(v[0]))] > 0
