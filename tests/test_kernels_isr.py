"""ISR kernels against their slow references (tests/naive_isr.py): random, edge-case and NaN/inf inputs."""

import numpy as np
import pytest

import naive_isr
from kernels.fringe import fit_fringe, subtract_fringe
from kernels.isr import AmpLayout, isr_ccd, mask_boxes
from kernels.overscan import overscan_levels
from lsstpipe.camera import get_camera
from lsstpipe.sim.instrument import crosstalk_template


def _ro(*arrays):
    for a in arrays:
        if a is not None:
            a.flags.writeable = False
    return arrays


@pytest.fixture(scope="module")
def det():
    return get_camera("mini")["R10_S11"]


def _layout(det):
    a0 = det.amps[0]
    lay = AmpLayout(a0.raw_data[0], a0.raw_data[1], [(a.bbox[0], a.bbox[2]) for a in det.amps],
                    [a.flip_x for a in det.amps], [a.flip_y for a in det.amps], det.shape)  # fmt: skip
    return lay, a0


def _raw(det, seed=0):
    rng = np.random.default_rng(seed)
    raw = (15000 + rng.normal(0, 4, (16, *det.raw_shape)) + rng.normal(0, 3, (16, det.raw_shape[0], 1))).round()
    a0 = det.amps[0]
    data = raw[:, a0.raw_data[0], a0.raw_data[1]]
    data += rng.exponential(800, data.shape).round()
    data[3, 10:14, 5:9] = 2**18 - 1  # saturated block in amp 3
    raw[5, 40, a0.raw_serial_overscan[1]][:4] += 5000  # a bleed trail into the overscan of amp 5
    return raw.astype(np.int32)


@pytest.mark.parametrize("smooth", [0, 3])
@pytest.mark.parametrize("nsigma", [3.0, 1.0])
def test_overscan_matches_reference(det, smooth, nsigma):
    raw = _raw(det)
    (raw,) = _ro(raw)
    rows, cols = det.amps[0].raw_serial_overscan
    got = overscan_levels(raw, rows, cols, nsigma=nsigma, smooth=smooth)
    ref = naive_isr.overscan_levels(raw, rows, cols, nsigma=nsigma, smooth=smooth)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(overscan_levels(raw, rows, cols, nsigma, smooth, parallel=True), got, atol=0)
    # The trail in amp 5, row 40 is clipped: the level stays near the others.
    assert abs(got[5, 40] - np.median(got[5])) < 20


def test_overscan_edge_cases():
    rng = np.random.default_rng(1)
    # Constant overscan (MAD 0), one column, one row, an even number of columns.
    for shape, cols in (((2, 5, 8), slice(4, 8)), ((2, 5, 5), slice(4, 5)), ((2, 1, 9), slice(2, 9))):
        raw = rng.integers(100, 110, shape).astype(np.int32)
        raw[1] = 7
        (raw,) = _ro(raw)
        got = overscan_levels(raw, slice(0, shape[1]), cols)
        np.testing.assert_allclose(got, naive_isr.overscan_levels(raw, slice(0, shape[1]), cols), atol=1e-12)
        assert np.all(got[1] == 7)
    with pytest.raises(ValueError, match="integer"):
        overscan_levels(np.zeros((2, 4, 4)), slice(0, 4), slice(2, 4))
    with pytest.raises(ValueError, match="empty"):
        overscan_levels(np.zeros((2, 4, 4), np.int32), slice(0, 4), slice(4, 4))
    # Other integer dtypes (uint16, big-endian int32) are accepted and give the same result.
    raw = rng.integers(0, 1000, (2, 6, 6)).astype(np.uint16)
    np.testing.assert_allclose(
        overscan_levels(raw, slice(0, 6), slice(3, 6)),
        overscan_levels(raw.astype(">i4"), slice(0, 6), slice(3, 6)),
    )


def _calibs(det, seed=0):
    rng = np.random.default_rng(seed)
    bias = rng.normal(0, 2, det.shape).astype(np.float32)
    dark = rng.uniform(0, 0.5, det.shape).astype(np.float32)
    flat = rng.uniform(0.7, 1.2, det.shape).astype(np.float32)
    return bias, dark, flat


