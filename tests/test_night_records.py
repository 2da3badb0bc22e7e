"""What the night records without MPI: the jobs each event launches, each job's start and end in the control
database, the records the stores lost, and the Archive check of the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lsstpipe.archive import ImageKey, RawImageCache, blob_meta, encode_image
from lsstpipe.camera import get_camera
from lsstpipe.cds.image import prepare_image
from lsstpipe.control.cluster import JobCounts, batch_label
from lsstpipe.control.states import EntityName
from lsstpipe.db import ControlDatabase
from lsstpipe.runtime.dmcs_night import NightCluster, NightDMCS, SchedulerSettings
from lsstpipe.runtime.layout import layout_for_world
from lsstpipe.runtime.manifest import Manifest
from lsstpipe.runtime.messages import JobAssignment, JobKind, JobResult, Tag
from lsstpipe.runtime.plan import EventKind, NightPlan, PlannedEvent, Snap, Visit
from lsstpipe.runtime.postman import Envelope

APC, ARCHIVER = EntityName.ALERT_PRODUCTION_CLUSTER, EntityName.ARCHIVER
DETECTORS = ("R10_S00", "R10_S01", "R10_S02")


def _visit(number: int) -> Visit:
    return Visit(number, 1000 + number, "r", 10.0, -5.0, 0.0,
                 (Snap(0, f"MC_O_20260101_{number:06d}", "20260101", 61000.0, 15.0),))  # fmt: skip


def _plan(visits: tuple[Visit, ...], detectors: tuple[str, ...] = DETECTORS) -> NightPlan:
    return NightPlan(repo=None, camera=get_camera("mini"), visits=visits, rafts=("R10",), wavefront_rafts=(),
                     detectors=detectors, time_scale=0.1, cadence=4.0)  # fmt: skip


class _Post:
    """Rank 0's postman, keeping what it was asked to send."""

    rank = 0

    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []
        self.dead: set[int] = set()

    def send(self, payload, dest: int) -> None:
        self.sent.append((payload, dest))

    def ccd_jobs(self) -> dict[str, tuple[int, int]]:
        """detector → (job id, worker) of the last CCD job sent for it."""
        camera = get_camera("mini")
        return {camera[a.detector].name: (a.job_id, w) for a, w in self.sent
                if isinstance(a, JobAssignment) and a.kind is JobKind.CCD}  # fmt: skip


@pytest.fixture
def night(tmp_path: Path):
    """A mini night of 10 ranks — strings (5, 6) and (7, 8), spare 9 — recording into a control database."""
    layout = layout_for_world("mini", 10)
    assert layout.strings == ((5, 6), (7, 8)) and layout.spare_workers == (9,)
    db = ControlDatabase(tmp_path / "control.sqlite3")
    yield layout, db
    db.close()


def _dmcs(tmp_path: Path, layout, db, visits, **settings) -> tuple[NightDMCS, _Post]:
    post = _Post()
    return NightDMCS(post, layout, _plan(visits), Manifest(tmp_path), SchedulerSettings(**settings),
                     recorder=db), post  # fmt: skip


def _announce(dmcs: NightDMCS, db: ControlDatabase, visit: Visit) -> str:
    """What the Base DMCS and the conductor do for a nextVisit: the batch, then the scheduler's jobs."""
    label = batch_label("nextVisit", visit.visit, 0)
    db.jobs_submitted(APC, label, len(dmcs.plan.detectors))
    dmcs.on_event(APC, PlannedEvent(0.0, 0, EventKind.NEXT_VISIT, visit, 0))
    return label


def _result(dmcs: NightDMCS, result: JobResult) -> None:
    assert dmcs.handle(Envelope(result, result.rank, Tag.RESULT))


def _jobs(db: ControlDatabase, visit: Visit) -> dict[int, tuple]:
    (batch,) = [b for b in db.jobs_of_visit(visit.visit) if b.entity == APC.value]
    return {j.index: (j.node, j.rank, j.started is not None, j.ended is not None, j.result, j.reason)
            for j in batch.jobs}  # fmt: skip


def test_the_night_cluster_counts_the_jobs_of_its_plan():
    layout = layout_for_world("mini", 10)
    assert NightCluster(layout).jobs == JobCounts(3, 19), "mini: rafts R10, R11 and R00; 18 CCDs + 1 wavefront"
    assert NightCluster(layout, _plan((_visit(1),))).jobs == JobCounts(1, 3), "the plan's rafts and detectors"


