"""Read one CCD's inputs for :func:`lsstpipe.pipelines.ap.process_ccd` from a repository.

The I/O side of the per-CCD chain: raws of the visit's snaps, master calibrations (the Calibration
Products Production's certified masters when the repository has a calibration database, else — for
simulated repositories without one — the simulator's instrument truth), the reference catalogue and the
template patches around the CCD, and the nominal WCS from the boresight.
"""

from __future__ import annotations

import os

import numpy as np

from lsstpipe.camera import get_camera
from lsstpipe.io.raw import read_raw
from lsstpipe.io.refcat import read_refcat
from lsstpipe.pipelines.ap import CcdInputs
from lsstpipe.pipelines.characterize import initial_wcs
from lsstpipe.pipelines.isr import isr_from_truth, raw_metadata
from lsstpipe.pipelines.templates import read_template_patches
from lsstpipe.repo import Repository

__all__ = ["load_ccd_inputs", "visit_exposures"]


def visit_exposures(repo: Repository, visit: int) -> list[dict]:
    """The science exposures (snaps) of ``visit``, snap order; a clear error when there are none."""
    rows = sorted((r for r in repo.exposures("OBJECT") if r.get("visit") == visit), key=lambda r: r["snap"])
    if not rows:
        have = sorted({r["visit"] for r in repo.exposures("OBJECT")})
        raise LookupError(f"{repo.root}: no science exposure of visit {visit} (visits: {have[:10]}"
                          f"{' …' if len(have) > 10 else ''})")  # fmt: skip
    return rows


def _calibs(repo: Repository, detector: str, band: str, mjd: float, source: str):
    if source == "truth":
        return isr_from_truth(repo.root, detector, band)[1]
    if source == "db":
        from lsstpipe.calib.lookup import isr_calibs_from_db

        return isr_calibs_from_db(repo.root, detector, band, mjd)
    raise ValueError(f"calibration source must be 'truth' or 'db', got {source!r}")


def load_ccd_inputs(repo: str | os.PathLike | Repository, visit: int, detector: str, calibs: str = "auto",
                    dia_objects: np.ndarray | None = None, margin_deg: float = 0.02,
                    with_raws: bool = True) -> CcdInputs:  # fmt: skip
    """Read everything :func:`~lsstpipe.pipelines.ap.process_ccd` needs for one CCD of one visit.

    Parameters
    ----------
    repo : path or Repository
    visit : int
    detector : str
        Detector name (``R22_S11``).
    calibs : {'auto', 'db', 'truth'}
        Master calibrations from the calibration database (``db``), the simulator's truth (``truth``), or
        the database when the repository has one (``auto``).
    dia_objects : numpy.ndarray, optional
        Known DIAObjects (``id``, ``ra``, ``dec``) for forced photometry.
    margin_deg : float
        Extra radius around the CCD for the reference catalogue and the templates.
    with_raws : bool
        Read the raws from the repository; False leaves ``raw_snaps`` and ``snap_metadata`` empty for the
        caller to fill (a night's worker prefetches everything else before the snaps are read out, then
        takes the snaps from a distributor: :func:`dataclasses.replace`).
    """
    repo = repo if isinstance(repo, Repository) else Repository(repo)
    camera = get_camera(repo.read_config()["camera"])
    det = camera[detector]
    rows = visit_exposures(repo, visit)
    raws, metas = [], []
    for row in rows if with_raws else ():
        raw = read_raw(repo.raw_path(row["day_obs"], row["obsid"], det.name))
        raws.append(raw.stack())
        metas.append(raw_metadata(raw))
        del raw  # its segments, copied into the stack: not held while the rest loads
    first = rows[0]
    band = metas[0]["band"] if metas else str(first["band"])
    if calibs == "auto":
        calibs = "db" if (repo.root / "calib.sqlite3").exists() else "truth"
    masters = _calibs(repo, det.name, band, float(first["mjd_obs"]), calibs)
    wcs = initial_wcs(camera, det, float(first["ra"]), float(first["dec"]), float(first["rotpa"]))
    ny, nx = det.shape
    corners = wcs.all_pix2world([0, nx - 1, 0, nx - 1], [0, 0, ny - 1, ny - 1], 0)
    ra_c, dec_c = (float(v[0]) for v in wcs.all_pix2world([(nx - 1) / 2], [(ny - 1) / 2], 0))
    cosd = np.cos(np.radians(dec_c))
    radius = float(np.max(np.hypot((corners[0] - ra_c) * cosd, corners[1] - dec_c))) + margin_deg
    refcat = read_refcat(repo.refcat_path, ra_c, dec_c, radius)
    edge = np.linspace(0, 1, 9)
    bx = np.concatenate([edge * (nx - 1), np.full(9, nx - 1.0), edge[::-1] * (nx - 1), np.zeros(9)])
    by = np.concatenate([np.zeros(9), edge * (ny - 1), np.full(9, ny - 1.0), edge[::-1] * (ny - 1)])
    footprint = wcs.all_pix2world(bx, by, 0)  # the CCD's boundary on the sky (nominal WCS)
    patches = read_template_patches(repo, band, ra_c, dec_c, radius, footprint=footprint,
                                    margin=64)  # fmt: skip
    return CcdInputs(det, tuple(raws), tuple(metas), masters, refcat, wcs, tuple(patches), dia_objects)
