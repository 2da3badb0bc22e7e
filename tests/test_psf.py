"""kernels/psf.py against its naive reference and against synthetic stars of a known, varying Moffat PSF."""

import math

import numpy as np
import pytest

from kernels import psf as P
from kernels.measure import aperture_flux
from kernels.render import add_moffat_sources
from tests import naive_psf as naive


@pytest.mark.parametrize(
    "size, dx, dy, fwhm, beta, e1, e2, sub",
    [(25, 0.0, 0.0, 3.5, 3.5, 0.0, 0.0, 3), (21, 0.37, -0.42, 2.2, 2.5, 0.05, -0.03, 3),
     (15, -0.5, 0.5, 5.0, 4.8, -0.2, 0.1, 5), (1, 0.1, 0.2, 1.0, 1.5, 0.0, 0.0, 1), (31, 3.3, -2.1, 8.0, 3.0, 0.3, 0.3, 2)],
)  # fmt: skip
def test_moffat_stamp_matches_naive(size, dx, dy, fwhm, beta, e1, e2, sub):
    got = P.moffat_stamp(size, dx, dy, fwhm, beta, e1, e2, sub, normalize="none")
    want = naive.moffat_stamp(size, dx, dy, fwhm, beta, e1, e2, sub)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_moffat_stamp_normalisations_and_centre():
    st = P.moffat_stamp(61, 0.3, -0.2, 3.5, 3.5, 0.05, 0.02, normalize="total")
    # 3×3 sampling of the core integrates the profile to ~1e-4; the wing beyond the stamp holds < 3e-5
    assert st.sum() == pytest.approx(1.0, abs=3e-4), st.sum()
    s1 = P.moffat_stamp(61, 0.3, -0.2, 3.5, 3.5, normalize="sum")
    assert s1.sum() == pytest.approx(1.0, abs=1e-12)
    yy, xx = np.mgrid[:61, :61] - 30
    assert (s1 * xx).sum() == pytest.approx(0.3, abs=0.01) and (s1 * yy).sum() == pytest.approx(-0.2, abs=0.01)


@pytest.mark.parametrize("kwargs", [dict(size=4), dict(fwhm=0.0), dict(beta=1.0), dict(e1=0.95), dict(dx=np.nan),
                                    dict(normalize="peak")])  # fmt: skip
def test_moffat_stamp_rejects_bad_arguments(kwargs):
    args = dict(size=11, dx=0.0, dy=0.0, fwhm=3.0, beta=3.5, e1=0.0, e2=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError):
        P.moffat_stamp(**args)


def test_star_jacobian_matches_finite_differences():
    """The analytic Jacobian of the fixed-β star fit against central differences of its residuals."""
    rng = np.random.default_rng(0)
    n = 21
    d, w, work = rng.normal(size=(n, n)), rng.uniform(0.5, 1.0, (n, n)), np.empty((n, n))
    for p in ([1e4, 50.3, 60.8, 3.4, 0.05, -0.03], [500.0, 49.6, 61.2, 5.0, -0.2, 0.15]):
        p = np.array(p)
        jac = np.empty((n * n, 6))
        P._star_jacobian(jac, p, w, 50.0, 61.0, 3.2, 3)

        def res(q):
            out = np.empty(n * n)
            P._star_residuals(out, q, d, w, 50.0, 61.0, 3.2, 3, work)
            return out

        num = np.empty_like(jac)
        for k in range(6):
            h = np.zeros(6)
            h[k] = 1e-6 * max(abs(p[k]), 1.0)
            num[:, k] = (res(p + h) - res(p - h)) / (2 * h[k])
        close = np.abs(jac - num) <= 1e-6 * np.abs(num).max(axis=0)
        assert close.all(), (~close).sum(axis=0)


