"""Forced PSF photometry against its loop reference and against injected sources."""

import naive_forced
import numpy as np
import pytest

from kernels.forced import BAD_PIXELS, FAILED, TRUNCATED, forced_psf_flux, gaussian_stamps


def _ro(*arrays):
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _scene(rng, shape=(64, 80), n=12, fwhm=3.0, sky_var=25.0):
    x = rng.uniform(-2, shape[1] + 1, n)
    y = rng.uniform(-2, shape[0] + 1, n)
    stamps = gaussian_stamps(x, y, fwhm, 15)
    data = rng.normal(0, np.sqrt(sky_var), shape).astype(np.float32)
    var = np.full(shape, sky_var, np.float32)
    return data, var, x, y, stamps


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    data, var, x, y, stamps = _scene(rng)
    mask = (rng.random(data.shape) < 0.02).astype(np.int32)
    data[rng.random(data.shape) < 0.01] = np.nan
    data[rng.random(data.shape) < 0.005] = np.inf
    var[rng.random(data.shape) < 0.005] = 0
    _ro(data, var, mask, stamps)
    got = forced_psf_flux(data, var, x, y, stamps, mask=mask)
    want = naive_forced.forced_psf_flux(data, var, x, y, stamps, mask=mask)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-10, equal_nan=True)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, equal_nan=True)
    assert (got[2] & (TRUNCATED | BAD_PIXELS)).any()


def test_injected_sources_are_recovered_without_bias():
    rng = np.random.default_rng(7)
    shape, fwhm, sky_var = (400, 400), 3.5, 100.0
    gy, gx = np.mgrid[20:380:40, 20:380:40]
    x = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, gy.size)
    stamps = gaussian_stamps(x, y, fwhm, 21)
    truth = 5000.0
    model = np.zeros(shape)
    h = 10
    for k in range(x.size):
        cx, cy = int(np.floor(x[k] + 0.5)), int(np.floor(y[k] + 0.5))
        model[cy - h : cy + h + 1, cx - h : cx + h + 1] += truth * stamps[k]
    fluxes = []
    for _ in range(20):
        data = (model + rng.normal(0, np.sqrt(sky_var), shape)).astype(np.float32)
        f, e, fl = forced_psf_flux(data, np.full(shape, sky_var, np.float32), x, y, stamps)
        assert not fl.any()
        fluxes.append(f)
    fluxes = np.array(fluxes)
    pull = (fluxes - truth) / e
    assert abs(pull.mean()) < 5 / np.sqrt(pull.size), pull.mean()
    assert 0.9 < pull.std() < 1.1, pull.std()


def test_blank_positions_have_zero_mean_flux():
    rng = np.random.default_rng(3)
    data, var, x, y, stamps = _scene(rng, shape=(300, 300), n=400, sky_var=9.0)
    x, y = rng.uniform(10, 290, 400), rng.uniform(10, 290, 400)
    f, e, _ = forced_psf_flux(data, var, x, y, gaussian_stamps(x, y, 3.0, 15))
    assert abs(np.mean(f / e)) < 5 / np.sqrt(f.size)


def test_fully_masked_or_off_image_fails():
    data = np.zeros((20, 20), np.float32)
    var = np.ones((20, 20), np.float32)
    x, y = np.array([10.0, 60.0]), np.array([10.0, 10.0])
    stamps = gaussian_stamps(x, y, 2.0, 9)
    f, e, fl = forced_psf_flux(data, var, x, y, stamps, mask=np.ones((20, 20), np.int32))
    assert np.isnan(f).all() and (fl & FAILED).all()
    f, e, fl = forced_psf_flux(data, var, x, y, stamps)
    assert f[0] == 0 and fl[0] == 0 and fl[1] & FAILED and fl[1] & TRUNCATED


def test_empty_and_invalid_inputs():
    data = np.zeros((10, 10), np.float32)
    f, e, fl = forced_psf_flux(data, data + 1, [], [], np.zeros((0, 5, 5)))
    assert f.size == 0
    with pytest.raises(ValueError, match="odd"):
        forced_psf_flux(data, data + 1, [1.0], [1.0], np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="finite"):
        forced_psf_flux(data, data + 1, [np.nan], [1.0], np.zeros((1, 5, 5)))
    with pytest.raises(ValueError, match="2-D float"):
        forced_psf_flux(data.astype(int), data + 1, [1.0], [1.0], np.zeros((1, 5, 5)))
    with pytest.raises(ValueError, match="positive"):
        gaussian_stamps([1.0], [1.0], 0.0, 5)


def test_gaussian_stamps_are_normalised_and_centred():
    s = gaussian_stamps([10.3], [4.8], 2.5, 21)[0]
    assert abs(s.sum() - 1) < 1e-6
    jj, ii = np.meshgrid(np.arange(21) - 10, np.arange(21) - 10)
    assert abs((s * jj).sum() - 0.3) < 1e-6 and abs((s * ii).sum() - (-0.2)) < 1e-6