def test_ccd_jobs_are_recorded_from_dispatch_to_their_result(tmp_path, night):
    layout, db = night
    v = _visit(1)
    dmcs, post = _dmcs(tmp_path, layout, db, (v,))
    _announce(dmcs, db, v)
    dmcs.dispatch()
    sent = post.ccd_jobs()
    assert {w for _, w in sent.values()} == {5, 6, 9}  # string 0, then the spare
    role = {5: "worker", 6: "worker", 9: "spare"}
    assert _jobs(db, v) == {k: (role[sent[d][1]], sent[d][1], True, False, None, None) for k, d in enumerate(DETECTORS)}

    failing, ok, dies = (sent[d] for d in DETECTORS)
    _result(dmcs, JobResult.failure(failing[0], failing[1], ValueError("bad pixels")))
    _result(dmcs, JobResult(ok[0], ok[1], True, 1.5, counts=(("alerts", 2),)))
    dmcs._declare_dead(dies[1], "no heartbeat")  # its job goes to a free worker at a lower priority
    dmcs.dispatch()
    moved = post.ccd_jobs()["R10_S02"]
    assert moved[1] != dies[1]
    assert _jobs(db, v)[2][:4] == (role[moved[1]], moved[1], True, False), "the job moved to its new rank"
    _result(dmcs, JobResult(moved[0], moved[1], True, 2.0))
    got = _jobs(db, v)
    assert got[0] == (role[failing[1]], failing[1], True, True, "failed", "ValueError: bad pixels")
    assert got[1] == (role[ok[1]], ok[1], True, True, "processed", "")
    assert got[2][1:5] == (moved[1], True, True, "processed") and "died" in got[2][5]
    assert db.write_failures == 0


class JobLate(Exception):
    """What a worker reports for a job past its deadline (by its name)."""


@pytest.mark.parametrize("reprocess", [True, False])
def test_a_late_job_ends_once(tmp_path, night, reprocess):
    layout, db = night
    v = _visit(1)
    dmcs, post = _dmcs(tmp_path, layout, db, (v,), reprocess=reprocess)
    _announce(dmcs, db, v)
    dmcs.dispatch()
    job, worker = post.ccd_jobs()["R10_S00"]
    _result(dmcs, JobResult.failure(job, worker, JobLate("past its deadline"), retriable=True))
    assert dmcs.manifest.ccd(v, "R10_S00").status == "late"
    if not reprocess:
        assert _jobs(db, v)[0][3:6] == (True, "late", "past its deadline"), "not run again: its end is recorded"
        return
    assert _jobs(db, v)[0][3] is False, "run again after the last visit: not ended yet"
    assert dmcs.start_reprocessing() == 1
    dmcs.dispatch()
    job, worker = post.ccd_jobs()["R10_S00"]
    _result(dmcs, JobResult(job, worker, True, 1.0))
    assert _jobs(db, v)[0][1:5] == (worker, True, True, "processed")
    assert db.write_failures == 0


def test_jobs_not_run_are_recorded_as_skipped_or_failed(tmp_path, night):
    layout, db = night
    v1, v2 = _visit(1), _visit(2)
    dmcs, post = _dmcs(tmp_path, layout, db, (v1, v2), sample_every=2)
    _announce(dmcs, db, v2)  # visit 2 is not sampled
    assert {k: r[2:5] for k, r in _jobs(db, v2).items()} == {k: (False, True, "skipped") for k in range(3)}
    assert "not sampled" in _jobs(db, v2)[0][5]
    _announce(dmcs, db, v1)
    dmcs.dispatch()
    job, worker = post.ccd_jobs()["R10_S01"]
    _result(dmcs, JobResult(job, worker, True, 1.0))
    # the end of the night: a job still running and one never sent
    dmcs.queue.append(dmcs.busy.pop(post.ccd_jobs()["R10_S02"][1]))
    assert dmcs.finish_open_jobs() == 2
    got = _jobs(db, v1)
    assert got[1][4] == "processed"
    assert got[0][2:6] == (True, True, "failed", "not processed by the end of the night")
    assert got[2][2:5] == (True, True, "failed")
    assert dmcs.finish_open_jobs() == 0 and db.write_failures == 0


def test_a_standby_does_not_record_a_job_the_database_has_ended(tmp_path, night):
    layout, db = night
    v = _visit(1)
    dmcs, post = _dmcs(tmp_path, layout, db, (v,))
    _announce(dmcs, db, v)
    dmcs.dispatch()
    job, worker = post.ccd_jobs()["R10_S00"]
    _result(dmcs, JobResult(job, worker, True, 1.0))
    before = _jobs(db, v)[0]
    # the DMCS crashes before the manifest is written: the standby runs every CCD again
    standby, post = _dmcs(tmp_path / "standby", layout, db, (v,))
    standby.requeue_visit(v)
    standby.dispatch()
    for job, worker in post.ccd_jobs().values():
        _result(standby, JobResult(job, worker, True, 1.0))
    got = _jobs(db, v)
    assert got[0] == before, "its result was recorded before the crash and stays"
    assert [got[k][4] for k in (1, 2)] == ["processed", "processed"]
    assert db.write_failures == 0, "no start or second result refused"
    # the requeued visit has a string again, whose collective gives its focal-plane values (before: none asked)
    assert v.visit in standby.visit_string and standby.reduce_visit(v)


