"""Differencing kernels (kernels.diffim) against the slow references, and the statistics of the
decorrelation on pure noise."""

import numpy as np
import pytest
import scipy.fft
from naive_diffim import convolve_spatially_varying, decorrelation, dilate, peaks
from naive_diffim import convolve_stamps as naive_convolve_stamps

from kernels import diffim as K
from kernels.arrays import readonly


def test_spatial_terms_and_powers():
    assert K.spatial_powers(0) == [(0, 0)]
    assert K.spatial_powers(2) == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    t = K.spatial_terms(2, 0.5, -2.0)
    np.testing.assert_allclose(t, [1, 0.5, -2, 0.25, -1, 4])
    xn, yn = K.normalised_position([0, 9], [0, 4], (5, 10))
    np.testing.assert_allclose(xn, [-1, 1])
    np.testing.assert_allclose(yn, [-1, 1])
    with pytest.raises(ValueError):
        K.spatial_powers(-1)


def test_basis_and_stamp_convolution_match_2d_convolution():
    gx, gy = K.al_basis([1.0, 2.0], [2, 1], 4)
    assert gx.shape == (6 + 3, 9) and gy.shape == gx.shape
    rng = np.random.default_rng(0)
    stamps = readonly(rng.normal(size=(3, 21, 21)))
    got = K.convolve_stamps(stamps, gx, gy)
    ref = naive_convolve_stamps(stamps, gx, gy)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError):
        K.al_basis([1.0], [2, 2], 4)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_fft_spatial_convolution_matches_direct(order):
    rng = np.random.default_rng(order)
    img = rng.normal(size=(23, 31)).astype(np.float32)
    img[3, 4] = 50.0
    T = len(K.spatial_powers(order))
    kernels = rng.normal(size=(T, 7, 7)) * np.linspace(1, 0.2, T)[:, None, None]
    bg = rng.normal(size=T)
    fshape = K.fft_shape(img.shape, 6)
    got = K.convolve_spatial(readonly(img), readonly(kernels), order, fshape, background=bg)
    ref = convolve_spatially_varying(img, kernels, order, background=bg)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # an image with a 4-pixel border beyond the frame: the inner frame's result, with the border's pixels
    got = K.convolve_spatial(readonly(img), readonly(kernels), order, fshape, background=bg, border=4)
    ref = convolve_spatially_varying(img, kernels, order, background=bg, border=4)
    assert got.shape == (15, 23)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_kernel_spectrum_matches_numpy_fft():
    rng = np.random.default_rng(1)
    k = rng.normal(size=(9, 9))
    fshape = (20, 26)
    pad = np.zeros(fshape)
    pad[:9, :9] = k
    pad = np.roll(pad, (-4, -4), axis=(0, 1))
    np.testing.assert_allclose(K.kernel_spectrum(k, fshape), np.fft.rfft2(pad), rtol=1e-4, atol=1e-4)
    w = K.rfft_weights(fshape)
    assert w.sum() * fshape[0] == pytest.approx(1.0)  # the weighted half plane covers the full plane


