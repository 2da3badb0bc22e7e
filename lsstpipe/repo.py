"""The data repository: where raws, calibrations, templates, catalogues and truth live.

Layout (all paths relative to the repository root)::

    repo.yaml                               camera, seed, sky configuration, software version
                                            (a later simulation into the repository must match them)
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
import io
import json
import os
import shutil
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
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


#: Settings of ``repo.yaml`` that every simulation into one repository must share (with its visits).
SIMULATION_SETTINGS = ("camera", "seed", "sky", "noise")
#: What ``lsstpipe simulate`` writes, then the products made from it (the Calibration Products Production's
#: masters and their database): what replacing a simulation removes. ``repo.yaml`` goes last.
SIMULATION_PRODUCTS = ("raw", "cds", "refcat", "templates", "truth", "visits.csv", "simulation.json", "README.txt",
                       "registry.sqlite3")  # fmt: skip
DERIVED_PRODUCTS = ("calib", "calib.sqlite3")


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
        try:
            config = yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"{self.config_path} is not valid YAML ({exc}); restore it or simulate again") from None
        if not isinstance(config, dict) or "camera" not in config:
            raise ValueError(
                f"{self.config_path} does not describe an lsstpipe data repository (no camera); is --repo right?"
            )
        return config

    @property
    def visits_path(self) -> Path:
        return self.root / "visits.csv"

    def create(self, config: Mapping, visits: Sequence[Mapping] | None = None, overwrite: bool = False) -> list[str]:
        """Create the repository for a simulation, or check that an existing one holds the same simulation.

        Simulating into an existing repository again (to add calibrations, templates, the CDS buffer or
        detectors) must give the same data: the same :data:`SIMULATION_SETTINGS` and the same visits
        (``visits.csv``). Otherwise the old and new products would mix.

        Parameters
        ----------
        config : Mapping
            The settings to record in ``repo.yaml`` (camera, seed, sky, noise, software).
        visits : list of Mapping, optional
            The visits about to be simulated, as the rows of ``visits.csv``.
        overwrite : bool
            Replace an existing repository's simulation: remove its products (and the calibration products
            made from them, see :meth:`clear_simulation`) first.

        Returns
        -------
        list of str
            What was removed (with ``overwrite``), relative to the root.

        Raises
        ------
        ValueError
            If the root is a file, or an existing repository holds a simulation made with other settings
            or other visits and ``overwrite`` is false.
        """
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(
                f"{self.root} is a file, not a directory: give --repo a new directory or an existing lsstpipe "
                "data repository"
            )
        removed: list[str] = []
        if self.exists():
            if not overwrite:
                problems = self.simulation_differences(config, visits)
                if problems:
                    raise ValueError(
                        f"repository {self.root} holds a simulation made with other settings: {'; '.join(problems)}. "
                        "A later simulation into the same repository must use the same camera, seed and visit "
                        "options (--visits, --bands, --snaps, or --opsim, --night, --max-visits), e.g. to add "
                        "--calibs, templates or detectors. Use another --repo, or --overwrite to replace its "
                        "simulation (its raws, truth, templates, CDS buffer and calibration products are deleted)"
                    )
                return removed
            self.read_config()  # an lsstpipe repository's repo.yaml, before deleting anything
            removed = self.clear_simulation()
        self.root.mkdir(parents=True, exist_ok=True)
        with self.connect() as db:
            db.executescript(SCHEMA)
        (self.root / "README.txt").write_text((__doc__ or "").strip() + "\n")
        atomic_write_text(self.config_path, yaml.safe_dump(dict(config), sort_keys=True))
        return removed

    def simulation_differences(self, config: Mapping, visits: Sequence[Mapping] | None = None) -> list[str]:
        """How a simulation with ``config`` and ``visits`` differs from the one recorded here (empty: none)."""
        old = self.read_config()
        new = yaml.safe_load(yaml.safe_dump(dict(config)))  # as it would read back (tuples become lists)
        problems = [
            f"{key}={_short(old.get(key))}, not {_short(new.get(key))}"
            for key in SIMULATION_SETTINGS
            if key in new and old.get(key) != new.get(key)
        ]
        if problems or visits is None or not visits or not self.visits_path.is_file():
            return problems
        if self.visits_path.read_bytes().decode() != csv_text(visits, list(visits[0])):  # bytes: keep \r\n
            have, make = _describe_visits(read_csv(self.visits_path)), _describe_visits(visits)
            same = " with other pointings, times or conditions" if have == make else ""
            problems.append(f"it has {have}, this run makes {make}{same}")
        return problems

    def clear_simulation(self) -> list[str]:
        """Remove the simulation's products and those made from them; ``repo.yaml`` last, so that a removal
        that fails half-way leaves a repository that ``--overwrite`` can clear again.

        Returns
        -------
        list of str
            The entries removed, relative to the root.
        """
        removed = []
        for name in (*SIMULATION_PRODUCTS, *DERIVED_PRODUCTS):
            for sidecar in ("-wal", "-shm", "-journal") if name.endswith(".sqlite3") else ():
                (self.root / f"{name}{sidecar}").unlink(missing_ok=True)
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
            else:
                continue
            removed.append(name)
        self.config_path.unlink()
        return removed

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
        _write_rows(f, rows, columns)
    os.replace(tmp, path)


def csv_text(rows: Iterable[Mapping], columns: Iterable[str]) -> str:
    """The text :func:`write_csv` writes for ``rows``."""
    f = io.StringIO(newline="")
    _write_rows(f, rows, list(columns))
    return f.getvalue()


def _write_rows(f, rows: Iterable[Mapping], columns: list[str]) -> None:
    w = csv.writer(f)
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r[c]) for c in columns])


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe_visits(rows: Sequence[Mapping]) -> str:
    """``3 visits (bands i, 2 snaps each, MJD 60218.050–60218.090)``, for messages."""
    if not rows:
        return "no visits"
    bands = ",".join(dict.fromkeys(str(r["band"]) for r in rows))
    snaps = "/".join(str(s) for s in sorted({int(r["n_snaps"]) for r in rows}))
    mjd = sorted(float(r["mjd"]) for r in rows)
    return (f"{len(rows)} visit{'s' if len(rows) != 1 else ''} (band{'s' if ',' in bands else ''} {bands}, "
            f"{snaps} snap{'' if snaps == '1' else 's'} each, MJD {mjd[0]:.3f}–{mjd[-1]:.3f})")  # fmt: skip


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
