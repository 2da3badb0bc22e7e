"""The Level 1 half of a CCD job on a simulated ``mini`` CCD: prefetch → chain → association, APDB, alerts.

One CCD observed on two visits of a fixed pointing (so the second visit sees the first one's DIAObjects):
alerts == DIASources == stored rows, every alert valid and with the right history, retries add nothing,
a CCD without template gives no alert and a flag.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import fastavro
import lsst.dax.apdb  # noqa: F401 — required (install_requires): missing is an error, not a skip
import numpy as np
import pytest

from kernels.astrometry import angular_separation_deg
from lsstpipe.alerts import AlertWriter, read_alerts, read_cutout
from lsstpipe.camera import get_camera
from lsstpipe.db.apdb import Level1Database, write_apdb_config
from lsstpipe.pipelines import level1 as L1
from lsstpipe.pipelines.ap import process_ccd
from lsstpipe.pipelines.inputs import load_ccd_inputs
from lsstpipe.pipelines.level1_truth import ssobjects_from_truth
from lsstpipe.pipelines.mops_orbits import nightly_coefficients
from lsstpipe.repo import Repository
from lsstpipe.sim.simulate import SimulationRequest, default_sky, run_simulation
from lsstpipe.sim.sky import SkyConfig

DET = "R11_S12"


def fixed_pointing_opsim(path: Path, minutes, ra: float = 330.0, dec: float = -25.0, band: str = "r",
                         start_mjd: float = 60218.10, seed: int = 3) -> Path:  # fmt: skip
    """An opsim-format database of visits to one pointing (±2″ dithers, fixed rotation) at ``minutes``."""
    rng = np.random.default_rng(seed)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE observations (observationId INTEGER, observationStartMJD REAL, visitTime REAL, "
                "visitExposureTime REAL, filter TEXT, seeingFwhmGeom REAL, seeingFwhmEff REAL, "
                "fiveSigmaDepth REAL, fieldRA REAL, fieldDec REAL, rotSkyPos REAL)")  # fmt: skip
    for k, m in enumerate(minutes):
        con.execute("INSERT INTO observations VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (k, start_mjd + m / 1440.0, 34.0, 30.0, band, 0.7, 0.8, 24.4,
                     ra + rng.uniform(-2, 2) / 3600, dec + rng.uniform(-2, 2) / 3600, 10.0))  # fmt: skip
    con.commit()
    con.close()
    return path


def level1_sky(**changes) -> SkyConfig:
    """``mini``'s sky with more stars (enough calibrators on one 504×512 CCD at every dither) and variables."""
    sky = default_sky(get_camera("mini"))
    return dataclasses.replace(sky, **{"star_density": 2 * sky.star_density, "variable_fraction": 0.1, **changes})


def night_coefficients(repo: Repository, margin_days: float = 0.05) -> np.ndarray:
    """The night's SS coefficients from the true orbits (a perfect daytime MOPS), objects near the field."""
    from lsstpipe.pipelines.mops_orbits import _orbit_of

    exps = repo.exposures("OBJECT")
    mjds = [float(e["mjd_obs"]) for e in exps]
    ss = ssobjects_from_truth(repo)
    near = [bool(angular_separation_deg(*_orbit_of(r).radec(np.array([min(mjds)]))[:2], exps[0]["ra"],
                                        exps[0]["dec"])[0] < 0.5) for r in ss]  # fmt: skip
    return nightly_coefficients(ss[np.array(near, bool)], min(mjds) - margin_days, max(mjds) + margin_days)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    base = tmp_path_factory.mktemp("level1")
    opsim = fixed_pointing_opsim(base / "opsim.db", (0.0, 30.0))
    run_simulation(SimulationRequest(repo=str(base / "repo"), opsim=str(opsim), detectors=(DET,), cds=False,
                                     seed=5, progress=False, sky=level1_sky()))  # fmt: skip
    repo = Repository(base / "repo")
    visits = sorted({int(e["visit"]) for e in repo.exposures("OBJECT")})
    inputs = {v: load_ccd_inputs(repo, v, DET, calibs="truth") for v in visits}
    return repo, visits, inputs, night_coefficients(repo)


