"""Writing FITS files that are byte-reproducible and never seen half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from astropy.io import fits

__all__ = ["write_fits_atomic"]


def write_fits_atomic(path: Path, hdul: fits.HDUList, checksum_comment: str) -> None:
    """Write ``hdul`` to ``path`` with checksums whose comment is fixed (astropy's default holds the write
    time: the same data would give different bytes), through a temporary file in the same directory that is
    fsynced and renamed into place, so readers never see a partial file. The HDUs get their checksums."""
    hdul.update_extend()  # astropy would add EXTEND while writing, after the checksum was computed
    for hdu in hdul:
        hdu.add_checksum(when=checksum_comment)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            hdul.writeto(f, checksum=False)  # keep the deterministic checksums added above
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
