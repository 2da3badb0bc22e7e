"""FITS blocks and cards without astropy's machinery, against astropy: card images, the ones' complement sum,
CHECKSUM/DATASUM, and the scanner's HDU offsets; corruption and truncation are found."""

import io

import numpy as np
import pytest
from astropy.io import fits

from kernels.checksum import ones_complement_sum32
from lsstpipe.io.fitsblocks import (
    BLOCK,
    FitsLayoutError,
    card,
    card_images,
    checksum_cards,
    header_block,
    padding,
    scan,
    verify,
)


def naive_sum32(data: bytes) -> int:
    """The FITS checksum paper's definition, word by word."""
    data = data + b"\0" * (-len(data) % 4)
    s = 0
    for i in range(0, len(data), 4):
        s += int.from_bytes(data[i : i + 4], "big")
        s = (s & 0xFFFFFFFF) + (s >> 32)
    return s


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 2880, 100_003])
def test_ones_complement_sum_matches_the_definition(n):
    data = np.random.default_rng(n).integers(0, 256, n).astype(np.uint8).tobytes()
    assert ones_complement_sum32(data) == naive_sum32(data)
    assert ones_complement_sum32(b"\xff" * 4000) == naive_sum32(b"\xff" * 4000) == 0xFFFFFFFF
    assert ones_complement_sum32(data, 0xFFFFFFFF) == naive_sum32(data + b"\xff\xff\xff\xff")


@pytest.mark.parametrize(
    "keyword, value, comment",
    [("PCOUNT", 38369, "number of group parameters"), ("NEG", -5, ""), ("ZIMAGE", True, "compressed"),
     ("F", False, "c"), ("TFORM1", "1PB(38369)", ""), ("EXTNAME", "Segment10", "amplifier segment"),
     ("QUOTE", "it's", ""), ("SHORT", "", "empty"), ("DATASUM", "4294967295", "computed by lsstpipe.io.raw")],
)  # fmt: skip
def test_cards_are_formatted_as_astropy_does(keyword, value, comment):
    assert card(keyword, value, comment) == str(fits.Card(keyword, value, comment))
    assert len(card(keyword, value, comment)) == 80


def test_card_refuses_what_it_cannot_format():
    with pytest.raises(TypeError, match="int, bool and str"):
        card("X", 1.5)
    with pytest.raises(ValueError, match="80 characters"):
        card("X", "a" * 75)


@pytest.mark.parametrize("shape", [(0,), (3, 5), (64, 45), (100, 101)])
def test_checksum_cards_equal_astropys(shape):
    data = np.random.default_rng(1).integers(-(2**31), 2**31, shape, dtype=np.int64).astype(">i4")
    hdu = fits.ImageHDU(data if data.size else None, name="Segment10")
    hdu.header["DATASEC"] = ("[4:67,1:250]", "data section")
    cards = card_images(hdu.header)
    payload = data.tobytes() + padding(data.nbytes)
    ours = checksum_cards(cards, ones_complement_sum32(payload), "fixed")
    hdu.add_checksum(when="fixed")
    assert ours[-2:] == card_images(hdu.header)[-2:]
    buf = header_block(ours) + payload
    assert verify(buf, scan(buf)[0])


def _astropy_file() -> bytes:
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(np.arange(12, dtype=">i4").reshape(3, 4), name="A"),
            fits.BinTableHDU.from_columns([fits.Column("x", "E", array=np.arange(5.0))], name="T"),
            fits.CompImageHDU(np.arange(2000, dtype=np.int32).reshape(40, 50), name="C", compression_type="RICE_1")]  # fmt: skip
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf, checksum=True)
    return buf.getvalue()


def test_scan_finds_what_astropy_wrote_and_verifies_it():
    data = _astropy_file()
    found = scan(data)
    with fits.open(io.BytesIO(data), disable_image_compression=True) as hdul:
        assert len(found) == len(hdul)
        for i, hdu in enumerate(found):
            info = hdul.fileinfo(i)
            assert (hdu.header_offset, hdu.data_offset, hdu.data_size) == (
                info["hdrLoc"],
                info["datLoc"],
                info["datSpan"] - (-hdu.data_size % BLOCK),
            )
            assert hdu.get("EXTNAME", "PRIMARY") == hdul[i].name
    assert all(verify(data, h) for h in found)
    assert found[1].get("NAXIS1") == 4 and found[0].get("SIMPLE") is True and found[1].name == "A"


def test_scan_and_verify_find_corruption_and_truncation():
    data = bytearray(_astropy_file())
    found = scan(bytes(data))
    data[found[1].data_offset + 3] ^= 0x10  # one bit of A's pixels
    assert [verify(bytes(data), h) for h in scan(bytes(data))] == [True, False, True, True]
    data[found[1].data_offset + 3] ^= 0x10
    data[found[2].header_offset + 85] ^= 0x01  # one bit of T's header
    assert [verify(bytes(data), h) for h in scan(bytes(data))] == [True, True, False, True]
    with pytest.raises(FitsLayoutError, match="truncated"):
        scan(bytes(data[: found[3].data_offset + 10]))
    with pytest.raises(FitsLayoutError, match="no END card"):
        scan(bytes(data[: found[3].header_offset + 100]))


def test_blank_blocks_after_the_last_hdu_are_padding_and_other_bytes_an_error():
    data = _astropy_file()
    assert len(scan(data + b"\0" * BLOCK)) == len(scan(data)) == 4
    assert len(scan(data + b" " * 2 * BLOCK)) == 4
    with pytest.raises(FitsLayoutError, match="not an extension header"):
        scan(data + b"garbage".ljust(BLOCK, b"\0"))
