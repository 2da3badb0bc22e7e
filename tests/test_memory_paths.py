"""The memory-saving paths of the chain give what the plain paths give (in-place, blocked, out= variants)."""

import numpy as np
import scipy.fft

from kernels import diffim
from lsstpipe.pipelines.exposure import Exposure, MaskBit
from lsstpipe.pipelines.isr import combine_snaps


def test_rfft2_padded_equals_scipy():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(301, 277)).astype(np.float32)
    for fshape in ((320, 288), (301, 277), (640, 300)):
        want = scipy.fft.rfft2(img, s=fshape)
        got = diffim.rfft2_padded(img, fshape)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3 * np.abs(want).max() * 1e-3)


def test_multiply_spectrum_equals_the_whole_plane_product():
    rng = np.random.default_rng(2)
    fshape = (96, 80)
    hat = scipy.fft.rfft2(rng.normal(size=fshape)).astype(np.complex64)
    kernel = rng.normal(size=(11, 11))
    want = hat * diffim.kernel_spectrum(kernel, fshape)
    out = hat.copy()
    diffim.multiply_spectrum(out, kernel, fshape, out, rows=17)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_decorrelation_filter_from_the_kernel_or_its_spectrum():
    rng = np.random.default_rng(3)
    fshape = (64, 72)
    kernel = np.exp(-0.5 * (np.add.outer(np.arange(-7, 8) ** 2, np.arange(-7, 8) ** 2)) / 4.0)
    kernel /= kernel.sum()
    power = (rng.uniform(0.5, 1, fshape[1] // 2 + 1), rng.uniform(0.5, 1, fshape[0]))
    for warped in (True, False):
        a = diffim.decorrelation_filter(kernel, fshape, 2.0, 3.0, 0.9, power, warped)
        b = diffim.decorrelation_filter(diffim.kernel_spectrum(kernel, fshape), fshape, 2.0, 3.0, 0.9, power, warped)
        np.testing.assert_allclose(a[0], b[0], rtol=1e-4)
        np.testing.assert_allclose(a[1:], b[1:], rtol=1e-4)


def test_zero_missing_is_the_in_place_fill_missing():
    rng = np.random.default_rng(4)
    img = rng.normal(size=(50, 60)).astype(np.float32)
    var = np.ones_like(img)
    mask = np.zeros(img.shape, np.int32)
    img[3, 4] = np.nan
    mask[10:12, 20:25] = int(MaskBit.NO_DATA)
    want, n_want = diffim.fill_missing(img, mask | np.where(~np.isfinite(img), int(MaskBit.NO_DATA), 0))
    n = diffim.zero_missing(img, var, mask)
    assert n == n_want == 11
    np.testing.assert_array_equal(img, want)
    assert (mask[3, 4] & int(MaskBit.NO_DATA)) and var[3, 4] == 0


def test_combine_snaps_in_place_equals_the_copy():
    shape = (80, 90)

    def snap(seed):
        r = np.random.default_rng(seed)
        img = (100 + r.normal(0, 10, shape)).astype(np.float32)
        img[r.integers(0, 80), r.integers(0, 90)] += 5000  # a cosmic ray
        return Exposure(img, np.full(shape, 100, np.float32), np.zeros(shape, np.int32),
                        {"exptime": 15.0, "dark_time": 17.0})  # fmt: skip

    a0, a1 = snap(1), snap(2)
    want = combine_snaps(a0, a1)
    got = combine_snaps(Exposure(a0.image.copy(), a0.variance.copy(), a0.mask.copy(), dict(a0.metadata)), a1,
                        overwrite=True)  # fmt: skip
    np.testing.assert_array_equal(got.image, want.image)
    np.testing.assert_array_equal(got.variance, want.variance)
    np.testing.assert_array_equal(got.mask, want.mask)


def test_return_large_frees_validates_and_applies():
    import pytest

    from lsstpipe.runtime.memory import return_large_frees

    with pytest.raises(ValueError, match="positive"):
        return_large_frees(0)
    import platform

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert return_large_frees(8 << 20)
