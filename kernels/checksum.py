"""The FITS checksum (Seaman, Pence & Rots 2012): the 32-bit ones' complement sum of a byte sequence read as
big-endian unsigned words, the carry out of bit 31 added back in."""

from __future__ import annotations

import numpy as np

from kernels.config import njit

__all__ = ["ones_complement_sum32"]


@njit
def _sum_words(words):
    """Sum of the byte-swapped (big-endian) uint32 ``words`` into 64 bits; at most 2**32 words per call."""
    s = np.uint64(0)
    for i in range(words.shape[0]):
        w = np.uint64(words[i])
        s += ((w >> np.uint64(24)) & np.uint64(0xFF)) | ((w >> np.uint64(8)) & np.uint64(0xFF00)) | \
             ((w << np.uint64(8)) & np.uint64(0xFF0000)) | ((w << np.uint64(24)) & np.uint64(0xFF000000))  # fmt: skip
    return s


def ones_complement_sum32(data, start: int = 0) -> int:
    """The FITS ones' complement sum of ``data`` (bytes or an array's memory) added to ``start``.

    A length that is not a multiple of 4 is summed as if padded with zero bytes (FITS blocks always are).
    The FITS ``DATASUM`` of an HDU is the sum of its data; its ``CHECKSUM`` card makes the sum of header and
    data ``0xFFFFFFFF``.
    """
    buf = np.frombuffer(memoryview(data).cast("B"), np.uint8)
    whole = buf.size - buf.size % 4
    total = int(start) & 0xFFFFFFFF
    step = 1 << 30  # words per partial sum: no uint64 overflow
    words = buf[:whole].view("=u4") if whole else np.zeros(0, np.uint32)
    if not np.little_endian:
        words = words.byteswap()  # the kernel swaps native little-endian words
    for i in range(0, words.size, step):
        total += int(_sum_words(words[i : i + step]))
    if whole < buf.size:
        total += int.from_bytes(bytes(buf[whole:]) + b"\0" * (4 - (buf.size - whole)), "big")
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total