def _amp_params(det):
    return ([a.gain for a in det.amps], [a.read_noise for a in det.amps], [a.saturation for a in det.amps])


@pytest.mark.parametrize(("with_xt", "parallel"), [(True, False), (False, False), (True, True)])
def test_isr_matches_reference(det, with_xt, parallel):
    lay, a0 = _layout(det)
    raw = _raw(det, 2)
    bias, dark, flat = _calibs(det)
    xt = crosstalk_template("ITL") * 20 if with_xt else None
    gains, rn, sat = _amp_params(det)
    raw, bias, dark, flat, xt = _ro(raw, bias, dark, flat, xt)
    oscan = overscan_levels(raw, *a0.raw_serial_overscan)
    (oscan,) = _ro(oscan)
    img, var, msk = isr_ccd(raw, lay, oscan, gains, rn, sat, bias=bias, dark=dark, flat=flat, crosstalk=xt,
                            dark_time=17.0, oscan_noise_rows=16, parallel=parallel)  # fmt: skip
    ref = naive_isr.isr(raw, *a0.raw_data, [(a.bbox[0], a.bbox[2]) for a in det.amps], [a.flip_x for a in det.amps],
                        [a.flip_y for a in det.amps], det.shape, oscan, gains, rn, sat, bias, dark, flat, xt, 17.0,
                        oscan_noise_rows=16)  # fmt: skip
    np.testing.assert_allclose(img, ref[0], rtol=1e-5, atol=0.05)  # float32 of raw - overscan: ulp(2.6e5) = 0.016
    np.testing.assert_allclose(var, ref[1], rtol=1e-5, atol=0.05)
    np.testing.assert_array_equal(msk, ref[2])
    assert np.count_nonzero(msk & 1) == 16  # the saturated block
    assert img.dtype == np.float32 and var.dtype == np.float32 and msk.dtype == np.int32


@pytest.mark.parametrize("tol", [0.05, 0.5, 5.0])
def test_crosstalk_tolerance_bounds_the_error(det, tol):
    """Skipping weak couplings of faint rows changes no pixel by more than the tolerance (unit gains, ADU)."""
    lay, a0 = _layout(det)
    raw = _raw(det, 6)
    raw[7, 100:104, 20:24] = 200000  # a bright star: its couplings are kept
    xt = crosstalk_template("E2V")
    oscan = overscan_levels(raw, *a0.raw_serial_overscan)
    args = (raw, lay, oscan, np.ones(16), np.zeros(16), np.full(16, 1e9))
    exact = isr_ccd(*args, crosstalk=xt)[0]
    approx = isr_ccd(*args, crosstalk=xt, crosstalk_tolerance=tol)[0]
    err = np.abs(approx.astype(np.float64) - exact)
    assert err.max() <= tol * (1 + 1e-6) + 0.02  # + float32 rounding of ~2e5 ADU
    assert err.max() > 0  # something was skipped
    with pytest.raises(ValueError, match="crosstalk_tolerance"):
        isr_ccd(*args, crosstalk=xt, crosstalk_tolerance=-1.0)


