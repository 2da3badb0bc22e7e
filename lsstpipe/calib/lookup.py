"""ISR's side of the calibration database: the certified masters valid at a time, as :class:`IsrCalibs`.

:func:`isr_calibs_from_db` asks ``REPO/calib.sqlite3`` for the bias, dark, flat (of the band), defects,
crosstalk and — in the fringe bands — fringe valid at the exposure's MJD, checks each file against the
checksum it was certified with, and reads it. Bias and flat are required; the others are used where
certified (a run without bright sources has no crosstalk, a band without science exposures no fringe).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lsstpipe.calib.cpp import calib_db_path
from lsstpipe.calib.masters import read_master_defects, read_master_image
from lsstpipe.camera import Detector, get_camera
from lsstpipe.db.calib import CalibrationDatabase, CalibrationNotFound, CalibrationRecord
from lsstpipe.io.filememo import FileMemo
from lsstpipe.pipelines.isr import FRINGE_BANDS, IsrCalibs
from lsstpipe.repo import Repository, sha256_file

__all__ = ["isr_calibs_from_db", "CalibrationChecksumError"]


class CalibrationChecksumError(ValueError):
    """A master's file does not match the checksum it was certified with (changed or corrupted)."""


#: sha256 of each master file, once per process and file version: a worker looks up the same masters for many
#: CCD jobs, and hashing a full-size master (~200 MB) costs ~70 ms, 0.35 s per job for its four or five.
_DIGESTS: FileMemo[str] = FileMemo(lambda path: sha256_file(path), 4096, "master")  # sha256_file bound at call time


def _verified(repo: Path, record: CalibrationRecord) -> Path:
    path = repo / record.path
    if not path.is_file():
        raise FileNotFoundError(f"certified {record.calib_type.value} {path} (run {record.run!r}) is missing; "
                                "restore it or certify a new run")  # fmt: skip
    digest = _DIGESTS(path)
    if digest != record.checksum:
        raise CalibrationChecksumError(f"{path} has sha256 {digest}, but run {record.run!r} certified "
                                       f"{record.checksum}; the file changed after certification: re-run "
                                       "calibration products production")  # fmt: skip
    return path


def isr_calibs_from_db(repo: str | os.PathLike, detector: str | Detector, band: str, mjd: float) -> IsrCalibs:
    """Master calibrations of ``detector`` in ``band`` valid at ``mjd``, from the calibration database.

    Parameters
    ----------
    repo : str or os.PathLike
        The data repository (its ``calib.sqlite3`` and ``calib/``).
    detector : str or Detector
        The detector or its name.
    band : str
        The exposure's filter (selects the flat and, in z/y, the fringe).
    mjd : float
        The exposure's time: each master is the one certified last among those valid then.

    Returns
    -------
    IsrCalibs
        bias (ADU), dark (e-/s), flat, defects (boxes), crosstalk (16×16 or None), fringe (or None).

    Raises
    ------
    CalibrationNotFound
        No bias or flat valid at ``mjd`` (the message lists what is certified).
    CalibrationChecksumError, FileNotFoundError
        A certified file changed or disappeared.
    """
    root = Path(repo)
    name = detector if isinstance(detector, str) else detector.name
    db_path = calib_db_path(root)
    if not db_path.is_file():
        raise CalibrationNotFound(f"{root} has no calibration database ({db_path.name}); run "
                                  "jobs/calibration_products.py on it first")  # fmt: skip
    with CalibrationDatabase(db_path) as db:

        def optional(kind: str, flt: str | None) -> CalibrationRecord | None:
            try:
                return db.lookup(kind, name, flt, mjd)
            except CalibrationNotFound:
                return None

        bias = read_master_image(_verified(root, db.lookup("bias", name, None, mjd)))
        flat = read_master_image(_verified(root, db.lookup("flat", name, band, mjd)))
        rec = optional("dark", None)
        dark = read_master_image(_verified(root, rec)) if rec else None
        rec = optional("defects", None)
        defects = read_master_defects(_verified(root, rec)) if rec else np.zeros((0, 4), np.int64)
        rec = optional("fringe", band) if band in FRINGE_BANDS else None
        fringe = read_master_image(_verified(root, rec)) if rec else None
        rec = optional("crosstalk", None)
        crosstalk = None
        if rec is not None:
            from lsstpipe.calib.crosstalk import matrix_for_detector, read_crosstalk

            det = get_camera(Repository(root).read_config()["camera"])[name] if isinstance(detector, str) else detector
            crosstalk = matrix_for_detector(read_crosstalk(_verified(root, rec))[0], det)
    return IsrCalibs(bias=bias, dark=dark, flat=flat, defects=defects, crosstalk=crosstalk, fringe=fringe)