def test_compiled_fit_matches_scipy_least_squares():
    """The compiled Levenberg–Marquardt fit (β fixed) lands where MINPACK with finite differences does."""
    from scipy.optimize import least_squares

    data, var, (x, y, flux), _ = _star_field(n=3, seed=9)
    for k in range(3):
        ix, iy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
        d = data[iy - 12 : iy + 13, ix - 12 : ix + 13].astype(float)
        w = 1.0 / np.sqrt(var[iy - 12 : iy + 13, ix - 12 : ix + 13].astype(float))
        p0 = np.array([flux[k] * 0.9, x[k] + 0.2, y[k] - 0.3, 3.0, 0.0, 0.0])
        work = np.empty((25, 25))

        def fun(p, d=d, w=w, cx=float(ix), cy=float(iy), work=work):
            out = np.empty(625)
            P._star_residuals(out, p, d, w, cx, cy, 3.5, 3, work)
            return out

        ref = least_squares(fun, p0, method="lm", x_scale="jac", xtol=1e-12, ftol=1e-12)
        got, chi2, status = P._lm_star(p0, d, w, float(ix), float(iy), 3.5, 3, 100)
        assert status == 0 and chi2 == pytest.approx(2 * ref.cost, rel=1e-8)
        np.testing.assert_allclose(got, ref.x, rtol=1e-5, atol=1e-5)


def test_model_parameters_match_naive_polynomial():
    rng = np.random.default_rng(1)
    c = [rng.normal(0, 0.1, 6) + np.array([3.5, 0, 0, 0, 0, 0]), rng.normal(0, 0.01, 6), rng.normal(0, 0.01, 6)]
    m = P.PsfModel((300, 400), 3.2, *c, order=2)
    x, y = rng.uniform(0, 399, 50), rng.uniform(0, 299, 50)
    u, v = (x - 199.5) / 200.0, (y - 149.5) / 200.0
    f, e1, e2 = m.parameters(x, y)
    np.testing.assert_allclose(f, naive.poly_eval(c[0], 2, u, v), rtol=1e-12)
    np.testing.assert_allclose(e1, naive.poly_eval(c[1], 2, u, v), atol=1e-14)
    np.testing.assert_allclose(e2, naive.poly_eval(c[2], 2, u, v), atol=1e-14)
    with pytest.raises(ValueError):
        P.PsfModel((300, 400), 3.2, c[0][:3], c[1], c[2], order=2)


def test_aperture_fraction_of_round_moffat():
    """For a round Moffat the enclosed fraction is 1 − (1 + r²/α²)^(1−β) before pixel integration, which
    matters little for a wide PSF (FWHM 12 pixels) and makes the fraction smaller for a narrow one.

    The pixel sums over exact-overlap areas smooth twice by the pixel (integration, then the overlap
    weights): ΔF ≈ 2 × (1/24) 2πr dI/dr = −1.6e-3 at r = 8 for FWHM 12."""
    m = P.PsfModel.constant((100, 100), fwhm=12.0, beta=3.5)
    alpha = float(P.moffat_alpha(12.0, 3.5))
    for r in (8.0, 12.0, 30.0):
        want = 1 - (1 + r * r / alpha**2) ** (1 - 3.5)
        assert m.aperture_fraction(50.2, 49.7, r) == pytest.approx(want, abs=2.5e-3), r
    narrow = P.PsfModel.constant((100, 100), fwhm=3.5, beta=3.5)
    want = 1 - (1 + 25.0 / float(P.moffat_alpha(3.5, 3.5)) ** 2) ** (1 - 3.5)
    got = narrow.aperture_fraction(np.array([50.2, 10.0]), np.array([49.7, 10.5]), 5.0)
    assert np.all((got < want) & (got > want - 0.01)), (got, want)