def test_crosstalk_with_few_and_many_strong_sources(det):
    """Rows whose victims have 0, 1, 2, 3 and more strong crosstalk sources (the output pass has a path for
    up to two, for three, and for more) against the float64 reference of the same tolerant correction."""
    lay, a0 = _layout(det)
    rows, cols = a0.raw_data
    raw = _raw(det, 8)
    c0 = cols.start
    for k, amps in enumerate([(3,), (3, 5), (3, 5, 2), (3, 5, 2, 6)]):  # amp 4 gets 1, 2, 3 and 4 strong sources
        for a in amps:
            raw[a, 20 + 10 * k : 23 + 10 * k, c0 + 7 : c0 + 11] = 150000
    xt = crosstalk_template("E2V") * 5  # into amp 4: 2e-3 from amps 3 and 5, 3e-4 from 2 and 6, ≤ 4e-5 from the rest
    tol = 20.0  # ADU: all the couplings of a sky row bound ~9 ADU together (no strong source); a star's go in
    oscan = overscan_levels(raw, *a0.raw_serial_overscan)
    gains, rn, sat = _amp_params(det)
    bias, dark, flat = _calibs(det, 5)
    (raw,) = _ro(raw)
    t, nstrong = naive_isr.crosstalk_tolerant(raw, rows, cols, oscan, xt, tol)
    assert set(np.unique(nstrong[4])) >= {0, 1, 2, 3, 4}
    corrected = raw.astype(np.float64)
    corrected[:, rows, cols] = t + oscan[:, :, None]
    args = (rows, cols, [(a.bbox[0], a.bbox[2]) for a in det.amps], [a.flip_x for a in det.amps],
            [a.flip_y for a in det.amps], det.shape, oscan, gains, rn, np.full(16, 1e9), bias, dark, flat)  # fmt: skip
    ref = naive_isr.isr(corrected, *args, None, 12.0)
    for parallel in (False, True):
        img, var, _ = isr_ccd(raw, lay, oscan, gains, rn, np.full(16, 1e9), bias=bias, dark=dark, flat=flat,
                              crosstalk=xt, crosstalk_tolerance=tol, dark_time=12.0, parallel=parallel)  # fmt: skip
        np.testing.assert_allclose(img, ref[0], rtol=1e-5, atol=0.05)
        np.testing.assert_allclose(var, ref[1], rtol=1e-4, atol=0.1)


@pytest.mark.parametrize(
    ("with_xt", "parallel", "nsigma"), [(True, False, 3.0), (False, False, 1.0), (True, True, 3.0)]
)
def test_isr_measures_the_overscan_in_its_pass(det, with_xt, parallel, nsigma):
    """``oscan`` given as the overscan columns: the pass measures each row's level itself, to the bit the
    levels of overscan_levels (clipped rows, a row that needs its own median), and the same outputs."""
    lay, a0 = _layout(det)
    raw = _raw(det, 3)
    rows, cols = a0.raw_serial_overscan
    raw[2, 60, cols][1:] += 300  # all but one overscan pixel of a row jump: clipped around its own median
    raw[7, :, cols][:, 0] = 2**18 - 1  # a hot overscan column in every row of amp 7
    bias, dark, flat = _calibs(det, 1)
    xt = crosstalk_template("ITL") * 20 if with_xt else None
    gains, rn, sat = _amp_params(det)
    raw, bias, dark, flat, xt = _ro(raw, bias, dark, flat, xt)
    kw = dict(bias=bias, dark=dark, flat=flat, crosstalk=xt, crosstalk_tolerance=0.5, dark_time=3.0)
    levels = overscan_levels(raw, rows, cols, nsigma)
    got_levels = np.full_like(levels, np.nan)
    got = isr_ccd(raw, lay, cols, gains, rn, sat, oscan_nsigma=nsigma, levels_out=got_levels, parallel=parallel, **kw)
    np.testing.assert_array_equal(got_levels, levels)
    for a, b in zip(got, isr_ccd(raw, lay, levels, gains, rn, sat, **kw)):
        np.testing.assert_array_equal(a, b)
    assert abs(levels[2, 60] - np.median(levels[2])) > 200  # the jump is the level of that row
    # given levels come back as they were
    out_levels = np.empty_like(levels)
    isr_ccd(raw, lay, levels, gains, rn, sat, levels_out=out_levels)
    np.testing.assert_array_equal(out_levels, levels)
    with pytest.raises(ValueError, match="no contiguous columns"):
        isr_ccd(raw, lay, slice(cols.stop, cols.stop), gains, rn, sat)
    with pytest.raises(ValueError, match="no contiguous columns"):
        isr_ccd(raw, lay, slice(cols.start, cols.stop, 2), gains, rn, sat)
    with pytest.raises(ValueError, match="oscan_nsigma"):
        isr_ccd(raw, lay, cols, gains, rn, sat, oscan_nsigma=0.0)
    with pytest.raises(ValueError, match="levels_out"):
        isr_ccd(raw, lay, cols, gains, rn, sat, levels_out=np.empty((16, 3)))