def _run(repo, visits, inputs, coefficients, out: Path, batch_size: int = 7):
    db = Level1Database(write_apdb_config(out))
    runs = {}
    with AlertWriter(out, batch_size=batch_size) as writer:
        for v in visits:
            mid = L1.visit_midpoint_mjd_tai(inputs[v])
            pre = L1.prefetch_region(db, inputs[v], mid, coefficients)
            res = process_ccd(dataclasses.replace(inputs[v], dia_objects=pre.dia_objects_for_forced()))
            counts = L1.ccd_level1(inputs[v], res, pre, visit=v, detector_id=inputs[v].detector.id,
                                   midpoint_mjd_tai=mid, apdb=db, alerts=writer)  # fmt: skip
            runs[v] = (mid, pre, res, counts)
    return db, runs


@pytest.fixture(scope="module")
def night(mini, tmp_path_factory):
    repo, visits, inputs, coefficients = mini
    out = tmp_path_factory.mktemp("out")
    db, runs = _run(repo, visits, inputs, coefficients, out)
    return out, db, runs


def _alerts(out: Path, visit: int, detector: int, schema=None) -> list[dict]:
    return [a for p in sorted((out / "alerts" / str(visit)).glob(f"{detector}-*.avro")) for a in read_alerts(p, schema)]


def test_one_alert_per_dia_source_and_per_stored_row(mini, night):
    repo, visits, inputs, _ = mini
    out, db, runs = night
    det = inputs[visits[0]].detector.id
    total = 0
    for v in visits:
        _, _, res, counts = runs[v]
        assert counts.flags == () and counts.diasources == len(res.dia_sources) > 0
        alerts = _alerts(out, v, det)
        assert counts.alerts == len(alerts) == counts.diasources
        assert len({a["diaSourceId"] for a in alerts}) == len(alerts)
        assert counts.first_alert_time <= counts.last_alert_time
        total += counts.diasources
    stored = db.row_counts()
    assert stored["DiaSource"] == total
    assert stored["DiaForcedSource"] == sum(c.forced for *_, c in runs.values())
    # The second visit found the first visit's DIAObjects: forced photometry and associations.
    second = runs[visits[1]]
    assert len(second[1].dia_objects) == runs[visits[0]][3].new_objects > 0
    assert second[3].forced > 0 and second[3].new_objects < second[3].diasources
    assert sum(c.ss_matched for *_, c in runs.values()) > 0, "the field should hold asteroids"


def test_every_alert_validates_and_carries_its_history(mini, night):
    from lsstpipe.alerts import load_schema

    repo, visits, inputs, _ = mini
    out, db, runs = night
    schema = load_schema()
    det = inputs[visits[0]].detector.id
    first_ids = {a["diaObjectId"] for a in (x["diaSource"] for x in _alerts(out, visits[0], det))}
    with_history = ss = 0
    for v in visits:
        for a in _alerts(out, v, det, schema):
            assert fastavro.validation.validate(a, schema.definition)
            src = a["diaSource"]
            assert src["visit"] == v and src["detector"] == det
            assert read_cutout(a["cutoutDifference"]).image.shape == read_cutout(a["cutoutScience"]).image.shape
            assert read_cutout(a["cutoutTemplate"]).image.shape == read_cutout(a["cutoutDifference"]).image.shape
            if src["ssObjectId"] is not None:
                ss += 1
                assert a["ssSource"]["ssObjectId"] == src["ssObjectId"] and src["diaObjectId"] is None
            if src["diaObjectId"] is not None:
                assert a["diaObject"]["diaObjectId"] == src["diaObjectId"]
            for p in a["prvDiaSources"]:
                assert p["diaObjectId"] == src["diaObjectId"] and p["midpointMjdTai"] < src["midpointMjdTai"]
            if v == visits[1] and src["diaObjectId"] is not None and src["diaObjectId"] in first_ids:
                with_history += 1
                assert len(a["prvDiaSources"]) >= 1 and a["diaObject"]["nDiaSources"] >= 2
                assert any(f["visit"] == v for f in a["prvDiaForcedSources"])  # this visit's forced source
    assert with_history > 0 and ss > 0


