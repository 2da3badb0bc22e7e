"""The data repository: where raws, calibrations, templates, catalogues and truth live.

Layout (all paths relative to the repository root)::

    repo.yaml                               camera, seed, sky configuration, software version
    registry.sqlite3                        exposures and the files of each (see ``SCHEMA``)
    visits.csv                              the visit sequence that was simulated
    raw/{DAYOBS}/{OBSID}/{OBSID}_{DET}.fits raw exposures, one multi-extension FITS per CCD, as LSSTCam
                                            writes them (science: MC_O_…, calibration: MC_C_…)
    cds/                                    the Camera Data System buffer (lsstpipe.cds), raft images
    refcat/refcat.csv                       reference star catalogue over the footprint
    templates/{band}/{tract}/{patch}.fits   template coadds (image, variance, mask; TAN WCS)
    truth/instrument/{DET}.fits             the instrument signature each raw was made with
    truth/exposures/{DAYOBS}/{OBSID}/{OBSID}_{DET}_sources.csv   every injected source of the exposure
    truth/exposures/{DAYOBS}/{OBSID}/{OBSID}_{DET}_meta.json     WCS, PSF, zero point, sky, cosmic rays
    truth/transients.csv, truth/ssos.csv    light curves and orbits of the injected transients and
                                            Solar System objects
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

SCHEMA = """
CREATE TABLE IF NOT EXISTS exposure (
    obsid TEXT PRIMARY KEY,
    day_obs INTEGER NOT NULL,
    seq_num INTEGER NOT NULL,
    visit INTEGER,
    snap INTEGER,
    imgtype TEXT NOT NULL,
    band TEXT,
    mjd_obs REAL NOT NULL,
    exptime REAL NOT NULL,
    ra REAL, dec REAL, rotpa REAL, seeing REAL, airmass REAL
);
CREATE TABLE IF NOT EXISTS raw (
    obsid TEXT NOT NULL REFERENCES exposure(obsid),
    detector TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (obsid, detector)
);
CREATE TABLE IF NOT EXISTS template (
    band TEXT NOT NULL, tract INTEGER NOT NULL, patch TEXT NOT NULL, path TEXT NOT NULL,
    ra REAL, dec REAL, size_pix INTEGER, PRIMARY KEY (band, tract, patch)
);
"""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Repository:
    """A data repository rooted at ``root``; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- description -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "repo.yaml"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict:
        if not self.exists():
            raise FileNotFoundError(
                f"{self.root} is not an lsstpipe data repository (no repo.yaml); "
                f"create one with 'lsstpipe simulate --repo {self.root}'"
            )
        return yaml.safe_load(self.config_path.read_text())

    def create(self, config: Mapping) -> None:
        """Create the repository, or check that an existing one was made with the same camera and seed."""
        if self.exists():
            old = self.read_config()
            for key in ("camera", "seed"):
                if old.get(key) != config.get(key):
                    raise ValueError(
                        f"repository {self.root} was made with {key}={old.get(key)!r}, not {config.get(key)!r}; "
                        "use another --repo or the same settings"
                    )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.executescript(SCHEMA)
        (self.root / "README.txt").write_text((__doc__ or "").strip() + "\n")
        atomic_write_text(self.config_path, yaml.safe_dump(dict(config), sort_keys=True))

    # -- paths -------------------------------------------------------------------------------------
    def raw_path(self, day_obs: int, obsid: str, detector: str) -> Path:
        return self.root / "raw" / str(day_obs) / obsid / f"{obsid}_{detector}.fits"

    def truth_dir(self, day_obs: int, obsid: str) -> Path:
        return self.root / "truth" / "exposures" / str(day_obs) / obsid

    def instrument_truth_path(self, detector: str) -> Path:
        return self.root / "truth" / "instrument" / f"{detector}.fits"

    def template_path(self, band: str, tract: int, patch: str) -> Path:
        return self.root / "templates" / band / str(tract) / f"{patch}.fits"

    @property
    def cds_root(self) -> Path:
        return self.root / "cds"

    @property
    def refcat_path(self) -> Path:
        return self.root / "refcat" / "refcat.csv"

    # -- registry ----------------------------------------------------------------------------------
    def connect(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.root / "registry.sqlite3", timeout=30.0)
        db.row_factory = sqlite3.Row
        return db

    def register_exposure(self, row: Mapping) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.connect() as db:
            db.execute(f"INSERT OR REPLACE INTO exposure ({cols}) VALUES ({marks})", tuple(row.values()))

    def register_raw(self, obsid: str, detector: str, path: Path, sha256: str) -> None:
        with self.connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO raw (obsid, detector, path, sha256) VALUES (?, ?, ?, ?)",
                (obsid, detector, str(path.relative_to(self.root)), sha256),
            )

    def register_template(self, band: str, tract: int, patch: str, path: Path, ra: float, dec: float,
                          size: int) -> None:  # fmt: skip
        with self.connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO template VALUES (?, ?, ?, ?, ?, ?, ?)",
                (band, tract, patch, str(path.relative_to(self.root)), ra, dec, size),
            )

    def exposures(self, imgtype: str | None = None) -> list[dict]:
        with self.connect() as db:
            q = "SELECT * FROM exposure" + (" WHERE imgtype = ?" if imgtype else "") + " ORDER BY mjd_obs, obsid"
            return [dict(r) for r in db.execute(q, (imgtype,) if imgtype else ())]

    def raws(self, obsid: str | None = None) -> list[dict]:
        with self.connect() as db:
            q = "SELECT * FROM raw" + (" WHERE obsid = ?" if obsid else "") + " ORDER BY obsid, detector"
            return [dict(r) for r in db.execute(q, (obsid,) if obsid else ())]

    def templates(self, band: str | None = None) -> list[dict]:
        with self.connect() as db:
            q = "SELECT * FROM template" + (" WHERE band = ?" if band else "") + " ORDER BY band, tract, patch"
            return [dict(r) for r in db.execute(q, (band,) if band else ())]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv(path: Path, rows: Iterable[Mapping], columns: Iterable[str]) -> None:
    """Write rows to a CSV file atomically, with a fixed column order and repr-exact floats."""
    columns = list(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_fmt(r[c]) for c in columns])
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default))


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v)
    if hasattr(v, "item"):
        v = v.item()
        return repr(v) if isinstance(v, float) else str(v)
    return str(v)


def read_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of a CSV file written by :func:`write_csv`, numbers converted back."""
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _parse(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(v, v)
