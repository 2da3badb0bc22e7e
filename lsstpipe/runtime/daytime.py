"""Daytime DM operations after the night (LDM-230 §2.5): the APDB's daily snapshot and the daytime MOPS.

When the night's last visit is done, the OCS configures the Alert Production Cluster in daytime mode and
the DMCS runs the day's jobs: a consistent read-only snapshot of the APDB for the day's statistical
queries; the MOPS over the DIASources no Solar System object claimed (tracklets, tracks, orbit fits,
new and updated SSObjects, :mod:`lsstpipe.pipelines.mops`); the SSObjects stored in the APDB with Rubin's
columns; and the next night's ephemeris coefficients, which a night started on the same output folder
gives its workers for association (:func:`night_coefficients`).

The MOPS's orbit table (Rubin's APDB SSObject table carries no orbital elements) is kept as
``OUT/mops/ssobjects.npy`` (:data:`~lsstpipe.pipelines.mops_orbits.SSOBJECT_DTYPE`), read again the next day.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["night_coefficients", "run_day"]


def _orbits_path(out: Path) -> Path:
    return Path(out) / "mops" / "ssobjects.npy"


def load_orbits(out: Path) -> np.ndarray:
    """The MOPS's SSObject orbit table kept under ``out`` (empty before the first day)."""
    from lsstpipe.pipelines.mops_orbits import SSOBJECT_DTYPE

    path = _orbits_path(out)
    if not path.is_file():
        return np.zeros(0, SSOBJECT_DTYPE)
    table = np.load(path, allow_pickle=False)
    if table.dtype != SSOBJECT_DTYPE:
        raise ValueError(f"{path} is not a MOPS orbit table (dtype {table.dtype}); remove it or restore it")
    return table


def night_coefficients(out: Path, mjd_start: float, mjd_end: float) -> np.ndarray | None:
    """Ephemeris coefficients of the known SSObjects over a night (None when the MOPS found none yet)."""
    from lsstpipe.pipelines.mops_orbits import nightly_coefficients

    orbits = load_orbits(out)
    return nightly_coefficients(orbits, mjd_start, mjd_end) if len(orbits) else None


def _sources(config_path: Path):
    """Every DIASource of the APDB: id, midpoint, position, SSObject (one query, any backend)."""
    import pandas as pd
    import sqlalchemy
    from lsst.dax.apdb import Apdb
    from sqlalchemy.pool import NullPool

    config = Apdb.from_uri(str(config_path)).getConfig()
    engine = sqlalchemy.create_engine(config.db_url, poolclass=NullPool)
    table = f'"{config.namespace}".' if config.namespace else ""
    try:
        with engine.connect() as conn:
            return pd.read_sql_query(f'SELECT "diaSourceId", "midpointMjdTai", "ra", "dec", "ssObjectId" FROM '
                                     f'{table}"{config.prefix}DiaSource"', conn)  # fmt: skip
    finally:
        engine.dispose()


def run_day(out: Path, day_obs: int, next_night: tuple[float, float], orbit_fitting: bool = True) -> dict:
    """The day's jobs for the night written under ``out``; returns a summary for the manifest.

    Parameters
    ----------
    out : path
        The night's output folder (``apdb-config.yaml`` in it).
    day_obs : int
        The observing day (``YYYYMMDD``) the snapshot is named after.
    next_night : (float, float)
        The next night's ``(mjd_start, mjd_end)`` (TAI) for the ephemeris coefficients.
    orbit_fitting : bool
        Run the MOPS (the Alert Production Cluster's daytime ``pipeline.orbit_fitting``); False: the APDB's
        snapshot only.
    """
    import pandas as pd

    from lsstpipe.db.apdb import Level1Database
    from lsstpipe.pipelines.mops import run_mops

    out = Path(out)
    db = Level1Database(out / "apdb-config.yaml")
    snapshots = out / "snapshots"
    snapshots.mkdir(exist_ok=True)
    target = snapshots / f"apdb-{day_obs}.sqlite3"
    snapshot = str(target) if target.exists() else db.snapshot(snapshots, day_obs)  # a restarted day keeps it
    src = _sources(out / "apdb-config.yaml")
    free = src[src["ssObjectId"].isna() | (src["ssObjectId"] == 0)]
    if not orbit_fitting:
        summary = {"snapshot": snapshot, "dia_sources": int(len(src)), "unclaimed_dia_sources": int(len(free)),
                   "orbit_fitting": False}  # fmt: skip
        log.info("daytime (no orbit fitting by configuration): %s", summary)
        return summary
    orbits = load_orbits(out)
    result = run_mops(free["midpointMjdTai"].to_numpy(float), free["ra"].to_numpy(float),
                      free["dec"].to_numpy(float), orbits, next_night=next_night)  # fmt: skip
    (out / "mops").mkdir(exist_ok=True)
    np.save(_orbits_path(out), result.ssobjects)
    if result.coefficients is not None:
        np.save(out / "mops" / "next-night-coefficients.npy", result.coefficients)
    known = set(db.ss_objects()["ssObjectId"].astype(np.int64)) if len(orbits) else set()
    fresh = result.ssobjects[~np.isin(result.ssobjects["ssObjectId"], list(known))]
    if len(fresh):
        from lsstpipe.pipelines.association import BANDS

        rows = {"ssObjectId": fresh["ssObjectId"], "nObs": fresh["numObs"], "arc": fresh["arc"]}
        for b in BANDS:
            rows[f"{b}_nObs"] = rows[f"{b}_nObsUsed"] = np.zeros(len(fresh), np.int32)
        db.store_ss_objects(pd.DataFrame(rows))
    summary = {"snapshot": snapshot, "dia_sources": int(len(src)), "unclaimed_dia_sources": int(len(free)),
               "tracklets": int(len(result.tracklets)), "tracks": int(len(result.tracks)),
               "ssobjects": int(len(result.ssobjects)), "new_ssobjects": int(len(fresh)),
               "linked_dia_sources": int(np.count_nonzero(result.ss_object_ids))}  # fmt: skip
    log.info("daytime: %s", summary)
    return summary