def test_isr_without_calibrations_is_assembly(det):
    """With no calibrations, unit gains and a zero overscan the image is the assembled raw (as assemble_ccd)."""
    from lsstpipe.isr.assembly import disassemble_ccd

    lay, a0 = _layout(det)
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 1000, det.shape).astype(np.int32)
    raw = disassemble_ccd(truth, det)
    img, var, msk = isr_ccd(raw, lay, np.zeros((16, a0.raw_data[0].stop)), np.ones(16), np.zeros(16), np.full(16, 1e9))
    np.testing.assert_array_equal(img, truth.astype(np.float32))
    np.testing.assert_allclose(var, np.maximum(truth, 0) + 1 / 12, rtol=1e-6)
    assert not msk.any()


def test_isr_nan_and_inf_calibrations(det):
    lay, a0 = _layout(det)
    raw = _raw(det, 4)
    bias, dark, flat = _calibs(det, 4)
    bias[5, 6] = np.nan
    dark[7, 8] = np.inf
    flat[9, 10] = 0.0
    flat[11, 12] = -1.0
    flat[13, 14] = np.nan
    gains, rn, sat = _amp_params(det)
    raw, bias, dark, flat = _ro(raw, bias, dark, flat)
    oscan = overscan_levels(raw, *a0.raw_serial_overscan)
    img, var, msk = isr_ccd(raw, lay, oscan, gains, rn, sat, bias=bias, dark=dark, flat=flat, dark_time=5.0,
                            sat_bit=4, nodata_bit=8)  # fmt: skip
    ref = naive_isr.isr(raw, *a0.raw_data, [(a.bbox[0], a.bbox[2]) for a in det.amps], [a.flip_x for a in det.amps],
                        [a.flip_y for a in det.amps], det.shape, oscan, gains, rn, sat, bias, dark, flat, None, 5.0,
                        sat_bit=4, nodata_bit=8)  # fmt: skip
    bad = [(5, 6), (7, 8), (9, 10), (11, 12), (13, 14)]
    for y, x in bad:
        assert msk[y, x] & 8 and np.isnan(img[y, x]) and np.isnan(var[y, x])
    assert np.count_nonzero(msk & 8) == len(bad)
    np.testing.assert_array_equal(msk, ref[2])
    np.testing.assert_allclose(img, ref[0], rtol=1e-5, atol=0.05)  # float32 of raw - overscan: ulp(2.6e5) = 0.016


def test_isr_validation(det):
    lay, a0 = _layout(det)
    raw = _raw(det)
    oscan = np.zeros((16, a0.raw_data[0].stop))
    gains, rn, sat = _amp_params(det)
    with pytest.raises(ValueError, match="integer"):
        isr_ccd(raw.astype(np.float32), lay, oscan, gains, rn, sat)
    with pytest.raises(ValueError, match="bias has shape"):
        isr_ccd(raw, lay, oscan, gains, rn, sat, bias=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="oscan"):
        isr_ccd(raw, lay, oscan[:, :-1], gains, rn, sat)
    with pytest.raises(ValueError, match="gains"):
        isr_ccd(raw, lay, oscan, gains[:3], rn, sat)
    with pytest.raises(ValueError, match="NaN"):
        isr_ccd(raw, lay, oscan, gains, rn, sat, crosstalk=np.full((16, 16), np.nan))
    with pytest.raises(ValueError, match="dark_time"):
        isr_ccd(raw, lay, oscan, gains, rn, sat, dark_time=np.nan)
    with pytest.raises(ValueError, match="out image"):
        isr_ccd(raw, lay, oscan, gains, rn, sat, out=(np.zeros(det.shape), np.zeros(det.shape), np.zeros(det.shape)))


