"""Rice (RICE_1) compression of 32-bit integer tiles, the algorithm of FITS tile compression (cfitsio's
``fits_rcomp`` / ``fits_rdecomp``, Pence, Seaman & White 2009), which Rubin archives LSSTCam raws with.

The stream is a bit stream, most significant bit first: the first pixel as 32 bits, then per block of
``blocksize`` pixels a 5-bit code ``fs + 1`` and the block's zig-zag mapped differences ``d`` (``2p`` for
``p >= 0``, ``-2p - 1`` below), each as ``d >> fs`` zeros, a one, and the low ``fs`` bits of ``d``. Code 0:
every difference of the block is 0; code 26 (``fs`` of 25 or more): each difference as a plain 32-bit
number. ``fs`` comes from the block's mean difference exactly as cfitsio chooses it, so the bytes are
cfitsio's (and astropy's, which uses cfitsio's code): ``tests/test_rice.py`` compares them.
"""

from __future__ import annotations

import numpy as np

from kernels.config import njit

__all__ = ["rice_encode_int32", "rice_decode_int32", "RiceError"]

_FSBITS = 5
_FSMAX = 25
_BBITS = 32


class RiceError(ValueError):
    """A Rice stream that does not decode to the expected number of pixels (corrupt or truncated)."""


_BIT_LENGTH = np.array([i.bit_length() for i in range(256)], np.int64)


@njit
def _bit_length(x):
    """The number of bits of ``x`` (uint64, > 0) up to its highest one."""
    n = 0
    while x >= np.uint64(256):
        x >>= np.uint64(8)
        n += 8
    return n + _BIT_LENGTH[x]


@njit
def _put(out, pos, acc, nacc):
    """Move the whole bytes of the bit accumulator to ``out``; returns the new ``pos`` and ``nacc``."""
    while nacc >= 8:
        nacc -= 8
        out[pos] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
        pos += 1
    return pos, nacc


@njit
def _take(buf, pos, acc, nacc, nbits):
    """The next ``nbits`` (<= 32) of the stream: ``(value, pos, acc, nacc)``, ``nacc`` -1 where it ends."""
    while nacc < nbits:
        if pos >= buf.shape[0]:
            return np.int64(0), pos, acc, -1
        acc = (acc << np.uint64(8)) | np.uint64(buf[pos])
        pos += 1
        nacc += 8
    nacc -= nbits
    value = np.int64((acc >> np.uint64(nacc)) & np.uint64((1 << nbits) - 1))
    return value, pos, acc & np.uint64((1 << nacc) - 1), nacc


@njit
def _encode(a, blocksize, out):
    """Encode ``a`` (int32, 1-D, at least one pixel) into ``out``; returns the number of bytes, or -1 if
    ``out`` is too small (it never is at :func:`rice_encode_int32`'s size)."""
    n = a.shape[0]
    cap = out.shape[0]
    diff = np.empty(blocksize, np.uint32)
    pos = 0
    acc = np.uint64(0)  # bit accumulator: the low ``nacc`` bits are pending, most significant first
    nacc = 0
    first = np.uint32(np.int64(a[0]) & 0xFFFFFFFF)
    for k in range(4):
        out[pos] = (first >> np.uint32(24 - 8 * k)) & np.uint32(0xFF)
        pos += 1
    last = np.int64(a[0])
    for i in range(0, n, blocksize):
        m = min(blocksize, n - i)
        pixelsum = 0.0
        for j in range(m):
            nxt = np.int64(a[i + j])
            p = (nxt - last) & 0xFFFFFFFF  # the 32-bit wrapped difference, as cfitsio's int arithmetic
            if p >= 0x80000000:
                p -= 0x100000000
            d = (~(p << 1)) & 0xFFFFFFFF if p < 0 else (p << 1) & 0xFFFFFFFF
            diff[j] = np.uint32(d)
            pixelsum += d
            last = nxt
        dpsum = (pixelsum - (m // 2) - 1) / m
        if dpsum < 0:
            dpsum = 0.0
        psum = np.uint32(np.uint64(dpsum)) >> np.uint32(1)
        fs = 0
        while psum > 0:
            psum >>= np.uint32(1)
            fs += 1
        if pos + 4 * blocksize + 16 > cap:
            return -1
        if fs >= _FSMAX:
            acc = (acc << np.uint64(_FSBITS)) | np.uint64(_FSMAX + 1)
            nacc += _FSBITS
            for j in range(m):
                acc = (acc << np.uint64(_BBITS)) | np.uint64(diff[j])
                nacc += _BBITS
                pos, nacc = _put(out, pos, acc, nacc)
        elif fs == 0 and pixelsum == 0:
            acc = acc << np.uint64(_FSBITS)
            nacc += _FSBITS
        else:
            acc = (acc << np.uint64(_FSBITS)) | np.uint64(fs + 1)
            nacc += _FSBITS
            mask = np.uint64((1 << fs) - 1)
            for j in range(m):
                v = np.uint64(diff[j])
                top = np.int64(v >> np.uint64(fs))
                while top > 0:  # ``top`` zeros, a byte at a time
                    z = min(top, 32)
                    acc = acc << np.uint64(z)
                    nacc += z
                    top -= z
                    pos, nacc = _put(out, pos, acc, nacc)
                    if pos + 8 > cap:
                        return -1
                acc = (acc << np.uint64(1 + fs)) | (np.uint64(1) << np.uint64(fs)) | (v & mask)
                nacc += 1 + fs
                pos, nacc = _put(out, pos, acc, nacc)
        pos, nacc = _put(out, pos, acc, nacc)
    if nacc > 0:
        out[pos] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))
        pos += 1
    return pos