def _star_field(n=150, shape=(400, 400), seed=2, noise=True):
    """Stars of a Moffat PSF whose FWHM and ellipticity vary linearly across the image, rendered by the
    simulator's kernel; returns data, variance, truth table and the truth functions."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    x, y = rng.uniform(15, nx - 16, n), rng.uniform(15, ny - 16, n)
    flux = 10 ** rng.uniform(4.5, 6, n)

    def truth(x, y):
        return 3.0 + 0.6 * x / nx + 0.3 * y / ny, 0.02 + 0.03 * y / ny, -0.02 * x / nx

    f, e1, e2 = truth(x, y)
    img = np.zeros(shape)
    add_moffat_sources(img, x, y, flux, f, 3.5, e1, e2, radius=25)
    sky = 500.0
    var = img + sky
    if noise:
        img = img + rng.normal(0, np.sqrt(var))
    return img.astype(np.float32), var.astype(np.float32), (x, y, flux), truth


def test_fit_psf_model_recovers_varying_moffat():
    data, var, (x, y, flux), truth = _star_field(n=120, shape=(600, 600))
    data.flags.writeable = var.flags.writeable = False
    snr = flux / np.sqrt(flux + 500 * 50)
    idx = P.select_psf_stars(x, y, snr, np.zeros(x.size, np.int64), np.ones(x.size), min_snr=0, isolation=25.0)
    model, info = P.fit_psf_model(data, var, None, x[idx], y[idx], flux[idx], 3.5, order=1)
    gx, gy = np.meshgrid(np.linspace(20, 580, 7), np.linspace(20, 580, 7))
    f, e1, e2 = model.parameters(gx, gy)
    tf, te1, te2 = truth(gx, gy)
    err = np.abs(f / tf - 1).max()
    assert err < 0.01, f"largest FWHM error {err:.4f}"
    assert np.abs(e1 - te1).max() < 0.01 and np.abs(e2 - te2).max() < 0.01, (e1 - te1, e2 - te2)
    assert model.beta == pytest.approx(3.5, rel=0.05), model.beta
    assert 0.9 < info["residual_rms"] < 1.1, info["residual_rms"]
    assert info["n_stars"] >= 20, info["n_stars"]


def test_fit_star_noiseless_is_exact_and_handles_bad_pixels():
    data, var, (x, y, flux), truth = _star_field(n=1, noise=False, seed=5)
    p, chi = P.fit_star(data, var, None, x[0] + 0.3, y[0] - 0.2, flux[0] * 0.8, 3.0, beta=3.5, radius=12)
    f, e1, e2 = truth(x[0], y[0])
    np.testing.assert_allclose(p[:6], [flux[0], x[0], y[0], f, e1, e2], rtol=2e-3, atol=2e-3)
    mask = np.zeros(data.shape, bool)
    mask[int(y[0]) - 12 : int(y[0]) + 13, int(x[0]) - 12 : int(x[0]) + 13] = True
    assert P.fit_star(data, var, mask, x[0], y[0], flux[0], 3.0)[0] is None  # all masked: no fit
    assert P.fit_star(data, var, None, 3.0, 3.0, flux[0], 3.0, radius=10)[0] is None  # off the edge
    nan = data.copy()
    nan[int(y[0]), int(x[0])] = np.nan
    p2, _ = P.fit_star(nan, var, None, x[0], y[0], flux[0], 3.0, beta=3.5, radius=12)
    assert p2 is not None and abs(p2[3] / f - 1) < 0.01


def test_stamp_is_centred_and_normalised_at_any_position():
    m = P.PsfModel((200, 200), 3.5, np.array([3.0, 0.5, 0.0]), np.zeros(3), np.zeros(3), order=1)
    for x, y in ((10.3, 50.6), (150.0, 20.49), (199.5, 0.0)):
        st = m.stamp(x, y, 41)
        assert st.shape == (41, 41) and st.sum() == pytest.approx(1.0)
        flux, _, _ = aperture_flux(
            st, np.zeros_like(st), 20 + x - math.floor(x + 0.5), 20 + y - math.floor(y + 0.5), 15
        )
        assert flux[()] > 0.98
    assert m.fwhm(0.0, 99.5) < m.fwhm(199.0, 99.5)


def test_select_psf_stars():
    rng = np.random.default_rng(3)
    n = 200
    x, y = rng.uniform(0, 500, n), rng.uniform(0, 500, n)
    snr = rng.uniform(10, 1000, n)
    size = rng.normal(2.0, 0.02, n)
    size[:10] = 5.0  # galaxies / trails
    flags = np.zeros(n, np.int64)
    flags[10:20] = 8
    idx = P.select_psf_stars(x, y, snr, flags, size, n_max=50, min_snr=50, shape=(500, 500), border=10)
    assert len(idx) <= 50 and np.all(idx >= 20)
    assert np.all(snr[idx] >= 50) and np.all(np.diff(snr[idx]) <= 0)
    assert np.all((x[idx] >= 10) & (x[idx] <= 489))
    iso = P.select_psf_stars(x, y, snr, flags, size, min_snr=0, isolation=30.0)
    d = np.hypot(x[iso][:, None] - x[None, :], y[iso][:, None] - y[None, :])
    assert np.all(np.sort(d, axis=1)[:, 1] > 30.0)
    with pytest.raises(ValueError):
        P.select_psf_stars(x, y, snr[:5], flags, size)


def test_fit_psf_model_needs_stars():
    data, var, _, _ = _star_field(n=2)
    with pytest.raises(ValueError, match="PSF stars"):
        P.fit_psf_model(data, var, None, [0.0, 1.0], [0.0, 1.0], [1.0, 1.0], 3.0)
