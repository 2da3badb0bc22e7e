"""The APDB through Rubin's client: schema from apdb.yaml, round trips, versions, concurrent CCD writers."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import astropy.time
import numpy as np
import pandas as pd
import pytest
import sqlalchemy
import yaml
from lsst.dax.apdb import Apdb
from lsst.sdm import schemas

from db_support import BACKENDS, backend_url
from lsstpipe.db.apdb import (
    APDB_CONFIG_NAME,
    APDB_FILE_NAME,
    Level1Database,
    circle,
    create_apdb,
    write_apdb_config,
)
from lsstpipe.db.sql import DatabaseError
from lsstpipe.pipelines import association as A
from lsstpipe.pipelines.ap import FORCED_DTYPE
from lsstpipe.pipelines.diasources import DIA_DTYPE

MJD = 60400.3


@pytest.fixture(params=BACKENDS)
def config_path(request, tmp_path):
    for url in backend_url(request.param, tmp_path, APDB_FILE_NAME):
        yield create_apdb(url, tmp_path / APDB_CONFIG_NAME)


def _engine(config_path: Path):
    return sqlalchemy.create_engine(Apdb.from_uri(str(config_path)).getConfig().db_url)


def _ccd(visit: int, detector: int, n: int, ra0: float = 80.0, dec0: float = -30.0, seed: int = 0):
    """DIASources and forced sources of one CCD, associated against an empty sky."""
    rng = np.random.default_rng(seed + 1000 * visit + detector)
    s = np.zeros(n, DIA_DTYPE)
    s["ra"] = ra0 + detector * 0.2 + rng.uniform(0, 0.05, n)
    s["dec"] = dec0 + rng.uniform(0, 0.05, n)
    s["psf_flux"] = rng.uniform(-200, 800, n)
    s["psf_flux_err"], s["snr"], s["npix"] = 20.0, np.abs(s["psf_flux"]) / 20, 30
    s["science_flux"], s["science_flux_err"] = 5000.0, 30.0
    s["is_negative"] = s["psf_flux"] < 0
    rows = A.dia_source_rows(s, visit, detector, "i", MJD, MJD + 0.0005, psf_stamp_size=15)
    # the first 3 sources are asteroids: matched to SSObjects, they get no DIAObject (stored as NULL)
    ss = np.zeros(3, A.SS_PREDICTION_DTYPE)
    ss["ssObjectId"], ss["ra"], ss["dec"], ss["radius_arcsec"] = [901, 902, 903], s["ra"][:3], s["dec"][:3], 1.0
    res = A.associate_ccd(rows, np.zeros(0, A.DIA_OBJECT_ROW), np.zeros(0, A.DIA_SOURCE_ROW), ss)
    forced = np.zeros(3, FORCED_DTYPE)
    forced["dia_object_id"] = [11, 12, 13]
    forced["ra"], forced["dec"], forced["psf_flux"], forced["psf_flux_err"] = ra0, dec0, 5.0, 1.0
    frows = A.forced_source_rows(forced, visit, detector, "i", MJD, MJD + 0.0005)
    return res, frows


def test_schema_is_rubins_apdb_yaml(config_path):
    spec = yaml.safe_load((Path(schemas.__file__).parent / "apdb.yaml").read_text())
    tables = {t["name"]: t for t in spec["tables"]}
    inspector = sqlalchemy.inspect(_engine(config_path))
    for name in ("DiaObject", "DiaSource", "DiaForcedSource", "SSObject"):
        got = {c["name"]: c for c in inspector.get_columns(name)}
        want = {c["name"]: c for c in tables[name]["columns"]}
        assert set(want) <= set(got), f"{name} lacks {set(want) - set(got)}"
        assert set(got) - set(want) <= {"pixelId"}  # the client's HTM index
        for col, c in want.items():
            assert got[col]["nullable"] == c.get("nullable", True), f"{name}.{col} nullability"
    # Our row arrays only use Rubin's column names, and the fluxes we write are the ones in nJy.
    for dtype, table in ((A.DIA_SOURCE_ROW, "DiaSource"), (A.DIA_OBJECT_ROW, "DiaObject"),
                         (A.FORCED_SOURCE_ROW, "DiaForcedSource")):  # fmt: skip
        cols = {c["name"]: c for c in tables[table]["columns"]}
        assert set(dtype.names) <= set(cols)
        for n in dtype.names:
            if "Flux" in n and cols[n]["datatype"] in ("float", "double"):  # a flux, not its flags or counts
                assert cols[n].get("fits:tunit") == "nJy", n


def test_store_and_read_back_with_rubins_client(config_path):
    res, forced = _ccd(5, 2, 40)
    db = Level1Database(config_path)
    assert db.store_ccd(5, 2, MJD, res.dia_objects, res.dia_sources, forced)
    # A second store of the same CCD (a retried job) writes nothing.
    assert not db.store_ccd(5, 2, MJD, res.dia_objects, res.dia_sources, forced)
    rubin = Apdb.from_uri(str(config_path))
    region = circle(80.425, -29.975, 0.2)
    objects = rubin.getDiaObjects(region)
    assert sorted(objects["diaObjectId"]) == sorted(res.dia_objects["diaObjectId"])
    sources = rubin.getDiaSources(region, None, astropy.time.Time(MJD + 1, format="mjd", scale="tai"))
    assert sorted(sources["diaSourceId"]) == sorted(res.dia_sources["diaSourceId"])
    by_id = sources.set_index("diaSourceId").loc[res.dia_sources["diaSourceId"]]
    np.testing.assert_allclose(by_id["psfFlux"], res.dia_sources["psfFlux"], rtol=1e-6)
    np.testing.assert_allclose(by_id["ra"], res.dia_sources["ra"], rtol=0, atol=1e-12)
    unassoc = res.dia_sources["diaObjectId"] == 0
    assert unassoc.any() and by_id["diaObjectId"][unassoc].isna().all()  # 0 is stored as NULL
    assert (by_id["diaObjectId"][~unassoc] == res.dia_sources["diaObjectId"][~unassoc]).all()
    assert db.row_counts()["DiaForcedSource"] == 3
    hist = db.dia_sources(80.425, -29.975, 0.2, MJD + 1, object_ids=objects["diaObjectId"])
    assert len(hist) == int((~unassoc).sum())


def test_object_versions_are_appended_with_validity_intervals(config_path):
    res1, _ = _ccd(1, 0, 5)
    db = Level1Database(config_path)
    db.store_ccd(1, 0, MJD, res1.dia_objects, res1.dia_sources)
    objects = db.dia_objects(80.025, -29.975, 0.2)
    history = db.dia_sources(80.025, -29.975, 0.2, MJD + 1, object_ids=objects["diaObjectId"])
    rows2 = res1.dia_sources[res1.dia_sources["ssObjectId"] == 0].copy()  # the static sources again
    rows2["diaSourceId"] = A.dia_source_id(2, 0, np.arange(len(rows2)))
    rows2["visit"], rows2["midpointMjdTai"] = 2, MJD + 1
    res2 = A.associate_ccd(rows2, objects, history, None)
    assert res2.n_new == 0 and res2.n_updated == len(objects)
    db.store_ccd(2, 0, MJD + 1, res2.dia_objects, res2.dia_sources)
    current = db.dia_objects(80.025, -29.975, 0.2)
    assert len(current) == len(objects) and (current["nDiaSources"] == 2).all()
    assert (current["validityStartMjdTai"] == MJD + 1).all()
    with _engine(config_path).connect() as conn:
        rows = conn.execute(sqlalchemy.text('SELECT "diaObjectId", "validityStartMjdTai", "validityEndMjdTai" '
                                            'FROM "DiaObject" ORDER BY 1, 2')).fetchall()  # fmt: skip
    assert len(rows) == 2 * len(objects)  # the old versions are kept, closed at the new version's start
    for old, new in zip(rows[::2], rows[1::2]):
        assert old[0] == new[0] and old[1:] == (MJD, MJD + 1) and new[1:] == (MJD + 1, None)


def test_ss_objects_round_trip(config_path):
    db = Level1Database(config_path)
    rows = {"ssObjectId": [7, 8], "nObs": [3, 4], "arc": [1.5, 2.0]}
    for b in A.BANDS:
        rows[f"{b}_nObs"] = rows[f"{b}_nObsUsed"] = [0, 0]
    db.store_ss_objects(pd.DataFrame(rows))
    got = db.ss_objects().sort_values("ssObjectId")
    assert list(got["ssObjectId"]) == [7, 8] and list(got["nObs"]) == [3, 4]


def _store_worker(args):
    config_path, visit, detector, n = args
    res, forced = _ccd(visit, detector, n)
    db = Level1Database(config_path)
    return db.store_ccd(visit, detector, MJD, res.dia_objects, res.dia_sources, forced)


def test_concurrent_ccd_writers_lose_and_duplicate_nothing(config_path):
    """4 processes store 6 CCDs, each CCD twice (a retried job racing its first run)."""
    jobs = [(str(config_path), 9, d, 20 + 3 * d) for d in range(6)] * 2
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(4) as pool:
        stored = pool.map(_store_worker, jobs, chunksize=1)
    assert sum(stored) == 6
    expected = [_ccd(9, d, 20 + 3 * d)[0] for d in range(6)]
    n_src = sum(len(r.dia_sources) for r in expected)
    n_obj = sum(len(r.dia_objects) for r in expected)
    counts = Level1Database(config_path).row_counts()
    assert counts == {"DiaObject": n_obj, "DiaSource": n_src, "DiaForcedSource": 3 * 6}
    with _engine(config_path).connect() as conn:
        ids = [r[0] for r in conn.execute(sqlalchemy.text('SELECT "diaSourceId" FROM "DiaSource"'))]
    assert sorted(ids) == sorted(np.concatenate([r.dia_sources["diaSourceId"] for r in expected]).tolist())


def test_write_apdb_config_for_the_night(tmp_path):
    out = tmp_path / "OUT"
    path = write_apdb_config(out)
    assert path == out / "apdb-config.yaml" and (out / "apdb.sqlite3").is_file()
    assert write_apdb_config(out) == path  # a restarted night keeps its database
    assert Apdb.from_uri(str(path)).getDiaObjects(circle(0, 0, 1)).empty
    with sqlite3.connect(out / "apdb.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(DatabaseError, match="write_apdb_config"):
        Level1Database(tmp_path / "missing.yaml")
    db = Level1Database(write_apdb_config(tmp_path))
    res, forced = _ccd(3, 1, 4)
    with pytest.raises(ValueError, match="another visit"):
        db.store_ccd(4, 1, MJD, res.dia_objects, res.dia_sources, forced)
    with pytest.raises(ValueError, match="MJD"):
        db.store_ccd(3, 1, 2460000.5, res.dia_objects, res.dia_sources, forced)
    with pytest.raises(ValueError, match="namespace"):
        create_apdb(tmp_path / "x.sqlite3", tmp_path / "x.yaml", namespace="n")
    assert os.path.exists(tmp_path / APDB_CONFIG_NAME)


def test_daily_snapshot_is_a_frozen_copy(config_path, tmp_path):
    db = Level1Database(config_path)
    res, frows = _ccd(1, 3, 20)
    assert db.store_ccd(1, 3, MJD, res.dia_objects, res.dia_sources, frows)
    where = db.snapshot(tmp_path / "snapshots", 20240101)
    before = db.row_counts()
    res2, frows2 = _ccd(2, 4, 15)
    assert db.store_ccd(2, 4, MJD + 1, res2.dia_objects, res2.dia_sources, frows2)
    assert db.row_counts()["DiaSource"] == before["DiaSource"] + 15
    if where.endswith(".sqlite3"):
        with sqlite3.connect(where) as conn:
            n = conn.execute('SELECT count(*) FROM "DiaSource"').fetchone()[0]
    else:
        with _engine(config_path).connect() as conn:
            n = conn.execute(sqlalchemy.text(f'SELECT count(*) FROM "{where}"."DiaSource"')).scalar()
    assert n == before["DiaSource"] == 20
    with pytest.raises(DatabaseError, match="never overwritten"):
        db.snapshot(tmp_path / "snapshots", 20240101)


def test_a_ccd_stored_by_a_racing_job_is_reported_not_duplicated(tmp_path):
    """On PostgreSQL a retry can race the original job past the 'already stored?' check: the loser's store
    fails on the primary keys (rolled back as one transaction) and must report 'already stored'."""
    db = Level1Database(create_apdb(tmp_path / APDB_FILE_NAME, tmp_path / APDB_CONFIG_NAME))
    res, frows = _ccd(3, 5, 10)
    assert db.store_ccd(3, 5, MJD, res.dia_objects, res.dia_sources, frows)

    class Racing:  # the other job's rows land between the check and the store
        def __init__(self, real):
            self.real, self.checks = real, 0

        def containsVisitDetector(self, visit, detector):  # noqa: N802 (the client's name)
            self.checks += 1
            return self.checks > 1 and self.real.containsVisitDetector(visit, detector)

        def store(self, *args):
            raise RuntimeError('duplicate key value violates unique constraint "DiaObject_pkey"')

    db.apdb = Racing(db.apdb)
    assert db.store_ccd(3, 5, MJD, res.dia_objects, res.dia_sources, frows) is False
    db.apdb = Racing(db.apdb.real)
    db.apdb.containsVisitDetector = lambda visit, detector: False  # not stored after all: a real failure
    with pytest.raises(DatabaseError, match="storing visit 3 detector 5"):
        db.store_ccd(3, 5, MJD, res.dia_objects, res.dia_sources, frows)
