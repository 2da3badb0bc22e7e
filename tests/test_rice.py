"""The RICE_1 kernel against cfitsio's (through astropy's public tile-compression API): the same bytes for
the same tile, and each decodes the other's stream."""

import io

import numpy as np
import pytest
from astropy.io import fits

from kernels.rice import RiceError, rice_decode_int32, rice_encode_int32

rng = np.random.default_rng(11)

CASES = {
    "sky noise": rng.integers(20000, 30000, (37, 53)),
    "constant": np.full((10, 100), 7),
    "zeros": np.zeros((7, 11)),
    "one pixel": np.array([[123456]]),
    "full int32 range": rng.integers(-(2**31), 2**31, (30, 100), dtype=np.int64),
    "blocks of every kind": np.concatenate(
        [
            np.full(64, 5),
            rng.integers(-(2**31), 2**31, 70),
            np.arange(100) * 1000,
            np.full(33, -1),
            [2**31 - 1, -(2**31)],
        ]
    )[None, :],
    "faint noise": 1000 + rng.normal(0, 3, (17, 241)),
    "cosmic spikes": np.where(np.arange(2000) % 97 == 0, 2**30, 10).reshape(40, 50),
}


def cfitsio_stream(tile: np.ndarray) -> bytes:
    """The compressed bytes cfitsio writes for ``tile`` as one RICE_1 tile (astropy's writer with its default
    block size of 32, read back raw)."""
    hdu = fits.CompImageHDU(tile, compression_type="RICE_1", tile_shape=tile.shape)
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    buf.seek(0)
    with fits.open(buf, disable_image_compression=True) as hdul:
        assert hdul[1].header["ZCMPTYPE"] == "RICE_1" and hdul[1].header["ZVAL1"] == 32
        return bytes(np.asarray(hdul[1].data["COMPRESSED_DATA"][0], np.uint8))


@pytest.mark.parametrize("name", list(CASES))
def test_same_bytes_as_cfitsio_and_round_trip(name):
    tile = np.asarray(CASES[name]).astype(np.int32)
    tile.flags.writeable = False  # the kernel must not modify its input
    ref = cfitsio_stream(tile)
    ours = rice_encode_int32(tile)
    assert ours == ref
    np.testing.assert_array_equal(rice_decode_int32(ref, tile.size), tile.ravel())
    short = rice_encode_int32(tile, 16)  # the other block size: a round trip, and not the same stream
    np.testing.assert_array_equal(rice_decode_int32(short, tile.size, 16), tile.ravel())


def test_other_integer_dtypes_in_range_are_taken():
    a = np.arange(1000, dtype=np.uint16)
    assert rice_encode_int32(a) == rice_encode_int32(a.astype(np.int32))
    b = np.arange(100, dtype=np.int64)
    np.testing.assert_array_equal(rice_decode_int32(rice_encode_int32(b), 100), b)


def test_bad_input_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="int32 range"):
        rice_encode_int32(np.array([2**31], np.int64))
    with pytest.raises(ValueError, match="integers"):
        rice_encode_int32(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="empty"):
        rice_encode_int32(np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="16 or 32"):
        rice_encode_int32(np.zeros(4, np.int32), 8)
    with pytest.raises(ValueError, match=">= 0"):
        rice_decode_int32(b"\0\0\0\0", -1)


def test_truncated_or_garbage_stream_raises_not_crashes():
    tile = CASES["sky noise"].astype(np.int32)
    stream = rice_encode_int32(tile)
    for cut in (0, 3, 4, 5, len(stream) // 2, len(stream) - 1):
        with pytest.raises(RiceError, match="truncated or corrupt"):
            rice_decode_int32(stream[:cut], tile.size)
    garbage = np.random.default_rng(1).integers(0, 256, 5000).astype(np.uint8).tobytes()
    try:  # random bytes may happen to decode to some pixels; they must never crash or overrun
        out = rice_decode_int32(garbage, 100_000)
        assert out.shape == (100_000,)
    except RiceError:
        pass
    assert rice_decode_int32(b"", 0).shape == (0,)