@njit
def _decode(buf, blocksize, out):
    """Decode ``out.shape[0]`` pixels from ``buf`` into ``out``; returns 0, or -1 if the stream ends early."""
    n = out.shape[0]
    nb = buf.shape[0]
    if nb < 4:
        return -1
    last = np.int64(0)
    for k in range(4):
        last = (last << 8) | np.int64(buf[k])
    if last >= 0x80000000:
        last -= 0x100000000
    pos = 4
    acc = np.uint64(0)
    nacc = 0
    for i in range(0, n, blocksize):
        m = min(blocksize, n - i)
        code, pos, acc, nacc = _take(buf, pos, acc, nacc, _FSBITS)
        if nacc < 0:
            return -1
        fs = code - 1
        for j in range(m):
            if fs < 0:
                d = np.int64(0)
            elif fs == _FSMAX:
                d, pos, acc, nacc = _take(buf, pos, acc, nacc, _BBITS)
                if nacc < 0:
                    return -1
            else:
                top = np.int64(0)  # count the zeros up to the one: the pending bits, then whole bytes
                while acc == 0:
                    top += nacc
                    if pos >= nb or top > 0xFFFFFFFF:
                        return -1
                    acc = np.uint64(buf[pos])
                    pos += 1
                    nacc = 8
                k = _bit_length(acc)
                top += nacc - k
                nacc = k - 1
                acc &= np.uint64((1 << nacc) - 1)
                low, pos, acc, nacc = _take(buf, pos, acc, nacc, fs)
                if nacc < 0:
                    return -1
                d = ((top << fs) | low) & 0xFFFFFFFF
            p = (d >> 1) if (d & 1) == 0 else ~(d >> 1)
            v = (p + last) & 0xFFFFFFFF
            if v >= 0x80000000:
                v -= 0x100000000
            out[i + j] = v
            last = v
    return 0


def rice_encode_int32(pixels: np.ndarray, blocksize: int = 32) -> bytes:
    """The RICE_1 stream of ``pixels`` (any integer array whose values fit in int32, taken in C order).

    Raises ValueError for an empty array, values outside int32, or a block size other than 16 or 32 (the
    two that FITS tile compression defines).
    """
    if blocksize not in (16, 32):
        raise ValueError(f"blocksize must be 16 or 32 (the FITS RICE_1 block sizes), not {blocksize}")
    a = np.asarray(pixels)
    if a.dtype.kind not in "iu":
        raise ValueError(f"RICE_1 here compresses integers, not dtype {a.dtype}")
    if a.size == 0:
        raise ValueError("nothing to compress: the array is empty")
    if a.dtype != np.int32:
        if int(a.min()) < -(2**31) or int(a.max()) >= 2**31:
            raise ValueError("values outside the int32 range cannot be stored as 4-byte RICE_1 pixels")
        a = a.astype(np.int32)
    a = np.ascontiguousarray(a).reshape(-1)
    nblocks = -(-a.size // blocksize)
    out = np.empty(4 + nblocks * (4 * blocksize + 2) + 16, np.uint8)
    used = _encode(a, blocksize, out)
    if used < 0:  # the size above bounds every block; this would be a bug here
        raise RuntimeError("Rice encoder ran out of its output buffer")
    return out[:used].tobytes()


def rice_decode_int32(stream, count: int, blocksize: int = 32) -> np.ndarray:
    """``count`` int32 pixels from a RICE_1 stream (bytes or a uint8 array). Raises :class:`RiceError` if
    the stream holds fewer pixels (truncated or corrupt)."""
    if blocksize not in (16, 32):
        raise ValueError(f"blocksize must be 16 or 32 (the FITS RICE_1 block sizes), not {blocksize}")
    if count < 0:
        raise ValueError(f"pixel count must be >= 0, not {count}")
    buf = np.frombuffer(stream, np.uint8) if isinstance(stream, bytes | bytearray | memoryview) else stream
    out = np.empty(count, np.int32)
    if count and _decode(np.ascontiguousarray(buf, np.uint8), blocksize, out) < 0:
        raise RiceError(f"the RICE_1 stream of {len(buf)} bytes ends before its {count} pixels: truncated or corrupt")
    return out