def test_rubins_client_reads_what_was_stored(night):
    from lsst.dax.apdb import Apdb

    out, db, runs = night
    mid, pre, _, _ = max(runs.values(), key=lambda r: r[0])
    client = Apdb.from_uri(str(out / "apdb-config.yaml"))
    from lsstpipe.db.apdb import circle

    objects = client.getDiaObjects(circle(pre.ra, pre.dec, pre.radius_deg))
    assert len(objects) == len(set(objects["diaObjectId"])) > 0
    sources = client.getDiaSources(circle(pre.ra, pre.dec, pre.radius_deg), None, L1._tai(mid + 0.01))
    assert len(sources) == db.row_counts()["DiaSource"]
    # psfNdata: the pixels of the PSF stamps the chain fitted (the difference image's PSF), per visit
    from lsstpipe.pipelines.diasources import DiaSourceConfig, psf_stamp_size

    for _, _, res, _ in runs.values():
        fwhm = float(res.difference.kernel_info.get("difference_psf_fwhm", np.nan))
        assert res.dia_stamp_size == psf_stamp_size(DiaSourceConfig(), fwhm) >= 15
    stamps = {r[2].dia_stamp_size ** 2 for r in runs.values()}
    assert set(sources["psfNdata"]) <= stamps and len(sources)


def test_rerun_of_a_ccd_adds_no_row_and_no_alert(mini, night):
    _, visits, inputs, _ = mini
    out, db, runs = night
    v = visits[1]
    mid, pre, res, counts = runs[v]
    det = inputs[v].detector.id
    before_rows, before = db.row_counts(), sorted(a["diaSourceId"] for a in _alerts(out, v, det))
    with AlertWriter(out, batch_size=4) as writer:
        again = L1.ccd_level1(inputs[v], res, pre, visit=v, detector_id=det, midpoint_mjd_tai=mid, apdb=db,
                              alerts=writer)  # fmt: skip
    assert L1.ALREADY_STORED in again.flags and again.alerts == counts.alerts and again.new_objects == 0
    assert again.ss_matched == counts.ss_matched and again.forced == counts.forced
    assert db.row_counts() == before_rows
    assert sorted(a["diaSourceId"] for a in _alerts(out, v, det)) == before


def test_a_prefetch_older_than_the_previous_visits_store_is_refreshed(mini, night, tmp_path):
    """Visit 2's prefetch read before visit 1's CCD stored (another rank still ran it): no second DIAObject."""
    _, visits, inputs, coefficients = mini
    _, _, runs = night
    (v0, v1), det = visits, inputs[visits[0]].detector.id
    counts = {}
    for refresh in (True, False):
        out = tmp_path / str(refresh)
        db = Level1Database(write_apdb_config(out))
        config = L1.Level1Config(refresh_objects=refresh)
        stale = L1.prefetch_region(db, inputs[v1], runs[v1][0], coefficients)
        first = L1.prefetch_region(db, inputs[v0], runs[v0][0], coefficients)
        with AlertWriter(out) as writer:
            kw = dict(detector_id=det, apdb=db, alerts=writer, config=config)
            L1.ccd_level1(inputs[v0], runs[v0][2], first, visit=v0, midpoint_mjd_tai=runs[v0][0], **kw)
            counts[refresh] = L1.ccd_level1(
                inputs[v1], runs[v1][2], stale, visit=v1, midpoint_mjd_tai=runs[v1][0], **kw
            )
    assert counts[True].new_objects == runs[v1][3].new_objects < counts[False].new_objects


class _Crash(RuntimeError):
    pass


class _FailingProducer:
    """A Kafka producer that dies after ``n`` alerts: the worker crashes between the APDB store and the alerts."""

    def __init__(self, n: int) -> None:
        self.n = n

    def produce(self, topic, key, value) -> None:
        self.n -= 1
        if self.n < 0:
            raise _Crash("broker went away")


def test_retry_after_a_crash_between_store_and_alerts(mini, tmp_path):
    repo, visits, inputs, coefficients = mini
    v = visits[0]
    db = Level1Database(write_apdb_config(tmp_path))
    mid = L1.visit_midpoint_mjd_tai(inputs[v])
    pre = L1.prefetch_region(db, inputs[v], mid, coefficients)
    res = process_ccd(inputs[v])
    det = inputs[v].detector.id
    kw = dict(visit=v, detector_id=det, midpoint_mjd_tai=mid, apdb=db)
    with pytest.raises(_Crash):
        L1.ccd_level1(inputs[v], res, pre, alerts=AlertWriter(tmp_path, batch_size=2, kafka=_FailingProducer(5)), **kw)
    assert 0 < len(_alerts(tmp_path, v, det)) < len(res.dia_sources)  # some batches left before the crash
    rows = db.row_counts()
    # the retry re-reads the region (which now holds the CCD's own rows) and must still not duplicate
    pre2 = L1.prefetch_region(db, inputs[v], mid, coefficients)
    with AlertWriter(tmp_path, batch_size=2) as writer:
        counts = L1.ccd_level1(inputs[v], res, pre2, alerts=writer, **kw)
    alerts = _alerts(tmp_path, v, det)
    assert counts.alerts == len(alerts) == len(res.dia_sources) == rows["DiaSource"]
    assert len({a["diaSourceId"] for a in alerts}) == len(alerts)
    assert db.row_counts() == rows
    assert all(a["prvDiaSources"] == [] for a in alerts)  # its own rows are not its history


