"""Reader of the reference catalogue (``REPO/refcat/refcat.csv``): astrometric and photometric standards.

The file is a CSV with a header line naming its columns: ``id``, ``ra``, ``dec`` (degrees, ICRS) and, per
band, ``{band}_mag`` (AB) and ``{band}_flux_nJy`` (see :func:`lsstpipe.sim.simulate.write_reference_catalog`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from lsstpipe.io.filememo import FileMemo

__all__ = ["read_refcat", "cone"]


def cone(ra, dec, ra0: float, dec0: float, radius_deg: float) -> np.ndarray:
    """Boolean mask of the positions (deg) within ``radius_deg`` of (ra0, dec0)."""
    ra, dec = np.deg2rad(np.asarray(ra, dtype=float)), np.deg2rad(np.asarray(dec, dtype=float))
    d0 = math.radians(dec0)
    cosd = math.sin(d0) * np.sin(dec) + math.cos(d0) * np.cos(dec) * np.cos(ra - math.radians(ra0))
    return cosd >= math.cos(math.radians(radius_deg))


def read_refcat(path: str | os.PathLike, ra: float, dec: float, radius_deg: float) -> np.ndarray:
    """The reference stars within ``radius_deg`` of (ra, dec).

    Parameters
    ----------
    path : str or path-like
        The CSV file (``Repository(...).refcat_path``).
    ra, dec : float
        Centre of the cone (deg).
    radius_deg : float
        Cone radius (deg), > 0 and ≤ 90.

    Returns
    -------
    numpy.ndarray
        Structured array with every column of the file: ``id`` as int64, the rest float64.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    ValueError
        For a bad cone, or a file without ``ra`` and ``dec`` columns or with unparsable values.
    """
    path = Path(path)
    if not (np.isfinite(ra) and -90.0 <= dec <= 90.0 and 0.0 < radius_deg <= 90.0):
        raise ValueError(f"cone must have finite ra, |dec| ≤ 90 and 0 < radius ≤ 90 deg; got {ra}, {dec}, {radius_deg}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no reference catalogue; simulate a repository or give the right path")
    names, data = _parsed(path)
    dtype = np.dtype([(n, "i8" if n == "id" else "f8") for n in names])
    keep = cone(data[:, names.index("ra")], data[:, names.index("dec")], ra, dec, radius_deg)
    out = np.zeros(int(np.count_nonzero(keep)), dtype)
    for i, n in enumerate(names):
        out[n] = data[keep, i]
    return out


def _parse(path: Path) -> tuple[list[str], np.ndarray]:
    with Path(path).open() as fh:
        names = [c.strip() for c in fh.readline().strip().split(",")]
    if "ra" not in names or "dec" not in names:
        raise ValueError(f"{path}: the reference catalogue needs 'ra' and 'dec' columns; it has {names}")
    try:  # one pass, all as float64: the ids (< 2**53) stay exact
        data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot parse the reference catalogue ({exc})") from exc
    if data.size and data.shape[1] != len(names):
        raise ValueError(f"{path}: rows have {data.shape[1]} values but the header names {len(names)} columns")
    data.setflags(write=False)
    return names, data


#: The whole file parsed once per process (a worker reads cones of it for every CCD of the night), again
#: when it changes; one catalogue at a time: a night reads one repository.
_parsed: FileMemo[tuple[list[str], np.ndarray]] = FileMemo(_parse, 1, "reference catalogue")