def test_fit_recovers_a_known_kernel_and_flux_scale():
    """Stars convolved with a known (Gaussian, off-centre by 0.3 px, scaled by 0.9) kernel, small noise."""
    rng = np.random.default_rng(2)
    h, r = 6, 8
    n = 30
    S = 2 * (r + h) + 1
    yy, xx = np.mgrid[0:S, 0:S] - (S // 2)
    y_stamps = np.empty((n, S, S))
    for i in range(n):
        dx, dy = rng.uniform(-0.5, 0.5, 2)
        y_stamps[i] = rng.uniform(1e3, 1e4) * np.exp(-((xx - dx) ** 2 + (yy - dy) ** 2) / (2 * 1.5**2))
    u = np.arange(-h, h + 1)
    true = np.exp(-((u[None, :] - 0.3) ** 2 + u[:, None] ** 2) / (2 * 1.2**2))
    true *= 0.9 / true.sum()
    from scipy.signal import convolve2d

    x_stamps = np.array([convolve2d(s, true, mode="valid") for s in y_stamps])
    x_stamps += rng.normal(0, 0.01, x_stamps.shape)
    gx, gy = K.al_basis([0.6, 1.2, 2.4], [4, 2, 2], h)
    xn, yn = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    ins = [readonly(a) for a in (x_stamps, np.full(x_stamps.shape, 1e-4), y_stamps, np.full(y_stamps.shape, 1e-6))]
    sol = K.fit_kernel(*ins, xn, yn, gx, gy, spatial_order=1)
    assert sol.n_stamps >= 25
    k0 = sol.at(0.0, 0.0)
    assert k0.sum() == pytest.approx(0.9, rel=1e-3)
    assert np.abs(k0 - true).max() < 2e-3 * true.max() * 10
    # the spatial terms are ~0 for a constant kernel
    assert np.abs(sol.kernels[1:]).max() < 0.02 * true.max()
    with pytest.raises(ValueError, match="need at least"):
        K.fit_kernel(*[a[:2] for a in ins], xn[:2], yn[:2], gx, gy, spatial_order=1)


def test_spatial_order_is_chosen_by_the_stars():
    """Stars whose true kernel widens from left to right need a spatial order ≥ 1 (the width's square, hence
    the kernel, varies non-linearly: order 2 is chosen); a constant kernel needs 0."""
    rng = np.random.default_rng(8)
    h, r, n = 6, 8, 40
    S = 2 * (r + h) + 1
    yy, xx = np.mgrid[0:S, 0:S] - (S // 2)
    u = np.arange(-h, h + 1)
    xn, yn = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    gx, gy = K.al_basis([0.6, 1.2, 2.4], [4, 2, 2], h)
    from scipy.signal import convolve2d

    for slope, expected in ((0.3, 1), (0.0, 0)):
        y_stamps = np.array([rng.uniform(2e3, 2e4) * np.exp(-(xx**2 + yy**2) / (2 * 1.5**2)) for _ in range(n)])
        x_stamps = np.empty((n, 2 * r + 1, 2 * r + 1))
        for i in range(n):
            k = np.exp(-(u[None, :] ** 2 + u[:, None] ** 2) / (2 * (1.2 + slope * xn[i]) ** 2))
            x_stamps[i] = convolve2d(y_stamps[i], k / k.sum(), mode="valid")
        x_stamps += rng.normal(0, 1.0, x_stamps.shape)
        sol = K.fit_kernel(x_stamps, np.ones(x_stamps.shape), y_stamps, np.full(y_stamps.shape, 1e-6), xn, yn, gx, gy,
                           spatial_order=2, select_order=True)  # fmt: skip
        assert (sol.spatial_order >= 1 if expected else sol.spatial_order == 0) and 0.8 < sol.chi2 < 1.3


def test_peaks_match_reference():
    rng = np.random.default_rng(3)
    img = rng.normal(0, 1, (60, 70)).astype(np.float32)
    img[20, 30] = img[20, 31] = 40.0  # a tie
    img[40, 50] = 30.0
    img[10, 10] = np.nan
    var = np.ones_like(img)
    mask = np.zeros(img.shape, np.int32)
    mask[40, 50] = 1
    xs, ys, vals = K.find_peaks(readonly(img), readonly(var), readonly(mask), 3.0, 2)
    ref = peaks(img, var, mask, 3.0, 2)
    assert [(int(x), int(y)) for x, y in zip(xs, ys)] == [(x, y) for x, y, _ in ref]
    assert (30, 20) in [(int(x), int(y)) for x, y in zip(xs, ys)] and (31, 20) not in list(zip(xs, ys))


def test_isolation_and_spread():
    xs = np.array([10, 12, 100, 300, 310])
    ys = np.array([10, 10, 100, 300, 300])
    vals = np.array([100.0, 50.0, 80.0, 70.0, 1.0])
    idx = K.select_isolated(xs, ys, vals, radius=5, contrast=0.02)
    assert list(idx) == [2, 3, 4]  # 0 and 1 are each other's bright neighbours; 3 and 4 are 10 px apart
    idx = K.select_isolated(xs, ys, vals, radius=15, contrast=0.02)
    assert list(idx) == [2, 3]  # 4's neighbour is 70x brighter; 3's is below 2 % of it
    # spread over a 2 x 2 grid: one per occupied cell first, then the second of each cell
    xs = np.array([10, 20, 30, 90, 95])
    ys = np.array([10, 40, 70, 90, 10])
    vals = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    idx = K.select_isolated(xs, ys, vals, radius=1, n_max=4, grid=2, shape=(100, 100))
    assert list(idx) == [0, 2, 3, 4]


def test_dilation_and_border():
    mask = np.zeros((30, 40), np.int32)
    mask[20, 30] = 2
    mask[5, 5] = 4
    mask[0, 39] = 2
    for radius in (0, 1, 3):
        m = mask.copy()
        K.dilate_bit(m, 2, radius)
        np.testing.assert_array_equal(m, dilate(mask, 2, radius))
    m = np.zeros((6, 7), np.int32)
    K.border_bit(m, 8, 2)
    assert m.sum() == 8 * (42 - 2 * 3)


def test_decorrelation_filter_against_reference():
    k = K.gaussian_kernel(1.5, 5, scale=0.95)
    fshape = (32, 40)
    khat = K.kernel_spectrum(k, fshape)
    phi, A, B = K.decorrelation_filter(khat, fshape, 100.0, 30.0, 0.95)
    ref_phi, rA, rB = decorrelation(k, fshape, 100.0, 30.0, 0.95)
    np.testing.assert_allclose(phi, ref_phi[:, : fshape[1] // 2 + 1], rtol=1e-4)
    assert phi[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert A == pytest.approx(rA, rel=1e-4) and B == pytest.approx(rB, rel=1e-4)
    assert A * 100 + B * 30 == pytest.approx(100 + 0.95**2 * 30, rel=1e-4)  # flat spectrum at σx² + κ² σy²
    # a delta kernel needs no decorrelation
    phi, A, B = K.decorrelation_filter(K.kernel_spectrum(K.gaussian_kernel(0.0, 3), fshape), fshape, 5.0, 2.0, 1.0)
    np.testing.assert_allclose(phi, 1.0, rtol=1e-6)
    assert (A, B) == pytest.approx((1.0, 1.0))


def test_decorrelated_noise_is_white_with_the_predicted_variance():
    """X - K ⋆ Y of two white-noise images, decorrelated: lag-1 autocorrelation ≈ 0 and the variance equals
    A σx² + B σy² (without decorrelation the neighbours are correlated)."""
    rng = np.random.default_rng(5)
    shape = (512, 512)
    sx, sy = 10.0, 40.0
    X = rng.normal(0, sx, shape).astype(np.float32)
    Y = rng.normal(0, sy, shape).astype(np.float32)
    k = K.gaussian_kernel(2.0, 8)
    fshape = K.fft_shape(shape, 16)
    E = X - K.convolve_spatial(Y, k[None], 0, fshape)
    khat = K.kernel_spectrum(k, fshape)
    core = (slice(40, -40), slice(40, -40))

    def lag1(a):
        a = a[core] - a[core].mean()
        return float((a[:, 1:] * a[:, :-1]).mean() / a.var())

    phi, A, B = K.decorrelation_filter(khat, fshape, sx**2, sy**2, 1.0)
    D = K.apply_filter(E, phi, fshape)
    assert abs(lag1(D)) < 0.01 < abs(lag1(E))
    assert D[core].var() == pytest.approx(A * sx**2 + B * sy**2, rel=0.02)
    _, A0, B0 = K.decorrelation_filter(khat, fshape, sx**2, sy**2, 1.0, decorrelate=False)
    assert E[core].var() == pytest.approx(A0 * sx**2 + B0 * sy**2, rel=0.02)
    assert B0 == pytest.approx((k**2).sum(), rel=1e-4)


def test_apply_filter_identity_and_fft_shape():
    img = np.random.default_rng(6).normal(size=(17, 19)).astype(np.float32)
    fshape = K.fft_shape(img.shape, 4)
    assert fshape[0] >= 21 and fshape[1] >= 23 and scipy.fft.next_fast_len(fshape[0], real=True) == fshape[0]
    out = K.apply_filter(readonly(img), np.ones((fshape[0], fshape[1] // 2 + 1), np.float32), fshape)
    np.testing.assert_allclose(out, img, atol=1e-5)


def test_pair_passes_match_numpy():
    """prepare_pair, subtract_images and finalize_difference against plain numpy expressions."""
    rng = np.random.default_rng(7)
    shape = (40, 50)
    s, t = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    sv, tv = rng.uniform(1, 2, shape).astype(np.float32), rng.uniform(1, 2, shape).astype(np.float32)
    sm, tm = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    s[1, 2], sv[3, 4], t[5, 6], tv[7, 8] = np.nan, np.inf, -np.inf, np.nan
    sm[9, 9], tm[10, 10], sm[11, 11], tm[12, 12] = 2, 2, 16, 4 | 2
    ins = [readonly(a) for a in (s, sv, sm, t, tv, tm)]
    os_, osv, ot, otv, code, mask, ns, nt = K.prepare_pair(*ins, 2)
    s_miss = ~(np.isfinite(s) & np.isfinite(sv)) | ((sm & 2) != 0)
    t_miss = ~(np.isfinite(t) & np.isfinite(tv)) | ((tm & 2) != 0)
    assert (ns, nt) == (s_miss.sum(), t_miss.sum()) == (3, 4)
    np.testing.assert_array_equal(os_, np.where(s_miss, 0, s))
    np.testing.assert_array_equal(otv, np.where(t_miss, 0, tv))
    ref_mask = sm | (tm & ~2) | np.where(s_miss | t_miss, 2, 0)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_array_equal(code, s_miss * 1 + t_miss * 2 + ((sm | tm) != 0) * 4)
    # bits 16 kept but not flagging; bit 4 flagging but cleared from the output
    _, _, _, _, code2, mask2, _, _ = K.prepare_pair(*ins, 2, keep_bits=~4, flag_bits=4)
    assert mask2[11, 11] == 16 and code2[11, 11] == 0 and mask2[12, 12] == 2 and code2[12, 12] == 2 | 4
    matched = rng.normal(size=shape).astype(np.float32)
    diff = K.subtract_images(readonly(os_), readonly(matched), readonly(code))
    np.testing.assert_array_equal(diff, np.where(s_miss | t_miss, 0, os_ - matched))
    d0 = diff.copy()
    var, tmpl, (mean, rms) = K.finalize_difference(diff, readonly(osv), readonly(otv), 1.2, 0.3, -2.0, matched, 0.5,
                                                   readonly(mask), 2)  # fmt: skip
    miss = (mask & 2) != 0
    np.testing.assert_allclose(diff[~miss], d0[~miss] / -2.0, rtol=1e-6)
    np.testing.assert_allclose(var[~miss], (1.2 * osv + 0.3 * otv)[~miss] / 4.0, rtol=1e-6)
    np.testing.assert_allclose(tmpl[~miss], 0.5 * matched[~miss], rtol=1e-6)
    assert np.isnan(diff[miss]).all() and np.isnan(var[miss]).all() and np.isnan(tmpl[miss]).all()
    z = (diff / np.sqrt(var))[mask == 0]
    assert mean == pytest.approx(z.mean(), abs=1e-6) and rms == pytest.approx(z.std(), rel=1e-5)
    filled, n = K.fill_missing(readonly(t), readonly(tm), 2)
    assert n == t_miss.sum() - ((~np.isfinite(tv)) & np.isfinite(t) & ((tm & 2) == 0)).sum()
    np.testing.assert_array_equal(filled, np.where(~np.isfinite(t) | ((tm & 2) != 0), 0, t))
    with pytest.raises(ValueError, match="t_img has shape"):
        K.prepare_pair(s, sv, sm, t[:5], tv, tm)
    with pytest.raises(ValueError, match="kernel terms"):
        K.convolve_spatial(s, np.zeros((2, 3, 3)), 1, K.fft_shape(shape, 2))


@pytest.mark.parametrize("sigma", [1.0, 3.0, 40.0])  # 40 σ: quartiles beyond the histogram, numpy's answer
def test_pull_quartiles_equal_numpy_percentile(sigma):
    rng = np.random.default_rng(11)
    shape = (300, 257)
    image = (rng.standard_normal(shape) * sigma).astype(np.float32)
    image[rng.random(shape) < 0.01] += 500.0  # sources: the quartiles must ignore them, not the caller
    variance = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    mask = np.zeros(shape, np.int32)
    mask[rng.random(shape) < 0.05] = 4  # BAD: not used
    mask[rng.random(shape) < 0.05] |= 16  # another bit: used
    image[5, :40] = np.nan
    image[6, :10] = np.inf
    variance[7, :30] = np.nan
    variance[8, :30] = 0.0
    variance[9, :30] = -1.0
    variance[10, :5] = np.inf  # pull 0: used, as numpy's division gives
    variance[11, :5] = 1e-40  # a pull of ±inf (float32): used
    ins = [readonly(a) for a in (image, variance, mask)]
    q25, q75, n = K.pull_quartiles(*ins, 4 | 2)
    good = ((mask & 6) == 0) & (variance > 0) & np.isfinite(image)
    ref = np.percentile(image[good] / np.sqrt(variance[good]), [25, 75])
    assert n == good.sum()
    np.testing.assert_allclose([q25, q75], ref, rtol=1e-6, atol=1e-7)
    # few pixels, duplicates: the order statistics interpolated exactly as numpy does
    small = np.array([[1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 7.0]], np.float32)
    got = K.pull_quartiles(small, np.ones_like(small), np.zeros(small.shape, np.int32), 4)
    np.testing.assert_allclose(got[:2], np.percentile(small, [25, 75]), rtol=1e-7)
    nothing = K.pull_quartiles(small, -np.ones_like(small), np.zeros(small.shape, np.int32), 4)
    assert np.isnan(nothing[0]) and np.isnan(nothing[1]) and nothing[2] == 0
    with pytest.raises(ValueError, match="integer"):
        K.pull_quartiles(small, small, small, 4)
