"""Writing FITS files that are byte-reproducible and never seen half-written; reading image planes without
holding more than the result."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from astropy.io import fits

__all__ = ["read_image", "write_bytes_atomic", "write_fits_atomic"]

_BITPIX = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def read_image(hdu, cut: tuple[slice, slice] | None = None, dtype=np.float32, band_bytes: int = 4 << 20) -> np.ndarray:
    """The pixels of a 2-D image HDU (or the cut of them that two slices of step 1 give) as a new C-contiguous
    array of ``dtype``, from a file opened with ``fits.open(path, memmap=False)`` whose data was not read.

    The rows are read by plain file reads, a band of ~``band_bytes`` at a time, and converted into the result:
    neither a memory map of the file (whose pages count in the process's resident memory while they are
    copied: ~190 MB at a time for a full-size CCD's template patches) nor the whole plane in the file's byte
    order is held. Compressed HDUs and scaled ones (BSCALE/BZERO, BLANK) are read through astropy's
    ``section``, which gives the same values; an HDU whose data is in memory is cut from it.
    """

    def through_astropy(pixels) -> np.ndarray:
        return np.ascontiguousarray(pixels[cut] if cut is not None else pixels[...], dtype=dtype)

    if isinstance(hdu, fits.CompImageHDU):
        return through_astropy(hdu.section)  # only the tiles the cut covers
    info = None if "data" in hdu.__dict__ else hdu.fileinfo()
    path = getattr(info["file"], "name", None) if info else None
    if path is None:
        return through_astropy(hdu.data)  # already in memory, or not from a file
    hdr = hdu.header
    if (len(hdu.shape) != 2 or hdr.get("BSCALE", 1) != 1 or hdr.get("BZERO", 0) != 0 or "BLANK" in hdr
            or hdr["BITPIX"] not in _BITPIX):  # fmt: skip
        return through_astropy(hdu.section)  # astropy scales and blanks: the rows the cut covers
    ny, nx = hdu.shape
    rows, cols = cut if cut is not None else (slice(None), slice(None))
    y0, y1, ystep = rows.indices(ny)
    x0, x1, xstep = cols.indices(nx)
    if ystep != 1 or xstep != 1:
        return through_astropy(hdu.section)
    out = np.empty((max(y1 - y0, 0), max(x1 - x0, 0)), dtype)
    if out.size == 0:
        return out
    word = np.dtype(_BITPIX[hdr["BITPIX"]])
    band = max(1, min(y1 - y0, band_bytes // (nx * word.itemsize)))
    buf = np.empty((band, nx), word)
    with open(path, "rb") as f:
        for y in range(y0, y1, band):
            n = min(band, y1 - y)
            f.seek(info["datLoc"] + y * nx * word.itemsize)
            if f.readinto(memoryview(buf[:n]).cast("B")) != n * nx * word.itemsize:
                raise OSError(f"{path}: HDU {hdu.name or '?'} ends before row {y + n} of {ny} (truncated "
                              "file): write or copy it again")  # fmt: skip
            out[y - y0 : y - y0 + n] = buf[:n, x0:x1]
    return out


def write_fits_atomic(path: Path, hdul: fits.HDUList, checksum_comment: str) -> None:
    """Write ``hdul`` to ``path`` with checksums whose comment is fixed (astropy's default holds the write
    time: the same data would give different bytes), through a temporary file in the same directory that is
    fsynced and renamed into place, so readers never see a partial file. The HDUs get their checksums."""
    hdul.update_extend()  # astropy would add EXTEND while writing, after the checksum was computed
    for hdu in hdul:
        hdu.add_checksum(when=checksum_comment)
    _atomically(path, lambda f: hdul.writeto(f, checksum=False))  # keep the deterministic checksums added above


def write_bytes_atomic(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` one after the other to ``path`` the same way: never seen half-written."""

    def write(f) -> None:
        for chunk in chunks:
            f.write(chunk)

    _atomically(path, write)


def _atomically(path: Path, write: Callable) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