def test_ccd_without_template_gives_no_alert_and_a_flag(mini, tmp_path):
    _, visits, inputs, _ = mini
    v = visits[0]
    db = Level1Database(write_apdb_config(tmp_path))
    mid = L1.visit_midpoint_mjd_tai(inputs[v])
    bare = dataclasses.replace(inputs[v], template_patches=())
    pre = L1.prefetch_region(db, bare, mid)
    assert pre.ss_predictions is None and len(pre.dia_objects_for_forced()) == 0
    res = process_ccd(bare)
    with AlertWriter(tmp_path) as writer:
        counts = L1.ccd_level1(bare, res, pre, visit=v, detector_id=bare.detector.id, midpoint_mjd_tai=mid,
                               apdb=db, alerts=writer)  # fmt: skip
    assert counts.alerts == counts.diasources == 0 and np.isnan(counts.first_alert_time)
    assert len(counts.flags) == 1 and counts.flags[0].startswith(L1.NO_DIFFERENCE) and "NO_TEMPLATE" in counts.flags[0]
    assert db.row_counts()["DiaSource"] == 0 and not (tmp_path / "alerts").exists()


def test_bad_arguments_are_refused_clearly(mini, night):
    _, visits, inputs, _ = mini
    out, db, runs = night
    mid, pre, res, _ = runs[visits[0]]
    with pytest.raises(ValueError, match="prefetch the region for this visit"):
        L1.ccd_level1(inputs[visits[0]], res, pre, visit=visits[0], detector_id=1, midpoint_mjd_tai=mid + 3,
                      apdb=db, alerts=AlertWriter(out))  # fmt: skip
    with pytest.raises(ValueError, match="margin_deg"):
        L1.ccd_region(inputs[visits[0]], -1.0)
    with pytest.raises(ValueError, match="number the visits below"):
        L1.id_visit(99999999999999)
    assert L1.id_visit(2023093000001) == (8673 * 100000 + 1) and L1.id_visit(1234) == 1234
    with pytest.raises(ValueError, match="cutout_size_arcsec"):
        L1.Level1Config(cutout_size_arcsec=0.0)


def test_alerts_off_by_configuration_associates_and_stores_without_alerts(mini, night, tmp_path):
    """``pipeline.alerts: false`` (alerts=None): the same APDB rows as with alerts, no alert file."""
    _, visits, inputs, coefficients = mini
    _, _, runs = night
    v = visits[0]
    db = Level1Database(write_apdb_config(tmp_path))
    mid, res = runs[v][0], runs[v][2]
    pre = L1.prefetch_region(db, inputs[v], mid, coefficients)
    counts = L1.ccd_level1(inputs[v], res, pre, visit=v, detector_id=inputs[v].detector.id, midpoint_mjd_tai=mid,
                           apdb=db, alerts=None)  # fmt: skip
    assert counts.alerts == 0 and counts.flags == (L1.ALERTS_OFF,) and np.isnan(counts.last_alert_time)
    assert counts.diasources == runs[v][3].diasources > 0 and counts.new_objects == runs[v][3].new_objects
    assert db.row_counts()["DiaSource"] == counts.diasources and not (tmp_path / "alerts").exists()
    again = L1.ccd_level1(inputs[v], res, pre, visit=v, detector_id=inputs[v].detector.id, midpoint_mjd_tai=mid,
                          apdb=db, alerts=None)  # fmt: skip
    assert again.flags == (L1.ALREADY_STORED, L1.ALERTS_OFF) and db.row_counts()["DiaSource"] == counts.diasources
