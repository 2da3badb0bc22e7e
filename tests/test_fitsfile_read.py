"""lsstpipe.io.fitsfile.read_image: an image plane, or a cut of it, read in bands of rows gives astropy's values."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from lsstpipe.io.fitsfile import read_image

CUTS = [None, (slice(3, 50), slice(7, 33)), (slice(0, 1), slice(None)), (slice(None), slice(60, 61)),
        (slice(-5, None), slice(-70, -2)), (slice(40, 40), slice(0, 10)), (slice(0, 100), slice(0, 200))]  # fmt: skip


def _file(tmp_path, hdu, name="x.fits"):
    path = tmp_path / name
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path)
    return path


def _astropy(path, cut, dtype):
    with fits.open(path) as hdul:
        data = hdul[1].data
        return np.array(data if cut is None else data[cut], dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int32, np.uint8])
@pytest.mark.parametrize("cut", CUTS)
def test_plain_planes_of_every_bitpix_and_any_cut(tmp_path, dtype, cut):
    rng = np.random.default_rng(1)
    data = rng.normal(0, 1000, (53, 71)) if np.dtype(dtype).kind == "f" else rng.integers(0, 120, (53, 71))
    data = data.astype(dtype)
    if np.dtype(dtype).kind == "f":
        data[5, 9], data[6, 10], data[7, 11] = np.nan, np.inf, -np.inf
    path = _file(tmp_path, fits.ImageHDU(data, name="IMAGE"))
    for want_dtype, band_bytes in [(np.float32, 4 << 20), (np.float64, 300), (np.int64, 1)]:  # bands of 1+ rows
        if np.dtype(dtype).kind == "f" and want_dtype is np.int64:
            continue
        with fits.open(path, memmap=False) as hdul:
            got = read_image(hdul["IMAGE"], cut, want_dtype, band_bytes=band_bytes)
        want = _astropy(path, cut, want_dtype)
        assert got.dtype == want_dtype and got.flags.c_contiguous and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("layout", ["compressed", "scaled", "blank", "stepped"])
def test_what_astropy_must_read_gives_astropys_values(tmp_path, layout):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 3000, (40, 64)).astype(np.int16)
    cut = (slice(2, 30), slice(5, 60))
    if layout == "compressed":
        hdu = fits.CompImageHDU(data, name="IMAGE", compression_type="RICE_1", tile_shape=(8, 64))
    else:
        hdu = fits.ImageHDU(data, name="IMAGE")
        if layout == "scaled":
            hdu.header["BSCALE"], hdu.header["BZERO"] = 0.5, 100.0
        elif layout == "blank":
            hdu.header["BLANK"] = int(data[3, 7])
        else:
            cut = (slice(2, 30, 2), slice(5, 60, 3))
    path = _file(tmp_path, hdu)
    for c in (cut, None):  # a cut, and the whole plane
        with fits.open(path, memmap=False) as hdul:
            whole = read_image(hdul["IMAGE"], c)
        with fits.open(path) as hdul:
            want = np.array(hdul["IMAGE"].data if c is None else hdul["IMAGE"].data[c], np.float32)
        assert whole.dtype == np.float32 and whole.flags.c_contiguous
        np.testing.assert_array_equal(whole, want)
    with fits.open(path, memmap=False) as hdul:
        got = read_image(hdul["IMAGE"], cut)
    if layout == "blank":
        assert np.isnan(got[1, 2])  # the BLANK value is undefined, as astropy reads it


def test_a_truncated_file_is_named_with_what_to_do(tmp_path):
    data = np.arange(200 * 100, dtype=np.float32).reshape(200, 100)
    path = _file(tmp_path, fits.ImageHDU(data, name="IMAGE"))
    with fits.open(path, memmap=False) as hdul:  # the headers were read before the file lost its end
        hdu = hdul["IMAGE"]
        with open(path, "r+b") as f:
            f.truncate(hdu.fileinfo()["datLoc"] + 150 * 100 * 4)
        assert read_image(hdu, (slice(0, 100), slice(None)), band_bytes=4000).shape == (100, 100)
        with pytest.raises(OSError, match=r"x\.fits: HDU IMAGE ends before row .* of 200 \(truncated file\)"):
            read_image(hdu, band_bytes=4000)


def test_a_plane_built_in_memory_is_read_by_astropy():
    hdu = fits.ImageHDU(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(read_image(hdu, (slice(1, 3), slice(0, 2))), [[4, 5], [8, 9]])