def test_replicator_jobs_are_recorded(tmp_path, night):
    layout, db = night
    v = _visit(1)
    dmcs, post = _dmcs(tmp_path, layout, db, (v,))
    label = batch_label("startIntegration", v.visit, 0)
    db.jobs_submitted(ARCHIVER, label, 1)
    dmcs.on_event(ARCHIVER, PlannedEvent(0.0, 0, EventKind.START_INTEGRATION, v, 0))
    (job, replicator) = [(a, d) for a, d in post.sent if isinstance(a, JobAssignment)][0]
    assert replicator == layout.pairs[0].replicator
    (batch,) = [b for b in db.jobs_of_visit(v.visit) if b.entity == ARCHIVER.value]
    assert [(j.index, j.node, j.rank, j.ended) for j in batch.jobs] == [(0, "replicator", replicator, None)]
    _result(dmcs, JobResult.failure(job.job_id, replicator, OSError("link down")))
    (batch,) = [b for b in db.jobs_of_visit(v.visit) if b.entity == ARCHIVER.value]
    assert [(j.result, j.reason) for j in batch.jobs] == [("failed", "OSError: link down")]
    assert db.write_failures == 0


# ---- records lost ----------------------------------------------------------------------------------------
def test_the_manifest_counts_the_records_each_store_lost(tmp_path):
    m = Manifest(tmp_path)
    assert m.summary()["lost_records"] == 0 and m.to_json()["lost_records"] == {}
    efd = {"Summit EFD": 2}
    m.count_lost_records(lambda: {"control database": 1})
    m.count_lost_records(lambda: {"control database": 3, **efd})  # the same store again: counted once
    assert m.lost_records() == {"control database": 3, "Summit EFD": 2}
    efd["Summit EFD"] = 4  # read when asked, not when registered
    assert m.summary()["lost_records"] == 7
    m.write()
    assert json.loads(m.path.read_text())["lost_records"] == {"control database": 3, "Summit EFD": 4}
    m.count_lost_records(lambda: {"tape": -1})
    with pytest.raises(ValueError, match="lost records of 'tape': expected a count >= 0, got -1"):
        m.summary()


def test_the_night_counts_what_the_control_database_lost(tmp_path, night):
    layout, db = night
    v = _visit(1)
    dmcs, post = _dmcs(tmp_path, layout, db, (v,))
    _announce(dmcs, db, v)
    assert dmcs.manifest.summary()["lost_records"] == 0
    db.close()  # the database is gone: the starts cannot be written
    dmcs.dispatch()
    assert len(post.ccd_jobs()) == 3
    assert dmcs.manifest.lost_records() == {"control database": 3} and dmcs.manifest.summary()["lost_records"] == 3


# ---- the Archive check -----------------------------------------------------------------------------------
def _cache_copy(out: Path, image_id: str, seed: int) -> str:
    """Store a crosstalk-corrected raft image in the Archive's raw image cache under ``out``; its checksum."""
    rng = np.random.default_rng(seed)
    ccds = {f"R10_S{s}": rng.integers(0, 2**16, (16, 3, 4), dtype=np.int32) for s in ("00", "01")}
    image = prepare_image(image_id, "R10", "crosstalk_corrected", ccds)
    key = ImageKey(image_id, "R10", "crosstalk_corrected")
    data = encode_image(image)
    meta = blob_meta(key, data, "science")
    RawImageCache(out / "archive" / "raw_cache").put(key, data, meta)
    return meta.checksum


def test_archive_check_never_accepts_a_copy_that_differs(tmp_path):
    """The restart-dmcs fault runs the check twice: a mismatch must stay one."""
    v1, v2 = _visit(1), _visit(2)
    m = Manifest(tmp_path)
    good = m.image(v1, v1.snaps[0].image_id, "R10", "crosstalk_corrected")
    bad = m.image(v2, v2.snaps[0].image_id, "R10", "crosstalk_corrected")
    good_sum = _cache_copy(tmp_path, good.image_id, seed=1)
    other_sum = _cache_copy(tmp_path, bad.image_id, seed=2)
    bad.checksum = _cache_copy(tmp_path / "elsewhere", bad.image_id, seed=3)  # what the distributor confirmed
    expected = bad.checksum
    assert len({good_sum, other_sum, expected}) == 3
    for _ in range(2):
        problems = m.verify_archive()
        assert len(problems) == 1 and bad.image_id in problems[0] and other_sum in problems[0], problems
        assert (bad.raw_cache, bad.checksum) == (False, expected)
        assert (good.raw_cache, good.checksum) == (True, good_sum), "an unknown checksum is taken from the copy"
