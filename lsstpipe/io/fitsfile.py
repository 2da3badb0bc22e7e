"""Writing FITS files that are byte-reproducible and never seen half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from astropy.io import fits

__all__ = ["write_bytes_atomic", "write_fits_atomic"]


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
