"""The block reader on tiles that contradict their own headers, in files without checksums (a foreign
writer's): a clear error naming the segment, never a crash or a read past the heap."""

import numpy as np
import pytest

from kernels.rice import rice_encode_int32
from lsstpipe.io.fitsblocks import card, header_block, padding
from lsstpipe.io.raw_blocks import RawBlocksError, _tile_cards, read_blocks


def _file(nelem_claimed: int, stream: bytes, rows: int = 6, cols: int = 7) -> bytes:
    primary = header_block([card("SIMPLE", True), card("BITPIX", 8), card("NAXIS", 0), card("EXTEND", True)])
    data = np.array([nelem_claimed, 0], ">i4").tobytes() + stream
    head = header_block(_tile_cards(rows, cols, len(stream)) + [card("EXTNAME", "Segment10")])
    return primary + head + data + padding(len(data))


def test_a_good_tile_without_checksums_is_read():
    pixels = np.arange(42, dtype=np.int32).reshape(6, 7) * 1000
    stream = rice_encode_int32(pixels)
    primary, segments, failed = read_blocks(_file(len(stream), stream))
    assert failed == [] and [name for name, _, _ in segments] == ["Segment10"]
    np.testing.assert_array_equal(segments[0][2], pixels)
    assert segments[0][1]["NAXIS1"] == 7 and segments[0][1]["XTENSION"] == "IMAGE"


def test_tile_outside_its_heap_or_cut_short_is_a_clear_error():
    stream = rice_encode_int32(np.arange(42, dtype=np.int32) * 1000)
    with pytest.raises(RawBlocksError, match="Segment10: its compressed tile .* lies outside its heap"):
        read_blocks(_file(10**6, stream))
    with pytest.raises(RawBlocksError, match="Segment10: the RICE_1 stream of 5 bytes ends before its 42 pixels"):
        read_blocks(_file(5, stream))