def test_isr_out_arrays_reused(det):
    lay, a0 = _layout(det)
    raw = _raw(det, 5)
    gains, rn, sat = _amp_params(det)
    oscan = overscan_levels(raw, *a0.raw_serial_overscan)
    out = (np.empty(det.shape, np.float32), np.empty(det.shape, np.float32), np.empty(det.shape, np.int32))
    got = isr_ccd(raw, lay, oscan, gains, rn, sat, out=out)
    assert all(g is o for g, o in zip(got, out))
    fresh = isr_ccd(raw, lay, oscan, gains, rn, sat)
    for g, f in zip(got, fresh):
        np.testing.assert_array_equal(g, f)


def test_mask_boxes():
    mask = np.zeros((10, 12), np.int32)
    mask_boxes(mask, [(0, 10, 3, 4), (-5, 2, 10, 20), (4, 4, 0, 12)], 4)
    ref = np.zeros((10, 12), np.int32)
    ref[:, 3] = 4
    ref[:2, 10:] = 4
    np.testing.assert_array_equal(mask, ref)
    mask_boxes(mask, np.zeros((0, 4)), 8)
    np.testing.assert_array_equal(mask, ref)
    with pytest.raises(ValueError, match="integer"):
        mask_boxes(np.zeros((3, 3)), [(0, 1, 0, 1)], 1)


def _fringe_scene(seed=0, shape=(300, 260)):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]]
    fringe = (np.sin(x / 9.0 + y / 23.0) + 0.5 * np.cos(y / 7.0 - x / 31.0)).astype(np.float32)
    fringe /= fringe.std()
    sky = 1500.0 + 0.2 * x + 0.1 * y
    image = sky + 40.0 * fringe + rng.normal(0, 39.0, shape)
    # Stars and cosmic rays that must not pull the fit.
    for _ in range(60):
        cy, cx = rng.integers(5, shape[0] - 5), rng.integers(5, shape[1] - 5)
        image[cy - 2 : cy + 3, cx - 2 : cx + 3] += rng.uniform(1e3, 5e4)
    return image.astype(np.float32), fringe


def test_fit_fringe_robust_against_reference():
    image, fringe = _fringe_scene()
    clean, _ = _fringe_scene()
    image, fringe = _ro(image, fringe)
    amp = fit_fringe(image, fringe, step=1)
    assert abs(amp - 40.0) < 1.0
    # Reference: plain least squares of a plane + fringe on the pixels without sources.
    rng = np.random.default_rng(0)
    y, x = np.mgrid[: image.shape[0], : image.shape[1]]
    noiseless = 1500.0 + 0.2 * x + 0.1 * y + 40.0 * fringe + rng.normal(0, 39.0, image.shape)
    a = np.stack([np.ones(image.size), (2 * x / (image.shape[1] - 1) - 1).ravel(),
                  (2 * y / (image.shape[0] - 1) - 1).ravel(), fringe.ravel()], axis=1)  # fmt: skip
    ref = np.linalg.lstsq(a, noiseless.ravel(), rcond=None)[0][3]
    assert abs(amp - ref) < 1.0
    # NaN/inf pixels and masked pixels are ignored.
    bad = image.copy()
    bad[10:20] = np.nan
    bad[30:40] = np.inf
    mask = np.zeros(image.shape, np.int32)
    bad[50:60] = 1e9
    mask[50:60] = 4
    assert abs(fit_fringe(bad, fringe, mask=mask, bad_bits=4, step=1) - amp) < 1.0
    out = subtract_fringe(image, fringe, amp)
    assert out.dtype == np.float32 and not np.shares_memory(out, image)
    np.testing.assert_allclose(out, image - np.float32(amp) * fringe, rtol=1e-6)


def test_fit_fringe_errors():
    image, fringe = _fringe_scene(shape=(20, 20))
    with pytest.raises(ValueError, match="same shape"):
        fit_fringe(image, fringe[:10])
    with pytest.raises(ValueError, match="fewer than 16"):
        fit_fringe(np.full((20, 20), np.nan, np.float32), fringe)
    with pytest.raises(ValueError, match="same shape"):
        subtract_fringe(image, fringe[:, :3], 1.0)
