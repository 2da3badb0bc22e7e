"""The night runtime's pieces without MPI: faults, the plan's timeline, the manifest, the launcher, configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from lsstpipe import night_cli
from lsstpipe.runtime import faults as F
from lsstpipe.runtime.manifest import Manifest
from lsstpipe.runtime.messages import CcdData, ImageData, Tag, expect, tag_of
from lsstpipe.runtime.night import NightError, load_config
from lsstpipe.runtime.plan import EventKind, NightPlan, Snap, Visit


def test_faults_parse_spans_and_reject_bad_values():
    got = F.parse_faults(["kill-worker@2", "link-cut@2-3"], n_visits=4)
    assert [(f.kind, f.first, f.last) for f in got] == [("kill-worker", 2, 2), ("link-cut", 2, 3)]
    assert got[1].covers(3) and not got[1].covers(4) and str(got[1]) == "link-cut@2-3"
    for bad, words in (("explode@1", "unknown fault"), ("kill-worker", "FAULT@VISIT"), ("link-cut@3-2", "forward"),
                       ("corrupt@0", "from 1"), ("corrupt@5", "4 visit")):  # fmt: skip
        with pytest.raises(F.FaultError, match=words):
            F.parse_faults([bad], n_visits=4)


def _visit(number: int, snaps: int = 2) -> Visit:
    return Visit(number, 1000 + number, "r", 10.0, -5.0, 0.0,
                 tuple(Snap(k, f"MC_O_20260101_{number * 10 + k:06d}", "20260101", 61000.0, 15.0)
                       for k in range(snaps)))  # fmt: skip


def test_timeline_orders_each_visits_events():
    from lsstpipe.camera import get_camera

    plan = NightPlan(repo=None, camera=get_camera("mini"), visits=(_visit(1), _visit(2)), rafts=("R10",),
                     wavefront_rafts=(), detectors=("R10_S11",), time_scale=0.1, cadence=4.0)  # fmt: skip
    events = plan.timeline()
    assert [e.t for e in events] == sorted(e.t for e in events)
    first = [(e.kind, e.exposure) for e in events if e.visit.number == 1]
    assert first == [(EventKind.NEXT_VISIT, 0), (EventKind.START_INTEGRATION, 0), (EventKind.START_READOUT, 0),
                     (EventKind.END_READOUT, 0), (EventKind.START_INTEGRATION, 1), (EventKind.START_READOUT, 1),
                     (EventKind.END_READOUT, 1)]  # fmt: skip
    readout = [e for e in events if e.visit.number == 1 and e.kind is EventKind.START_READOUT][0]
    integration = [e for e in events if e.visit.number == 1 and e.kind is EventKind.START_INTEGRATION][0]
    assert readout.t - integration.t == pytest.approx(1.5)  # 15 s at time_scale 0.1
    assert min(e.t for e in events if e.visit.number == 2) == pytest.approx(4.0)


def test_manifest_round_trip_and_restart_keeps_only_processed(tmp_path):
    m = Manifest(tmp_path, {"ranks": 3})
    v = _visit(1)
    m.ccd(v, "R10_S11").set("processed", "", diasources=4, alerts=4)
    m.ccd(v, "R11_S11").set("failed", "DataUnavailable: link down")
    raw = m.image(v, v.snaps[0].image_id, "R10", "raw")
    raw.tape = True
    m.image(v, v.snaps[0].image_id, "R10", "crosstalk_corrected")
    m.write()
    data = json.loads((tmp_path / "manifest.json").read_text())
    ccds = {c["detector"]: c for c in data["visits"][0]["ccds"]}
    assert ccds["R10_S11"]["status"] == "processed" and ccds["R10_S11"]["alerts"] == 4
    assert ccds["R11_S11"]["reason"].startswith("DataUnavailable")
    images = data["visits"][0]["images"]
    assert {(i["kind"], i["tape"], i["raw_cache"]) for i in images} == {
        ("raw", True, False),
        ("crosstalk_corrected", False, False),
    }
    assert "replicator_done" not in images[0]
    again = Manifest(tmp_path)
    assert again.ccd(v, "R10_S11").status == "processed" and again.ccd(v, "R10_S11").alerts == 4
    assert again.ccd(v, "R11_S11").status == "queued"  # a failed CCD runs again after a restart
    assert m.summary()["archived"] == 1 and m.summary()["images"] == 2


def test_manifest_archive_check_finds_missing_copies(tmp_path):
    m = Manifest(tmp_path)
    v = _visit(1, snaps=1)
    im = m.image(v, v.snaps[0].image_id, "R10", "raw")
    im.tape = True  # claimed, but nothing is on tape: the read-back check must clear it
    problems = m.verify_archive()
    assert len(problems) == 1 and not im.tape


def test_runtime_messages_have_their_own_tags():
    h = ImageData(1, 2, 0, "MC_O_20260101_000001", "R10", "raw", "0" * 64, "1" * 64, 100, True, "science")
    assert tag_of(h) is Tag.IMAGE and expect(int(Tag.IMAGE), h) is h
    with pytest.raises(TypeError, match="carries a ImageData"):
        expect(int(Tag.CCD_DATA), h)
    assert tag_of(CcdData("x", "R10_S11", (16, 2, 2), "", 256)) is Tag.CCD_DATA


def test_launcher_flags_for_each_mpi(monkeypatch):
    monkeypatch.setattr(night_cli, "mpi_flavour", lambda exe: "mpich")
    cmd, flavour = night_cli.launcher_command(3, ["--repo", "R", "--out", "O"], "/usr/bin/mpiexec")
    assert flavour == "mpich" and cmd[:4] == ["/usr/bin/mpiexec", "-disable-auto-cleanup", "-n", "3"]
    assert cmd[-4:] == ["--repo", "R", "--out", "O"]
    monkeypatch.setattr(night_cli, "mpi_flavour", lambda exe: "openmpi")
    cmd, _ = night_cli.launcher_command(64, [], "/opt/ompi/bin/mpiexec")
    assert cmd[1:6] == ["--with-ft", "ulfm", "--mca", "btl", "tcp,self"] and "--oversubscribe" in cmd
    monkeypatch.setattr(night_cli, "mpi_flavour", lambda exe: "openmpi4")  # no ULFM: --with-ft is refused
    cmd, _ = night_cli.launcher_command(64, [], "/usr/bin/mpiexec")
    assert "--with-ft" not in cmd and "--oversubscribe" in cmd and cmd[-3:-1] == ["-m", "mpi4py"]
    assert ("--allow-run-as-root" in cmd) == (os.geteuid() == 0)
    with pytest.raises(ValueError, match="at least 2"):
        night_cli.run(SimpleNamespace(ranks=1))


def test_mpi_flavour_from_version_text():
    assert night_cli.flavour_of("HYDRA build details:\n    Version: 4.3.0") == "mpich"
    assert night_cli.flavour_of("mpiexec (Open MPI) 5.0.6\n\nReport bugs to …") == "openmpi"
    assert night_cli.flavour_of("mpiexec (OpenRTE) 4.1.2\n\nReport bugs to …") == "openmpi4"
    assert night_cli.flavour_of("mpirun (Open MPI) 4.1.5") == "openmpi4"
    assert night_cli.flavour_of("Intel(R) MPI Library") == "unknown"
    assert night_cli.host_flags("mpich", 64) == []


def test_config_defaults_and_unknown_keys(tmp_path):
    base = load_config(None)
    assert base["clock"]["time_scale"] == 0.1 and base["scheduler"]["sample_every"] == 1
    good = tmp_path / "fast.yaml"
    good.write_text("clock: {time_scale: 0.05}\nmax_visits: 2\n")
    cfg = load_config(good)
    assert cfg["clock"]["time_scale"] == 0.05 and cfg["clock"]["cadence"] is None and cfg["max_visits"] == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("clock: {speed: 2}\n")
    with pytest.raises(NightError, match="unknown clock key"):
        load_config(bad)
    bad.write_text("visits: 3\n")
    with pytest.raises(NightError, match="unknown key"):
        load_config(bad)
    with pytest.raises(NightError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_night_whose_ranks_do_not_leave_is_stopped_after_its_manifest_completes(tmp_path, capsys):
    """A rank left hanging (e.g. in MPI_Finalize) after the night completed does not hang ``lsstpipe night``:
    the MPI job is stopped ``--exit-grace`` seconds later, the night's status stands."""
    import os
    import subprocess
    import time

    out = tmp_path / "out"
    pids = tmp_path / "pids"
    fake = tmp_path / "mpiexec"  # writes a complete manifest, then a "rank" that never leaves
    fake.write_text(f"""#!/bin/bash
[ "$1" = --version ] && {{ echo "HYDRA build details"; exit 0; }}
while [ $# -gt 0 ] && [ "$1" != --out ]; do shift; done
mkdir -p "$2"
echo '{{"complete": true, "visits": []}}' > "$2/manifest.json"
sleep 120 & echo $! > {pids}
wait
""")
    fake.chmod(0o755)
    args = SimpleNamespace(ranks=2, repo=str(tmp_path), out=str(out), config=None, inject=[], max_visits=None,
                           quiet=True, mpiexec=str(fake), exit_grace=0.5)  # fmt: skip
    t0 = time.monotonic()
    assert night_cli.run(args) == 0
    assert time.monotonic() - t0 < 30
    assert "ranks that had not left were stopped" in capsys.readouterr().err
    rank = int(pids.read_text())
    with pytest.raises(ProcessLookupError):  # the whole process group went
        for _ in range(50):
            os.kill(rank, 0)
            time.sleep(0.1)
    # an earlier night's complete manifest in the same --out does not count: only the job's own
    proc = subprocess.Popen(["sleep", "1.5"], start_new_session=True)
    manifest = out / "manifest.json"
    assert night_cli.wait_night(proc, manifest, grace_s=0.2, since=manifest.stat().st_mtime) == 0
    with pytest.raises(ValueError, match="exit-grace"):
        night_cli.run(SimpleNamespace(**{**vars(args), "exit_grace": 0.0}))


def test_stopping_lsstpipe_night_stops_its_ranks(tmp_path):
    """The MPI job runs in a process group of its own: a SIGTERM to ``lsstpipe night`` (a batch system
    cancelling it) stops the job's processes too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    fake = tmp_path / "mpiexec"  # a "rank" that runs until stopped; no manifest
    fake.write_text(f"""#!/bin/bash
[ "$1" = --version ] && {{ echo "HYDRA build details"; exit 0; }}
sleep 120 & echo $! > {pids}
wait
""")
    fake.chmod(0o755)
    cmd = [sys.executable, "-m", "lsstpipe", "night", "-n", "2", "--repo", str(tmp_path), "--out", str(tmp_path / "o"),
           "--mpiexec", str(fake)]  # fmt: skip
    night = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if pids.is_file() and pids.read_text().strip():
            break
        time.sleep(0.1)
    rank = int(pids.read_text())
    night.send_signal(signal.SIGTERM)
    assert night.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(rank, 0)
            time.sleep(0.1)


def test_a_worker_imports_the_chain_when_it_starts_not_in_its_first_job(tmp_path):
    """~1.5-3 s of imports belong to the night's start-up, not to the first visit's latency."""
    from lsstpipe.repo import Repository

    Repository(tmp_path / "repo").create({"camera": "mini", "seed": 1})
    code = f"""
import sys
from pathlib import Path
from lsstpipe.repo import Repository
from lsstpipe.runtime.worker import Worker, WorkerSettings

class Post:
    rank = 1
before = "lsstpipe.pipelines.ap" in sys.modules
Worker(Post(), Repository(Path({str(tmp_path / "repo")!r})), Path({str(tmp_path / "out")!r}), WorkerSettings(), dmcs=1)
print(before, "lsstpipe.pipelines.ap" in sys.modules, "lsstpipe.pipelines.inputs" in sys.modules,
      "lsstpipe.pipelines.level1" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["False", "True", "True", "False"]  # Level 1 only where the rank runs it


@pytest.mark.parametrize("keep", [True, False])
def test_a_worker_applies_its_memory_setting_when_it_starts(tmp_path, keep):
    """worker.keep_memory: the rank keeps freed memory for the next CCD (glibc), or gives it back."""
    import platform

    from lsstpipe.repo import Repository

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's allocator only")
    Repository(tmp_path / "repo").create({"camera": "mini", "seed": 1})
    code = f"""
from pathlib import Path
from lsstpipe.repo import Repository
from lsstpipe.runtime import memory
from lsstpipe.runtime.worker import Worker, WorkerSettings

class Post:
    rank = 1
Worker(Post(), Repository(Path({str(tmp_path / "repo")!r})), Path({str(tmp_path / "out")!r}),
       WorkerSettings(keep_memory={keep}), dmcs=1)
with memory.planes_reused() as applied:
    print(memory._kept, applied)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [str(keep), "True"]  # kept for good, or set around each chain


class _RecordingPost:
    """Rank 0's postman, keeping what it was asked to send."""

    rank = 0

    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []
        self.dead: set[int] = set()

    def send(self, payload, dest: int) -> None:
        self.sent.append((payload, dest))


def _dispatch_night(tmp_path, detectors, run=None):
    from lsstpipe.camera import get_camera
    from lsstpipe.runtime.dmcs_night import NightDMCS, SchedulerSettings
    from lsstpipe.runtime.layout import layout_for_world

    layout = layout_for_world("mini", 10)  # strings (5, 6) and (7, 8), spare 9
    assert layout.strings == ((5, 6), (7, 8))
    visits = tuple(_visit(n) for n in (1, 2, 3))
    plan = NightPlan(repo=None, camera=get_camera("mini"), visits=visits, rafts=("R10",), wavefront_rafts=(),
                     detectors=detectors, time_scale=0.1, cadence=4.0)  # fmt: skip
    post = _RecordingPost()
    manifest = Manifest(tmp_path, {"run": run} if run else None)
    return NightDMCS(post, layout, plan, manifest, SchedulerSettings()), post, visits


def _run_visit(dmcs, post, visit, frees):
    """Announce ``visit``, then free the workers in the order ``frees`` (one at a time, dispatching after each);
    returns ``[(detector, worker), ...]`` in dispatch order."""
    dmcs._next_visit(visit)
    workers = dmcs.strings[dmcs.visit_string[visit.visit]] + dmcs.spares
    got = []
    for step, worker in enumerate([*frees, None]):
        n = len(post.sent)
        dmcs.dispatch()
        got += [(dmcs.plan.camera[a.detector].name, w) for a, w in post.sent[n:]]
        # a free worker (the string's, else the spare) never idles while a job of the visit waits
        assert not dmcs.queue or all(w in dmcs.busy for w in workers), (step, got)
        if worker is not None:
            del dmcs.busy[worker]
    assert not dmcs.queue
    dmcs.busy.clear()
    return got


def test_dispatch_gives_a_ccd_back_to_the_worker_that_ran_it_last(tmp_path):
    """CCD affinity: the worker's per-process caches (master checksums, template headers) serve again; jobs
    of a visit are reordered for it, never a worker left idle while a job waits."""
    dets = ("R10_S00", "R10_S01", "R10_S02", "R10_S10", "R10_S11", "R10_S12")
    dmcs, post, (v1, v2, v3) = _dispatch_night(tmp_path, dets)
    first = _run_visit(dmcs, post, v1, [6, 9, 5])  # string 0 = (5, 6), the spare 9 when both are busy
    assert first == [("R10_S00", 5), ("R10_S01", 6), ("R10_S02", 9), ("R10_S10", 6), ("R10_S11", 9),
                     ("R10_S12", 5)]  # fmt: skip
    assert {w for _, w in _run_visit(dmcs, post, v2, [7, 8, 9])} == {7, 8, 9}  # string 1 = (7, 8) takes visit 2
    # visit 3 on string 0 again, its workers freeing in another order: 5 takes its R10_S12 ahead of R10_S10
    # and R10_S11, whose workers are busy; then 9 its R10_S11, 6 its R10_S10 (in queue order alone: R10_S10 → 5,
    # R10_S11 → 9, R10_S12 → 6)
    third = _run_visit(dmcs, post, v3, [5, 9, 6])
    assert third == [("R10_S00", 5), ("R10_S01", 6), ("R10_S02", 9), ("R10_S12", 5), ("R10_S11", 9),
                     ("R10_S10", 6)]  # fmt: skip
    _run_visit(dmcs, post, _visit(4), [7, 8, 9])
    # a CCD whose worker is busy, while each free one's own CCD waits, waits for the next free worker
    fourth = _run_visit(dmcs, post, _visit(5), [5, 5, 6])
    assert fourth == [("R10_S00", 5), ("R10_S01", 6), ("R10_S02", 9), ("R10_S12", 5), ("R10_S10", 5),
                      ("R10_S11", 6)]  # fmt: skip


def _visit_reduced(tmp_path, recorded_rank=lambda rank: rank, before=None):
    """A three-CCD visit dispatched to string 0 = (5, 6) and the spare 9, every CCD recorded processed (on the
    rank ``recorded_rank`` gives for the one it ran on), ``before(dmcs, visit)``, then the DMCS's focal-plane
    request; returns the DMCS, the visit and the ``(worker, direct)`` of every FocalPlaneReduce sent."""
    from lsstpipe.runtime.messages import FocalPlaneReduce

    dmcs, post, (v1, _, _) = _dispatch_night(tmp_path, ("R10_S00", "R10_S01", "R10_S02"))
    dmcs._next_visit(v1)
    dmcs.dispatch()
    assert sorted(w for _, w in post.sent) == [5, 6, 9]
    for job in dmcs.busy.values():
        job.record.status, job.record.rank = "processed", recorded_rank(job.rank)
    dmcs.busy.clear()
    if before is not None:
        before(dmcs, v1)
    n = len(post.sent)
    assert dmcs.reduce_visit(v1)
    return dmcs, v1, sorted((w, p.direct) for p, w in post.sent[n:] if isinstance(p, FocalPlaneReduce))


def test_focal_plane_values_count_the_ccds_run_outside_the_visits_string(tmp_path):
    """A spare that ran some of a visit's CCDs is in no collective of the visit's string: the DMCS asks it for
    its own sums and records the values once the string's total and every such part are in (on a 16-rank
    night the spare's 2-3 CCDs of each visit were missing from them)."""
    from lsstpipe.runtime import focal_plane
    from lsstpipe.runtime.messages import TelemetryReport
    from lsstpipe.runtime.postman import Envelope

    dmcs, v1, asked = _visit_reduced(tmp_path)  # string 0 = (5, 6) ran two CCDs, the spare 9 the third
    published = []
    dmcs.publish = lambda name, value: published.append((name, value))
    assert dmcs.reductions_pending == {v1.visit}
    assert asked == [(5, False), (6, False), (9, True)]

    def part(rows):
        sums = sum(focal_plane.ccd_row(r) for r in rows)
        return Envelope(TelemetryReport(v1.visit, focal_plane.SUMS_REPORT, tuple(zip(focal_plane.SUMS, sums))), 5,
                        Tag.TELEMETRY)  # fmt: skip

    ccd = {"seeing_arcsec": 0.8, "zero_point": 31.0, "background_level": 100.0, "n_dia_sources": 10,
           "n_psf_stars": 50}  # fmt: skip
    assert dmcs.handle(part([ccd, {**ccd, "seeing_arcsec": 1.0}]))  # the string's total: its two CCDs
    assert dmcs.reductions_pending == {v1.visit} and "focal_plane" not in dmcs.manifest.to_json()["visits"][0]
    assert published == []
    assert dmcs.handle(part([{**ccd, "seeing_arcsec": 1.2, "n_dia_sources": 4}]))  # the spare's own CCD
    assert not dmcs.reductions_pending
    values = dmcs.manifest.to_json()["visits"][0]["focal_plane"]
    assert values["n_ccds"] == 3 and values["seeing_arcsec"] == pytest.approx(1.0)
    assert values["n_dia_sources"] == 24 and values["n_psf_stars"] == 150 and values["zero_point"] == 31.0
    assert dict(published) == {f"focal_plane.{k}": v for k, v in values.items()}
    assert focal_plane.ccd_row({"seeing_arcsec": float("nan"), "zero_point": 31.0}) is None
    assert focal_plane.values([0, 0, 0, 0, 0, 0]) == ()


def test_focal_plane_values_ask_only_this_layouts_workers(tmp_path):
    """A record carried over from an earlier run of the night names that run's rank, here a catch-up rank:
    it is not asked (it is no worker of this layout), and the string's total alone completes the visit."""
    from lsstpipe.runtime import focal_plane
    from lsstpipe.runtime.messages import TelemetryReport
    from lsstpipe.runtime.postman import Envelope

    dmcs, v1, asked = _visit_reduced(tmp_path, lambda rank: 3 if rank == 9 else rank)
    assert [w for w, _ in asked] == [5, 6]
    sums = tuple(zip(focal_plane.SUMS, [2.0, 1.6, 62.0, 0.0, 5.0, 9.0]))
    dmcs.handle(Envelope(TelemetryReport(v1.visit, focal_plane.SUMS_REPORT, sums), 5, Tag.TELEMETRY))
    assert not dmcs.reductions_pending and dmcs.manifest.to_json()["visits"][0]["focal_plane"]["n_ccds"] == 2


_CCD_SDQA = {"seeing_arcsec": 0.8, "zero_point": 31.0, "background_level": 100.0, "n_dia_sources": 10,
             "n_psf_stars": 50}  # fmt: skip


def _ccd_telemetry(dmcs, visit, detector, **changes):
    """One CCD's SDQA telemetry, as its worker sends it to the DMCS with each processed CCD."""
    from lsstpipe.runtime.messages import TelemetryReport
    from lsstpipe.runtime.postman import Envelope

    values = tuple({**_CCD_SDQA, **changes}.items())
    assert dmcs.handle(Envelope(TelemetryReport(visit.visit, detector, values), 5, Tag.TELEMETRY))


def _every_ccds_telemetry(dmcs, visit):
    _ccd_telemetry(dmcs, visit, "R10_S00", seeing_arcsec=5.0)  # replaced by its rerun's report, next
    _ccd_telemetry(dmcs, visit, "R10_S00")
    _ccd_telemetry(dmcs, visit, "R10_S01", seeing_arcsec=1.0)
    _ccd_telemetry(dmcs, visit, "R10_S02", seeing_arcsec=1.2, n_dia_sources=4)
    _ccd_telemetry(dmcs, visit, "R10_S10", seeing_arcsec=9.0)  # recorded nowhere as processed: not counted
    _ccd_telemetry(dmcs, visit, "R10_S11", seeing_arcsec=float("nan"))  # no seeing: not kept


def _reduced_with_telemetry(tmp_path, dead=None):
    """:func:`_visit_reduced` with every CCD's telemetry in (and rank ``dead`` dead) before the request; also
    returns what the DMCS published."""
    published = []

    def before(dmcs, visit):
        dmcs.publish = lambda name, value: published.append((name, value))
        _every_ccds_telemetry(dmcs, visit)
        if dead is not None:
            dmcs.dead.add(dead)

    return (*_visit_reduced(tmp_path, before=before), published)


def _assert_values_of_the_three_ccds(dmcs, published, why):
    entry = dmcs.manifest.to_json()["visits"][0]
    values = entry["focal_plane"]
    assert values["n_ccds"] == 3 and values["seeing_arcsec"] == pytest.approx(1.0)
    assert values["n_dia_sources"] == 24 and values["n_psf_stars"] == 150 and values["zero_point"] == 31.0
    assert why in entry["focal_plane_from"] and "telemetry" in entry["focal_plane_from"]
    assert {k: v for k, v in published if k.startswith("focal_plane.")} == {
        f"focal_plane.{k}": v for k, v in values.items()
    }
    assert not dmcs.reductions_pending


def test_a_visit_whose_string_lost_a_member_gets_its_values_from_the_ccds_telemetry(tmp_path):
    """A dead member of the visit's string: no collective can complete, so none is asked for; the DMCS adds up
    the processed CCDs' own SDQA telemetry (a rerun's report replacing the first) and says so in the manifest.
    Before, the visit's values were not recorded."""
    dmcs, _, asked, published = _reduced_with_telemetry(tmp_path, dead=6)
    assert asked == []
    _assert_values_of_the_three_ccds(dmcs, published, "rank(s) [6] of its string dead")
    assert ("R10_S01.seeing_arcsec", 1.0) in published  # each CCD's telemetry is still published as it comes


def test_a_worker_dying_before_its_part_came_in_leaves_the_values_to_the_ccds_telemetry(tmp_path):
    """The spare asked for its own sums dies before answering: the parts already in are set aside and the
    DMCS adds up every processed CCD's telemetry (none counted twice); a late part, or late telemetry, changes
    nothing once the visit is recorded. Before, the night's wrap-up waited for its deadline and recorded
    nothing."""
    from lsstpipe.runtime import focal_plane
    from lsstpipe.runtime.messages import TelemetryReport
    from lsstpipe.runtime.postman import Envelope

    dmcs, v1, asked, published = _reduced_with_telemetry(tmp_path)
    assert asked == [(5, False), (6, False), (9, True)]
    string_total = sum(focal_plane.ccd_row({**_CCD_SDQA, "seeing_arcsec": s}) for s in (0.8, 1.0))
    report = TelemetryReport(v1.visit, focal_plane.SUMS_REPORT, tuple(zip(focal_plane.SUMS, string_total)))
    assert dmcs.handle(Envelope(report, 5, Tag.TELEMETRY))
    assert dmcs.reductions_pending == {v1.visit}
    dmcs._declare_dead(9, "no heartbeat for 5 s")
    _assert_values_of_the_three_ccds(dmcs, published, "rank 9 died before its part came in")
    recorded = dmcs.manifest.to_json()["visits"][0]
    assert dmcs.handle(Envelope(report, 9, Tag.TELEMETRY))  # a late part: the visit is closed
    _ccd_telemetry(dmcs, v1, "R10_S02", seeing_arcsec=3.0)
    assert dmcs.manifest.to_json()["visits"][0] == recorded


def test_values_still_awaited_at_the_end_of_the_night_come_from_the_ccds_telemetry(tmp_path):
    """What the night's wrap-up does for a visit whose part never came and whose rank was never declared dead."""
    dmcs, v1, _, published = _reduced_with_telemetry(tmp_path)
    assert dmcs.reductions_pending == {v1.visit}
    dmcs.settle_focal_plane(v1.visit, "no answer by the end of the night")
    _assert_values_of_the_three_ccds(dmcs, published, "no answer by the end of the night")


def _string_total(dmcs, visit, seeings):
    """The string's answer for ``visit``: the sums of CCDs of these seeings."""
    from lsstpipe.runtime import focal_plane
    from lsstpipe.runtime.messages import TelemetryReport
    from lsstpipe.runtime.postman import Envelope

    total = sum(focal_plane.ccd_row({**_CCD_SDQA, "seeing_arcsec": s}) for s in seeings)
    report = TelemetryReport(visit.visit, focal_plane.SUMS_REPORT, tuple(zip(focal_plane.SUMS, total)))
    return dmcs.handle(Envelope(report, 5, Tag.TELEMETRY))


def test_a_restarted_night_keeps_and_completes_the_values_of_the_visits_it_carries_over(tmp_path):
    """A night started again on the same OUT. The CCDs the earlier run processed are in no worker's sums now;
    their SDQA from that run's telemetry is on their records. Visit 1, none of whose CCDs runs again, keeps
    the values that run recorded; visit 2, one of whose CCDs runs again, gets the string's total plus the other
    two CCDs' recorded SDQA; visit 3, carried over without values, gets them from its CCDs' records. Before,
    the restarted night recorded no values for visits 1 and 3, and only the rerun CCD's for visit 2."""
    dets = ("R10_S00", "R10_S01", "R10_S02")
    first, _, visits = _dispatch_night(tmp_path, dets, run="first")
    for v in visits:
        for det, seeing in zip(dets, (0.8, 1.0, 1.2)):
            rec = first.manifest.ccd(v, det)
            rec.set("processed")
            rec.run = "first"
            _ccd_telemetry(first, v, det, seeing_arcsec=seeing, n_dia_sources=8 if seeing == 1.2 else 10)
    first.manifest.focal_plane(visits[0], {"n_ccds": 3.0, "seeing_arcsec": 1.0})
    first.manifest.record(visits[1].visit, "R10_S02").set("failed", "a crash of its worker")
    first.manifest.write()

    again, post, (v1, v2, v3) = _dispatch_night(tmp_path, dets, run="second")
    for v in (v1, v2, v3):
        again._next_visit(v)  # queues only visit 2's R10_S02
    assert [(j.visit.visit, j.detector) for j in again.queue] == [(v2.visit, "R10_S02")]
    rec = again.queue.pop().record
    rec.set("processed")
    rec.run = "second"
    n = len(post.sent)
    assert again.reduce_visit(v1) and len(post.sent) == n and not again.reductions_pending
    entries = {e["visit"]: e for e in again.manifest.to_json()["visits"]}
    assert entries[v1.visit]["focal_plane"] == {"n_ccds": 3.0, "seeing_arcsec": 1.0}  # as recorded by the first run
    assert again.manifest.record(v1.visit, "R10_S01").sdqa["seeing_arcsec"] == 1.0

    assert again.reduce_visit(v2) and again.reductions_pending == {v2.visit}
    assert _string_total(again, v2, [1.2])  # the string ran R10_S02 again
    values = again.manifest.to_json()["visits"][1]
    assert values["focal_plane"]["n_ccds"] == 3 and values["focal_plane"]["seeing_arcsec"] == pytest.approx(1.0)
    assert values["focal_plane"]["n_dia_sources"] == 30 and "focal_plane_from" not in values

    assert again.reduce_visit(v3) and len(post.sent) == n + 2  # (visit 2's string) — visit 3 asks nobody
    entry = again.manifest.to_json()["visits"][2]
    assert entry["focal_plane"]["n_ccds"] == 3 and entry["focal_plane"]["n_dia_sources"] == 28
    assert "earlier run of the night" in entry["focal_plane_from"]


def test_a_standby_records_the_values_the_crashed_dmcs_asked_for(tmp_path):
    """The DMCS asked for visit 1's values and crashed before the answer came: the answer goes to the dead
    DMCS, and the workers have given their sums away. The standby adds up the CCDs' SDQA from the manifest on
    disk; a late answer changes nothing. Before, the visit's values were lost."""
    dmcs, v1, asked, _ = _reduced_with_telemetry(tmp_path)
    assert asked and dmcs.reductions_pending == {v1.visit}
    dmcs.manifest.write()  # what the crashed DMCS left on disk
    standby, _, (v1, v2, _) = _dispatch_night(tmp_path, ("R10_S00", "R10_S01", "R10_S02"))
    for v in (v1, v2):
        for det in standby.plan.detectors:
            standby.manifest.ccd(v, det)
    standby.settle_after_takeover([v1.visit])
    entry = standby.manifest.to_json()["visits"][0]
    assert entry["focal_plane"]["n_ccds"] == 3 and entry["focal_plane"]["seeing_arcsec"] == pytest.approx(1.0)
    assert "asked for by the DMCS that crashed" in entry["focal_plane_from"]
    assert _string_total(standby, v1, [0.8, 1.0])  # the string's late answer
    assert standby.manifest.to_json()["visits"][0] == entry
    standby.settle_after_takeover([v1.visit])  # recorded: settled once
    assert standby.manifest.to_json()["visits"][0] == entry


def test_a_worker_outside_the_visits_string_reports_its_own_sums(tmp_path):
    """``FocalPlaneReduce(direct=True)``, or any on a spare: no collective, the worker's sums go to the DMCS."""
    import numpy as np

    from lsstpipe.runtime import focal_plane
    from lsstpipe.runtime.messages import FocalPlaneReduce, TelemetryReport
    from lsstpipe.runtime.postman import Envelope
    from lsstpipe.runtime.worker import Worker

    for string in (None, SimpleNamespace(Iallreduce=None)):  # a spare; another string's worker
        worker = object.__new__(Worker)  # only what the focal-plane messages touch
        worker.post, worker.dmcs, worker.string, worker.visit_rows = _RecordingPost(), 0, string, {}
        worker._add_to_visit(7, "R10_S00", {"seeing_arcsec": 0.9, "zero_point": 31.5, "n_dia_sources": 3})
        assert worker.handle(Envelope(FocalPlaneReduce(7, direct=True), 0, Tag.REDUCE))
        ((report, dest),) = worker.post.sent
        assert dest == 0 and isinstance(report, TelemetryReport) and report.detector == focal_plane.SUMS_REPORT
        assert dict(report.values) == pytest.approx(dict(zip(focal_plane.SUMS, [1, 0.9, 31.5, 0, 3, 0])))
        assert worker.visit_rows == {}  # nothing left behind for a visit no collective will ever sum
    assert np.array_equal(focal_plane.ccd_row({"seeing_arcsec": 1, "zero_point": 2}), [1, 1, 2, 0, 0, 0])


def test_a_worker_counts_only_the_ccds_whose_results_the_dmcs_took_from_it(tmp_path):
    """A CCD can run on two workers: given up on by the DMCS and run elsewhere while its first worker still
    finished it, or run again after a DMCS takeover. Each worker kept a row per CCD it ran (a rerun on the same
    worker replacing the first), and counts only the CCDs the DMCS names for it: the result it took. Before,
    every worker summed every CCD it ran, and such a CCD counted twice."""
    from lsstpipe.runtime import focal_plane
    from lsstpipe.runtime.messages import FocalPlaneReduce
    from lsstpipe.runtime.postman import Envelope
    from lsstpipe.runtime.worker import Worker

    worker = object.__new__(Worker)
    worker.post, worker.dmcs, worker.string, worker.visit_rows = _RecordingPost(), 0, None, {}
    for det, seeing in (("R10_S00", 0.5), ("R10_S00", 0.9), ("R10_S01", 1.1), ("R10_S02", 3.0)):
        worker._add_to_visit(7, det, {"seeing_arcsec": seeing, "zero_point": 31.0})
    assert worker.handle(Envelope(FocalPlaneReduce(7, detectors=("R10_S00", "R10_S01", "R10_S99")), 0, Tag.REDUCE))
    ((report, _),) = worker.post.sent
    assert dict(report.values) == pytest.approx(dict(zip(focal_plane.SUMS, [2, 2.0, 62.0, 0, 0, 0])))
    assert worker.visit_rows == {}

    # the DMCS names, for each worker it asks, the CCDs recorded processed on it in this run
    dmcs, v1, asked = _visit_reduced(tmp_path)
    sent = [(w, p.detectors) for p, w in dmcs.post.sent if isinstance(p, FocalPlaneReduce)]
    assert sorted(sent) == [(5, ("R10_S00",)), (6, ("R10_S01",)), (9, ("R10_S02",))]


def test_ccd_jobs_carry_the_alert_production_clusters_pipeline_parameters(tmp_path):
    """The installed configuration's pipeline section reaches the workers with each CCD job; isr: false
    launches none (each CCD recorded skipped, with the reason)."""
    from lsstpipe.control.config import PipelineParameters
    from lsstpipe.runtime.worker import _chain_config

    dmcs, post, (v1, v2, _) = _dispatch_night(tmp_path, ("R10_S00", "R10_S01"))
    dmcs.pipeline = PipelineParameters(detection_threshold_sigma=4.5, alerts=False)
    dmcs._next_visit(v1)
    dmcs.dispatch()
    jobs = [a for a, _ in post.sent]
    assert [(a.detection_threshold_sigma, a.alerts, a.difference_imaging) for a in jobs] == [(4.5, False, True)] * 2
    assert _chain_config(jobs[0]).dia.threshold == 4.5 and _chain_config(jobs[0]).isr == _chain_config(jobs[1]).isr
    dmcs.pipeline = PipelineParameters(isr=False, difference_imaging=False, alerts=False)
    dmcs._next_visit(v2)
    recs = dmcs.manifest.ccds_of(v2.visit)
    assert not dmcs.queue and {r.status for r in recs} == {"skipped"}
    assert all("pipeline.isr: false" in r.reason for r in recs)


def test_night_pipeline_section_overrides_the_science_configuration(tmp_path):
    from lsstpipe.runtime.layout import layout_for_world
    from lsstpipe.runtime.night import NightError, _entity_configs, load_config, validate_config

    config = load_config(None)
    for bad, words in (({"detection_threshold_sigma": 0}, "detection_threshold_sigma"), ({"bogus": 1}, "bogus"),
                       ({"difference_imaging": False}, "alerts needs pipeline.difference_imaging"),
                       ("5", "mapping")):  # fmt: skip
        with pytest.raises(NightError, match=words):
            validate_config({**config, "pipeline": bad})
    night = validate_config({**config, "pipeline": {"detection_threshold_sigma": 4.0},
                             "archive": {**config["archive"], "compress": True, "max_retries": 5}})  # fmt: skip
    root = _entity_configs(tmp_path, layout_for_world("mini", 10), night.pipeline, night.archive)
    from lsstpipe.control.config import EntityName, load_configuration

    science = load_configuration("science", EntityName.ALERT_PRODUCTION_CLUSTER, root).settings
    calibration = load_configuration("calibration", EntityName.ALERT_PRODUCTION_CLUSTER, root).settings
    assert science.pipeline.detection_threshold_sigma == 4.0 and science.pipeline.alerts
    assert calibration.pipeline.detection_threshold_sigma == 5.0 and not calibration.pipeline.difference_imaging
    # the Archiver's configuration says what the night's replicators do
    for mode in ("science", "calibration", "engineering"):
        archiver = load_configuration(mode, EntityName.ARCHIVER, root).settings
        assert (archiver.compress, archiver.max_retries) == (True, 5)


def test_daytime_without_orbit_fitting_takes_the_snapshot_only(tmp_path):
    """The daytime configuration's pipeline.orbit_fitting: false — the APDB's snapshot, no MOPS products."""
    from lsstpipe.db.apdb import write_apdb_config
    from lsstpipe.runtime.daytime import run_day

    write_apdb_config(tmp_path)
    summary = run_day(tmp_path, 20260101, (61001.0, 61001.5), orbit_fitting=False)
    assert summary["orbit_fitting"] is False and summary["dia_sources"] == 0
    assert (tmp_path / "snapshots" / "apdb-20260101.sqlite3").exists() and not (tmp_path / "mops").exists()


def test_start_integration_sends_one_job_per_science_raft_and_one_for_the_wavefront_sensors(tmp_path):
    """LDM-230: 21 + 1 replicator jobs per exposure on LSSTCam, not one per corner raft; the wavefront job's
    result and its images cover every corner raft."""
    from lsstpipe.camera import get_camera
    from lsstpipe.control.cluster import JobCounts
    from lsstpipe.runtime.dmcs_night import NightDMCS, SchedulerSettings
    from lsstpipe.runtime.layout import layout_for_world
    from lsstpipe.runtime.messages import JobKind, JobResult
    from lsstpipe.runtime.night_cluster import night_job_counts

    camera = get_camera("lsstcam")
    corners = tuple(d.raft for d in camera.wavefront)
    rafts = ("R21", "R22", *corners)
    visits = (_visit(1),)
    plan = NightPlan(repo=None, camera=camera, visits=visits, rafts=rafts, wavefront_rafts=corners,
                     detectors=("R22_S11", *(d.name for d in camera.wavefront)), time_scale=0.1, cadence=4.0)  # fmt: skip
    assert len(corners) == 4 and plan.replicator_jobs() == (("R21",), ("R22",), corners)
    layout = layout_for_world("lsstcam", 16)
    assert night_job_counts(layout, plan) == JobCounts(3, 5)
    assert night_job_counts(layout) == JobCounts.of_camera(camera) == JobCounts(22, 193)
    post = _RecordingPost()
    dmcs = NightDMCS(post, layout, plan, Manifest(tmp_path), SchedulerSettings())
    dmcs._start_integration(visits[0], 0)
    jobs = [a for a, _ in post.sent if getattr(a, "kind", None) in (JobKind.SCIENCE_RAFT, JobKind.WAVEFRONT)]
    assert [(a.kind, a.raft, a.rafts) for a in jobs] == [(JobKind.SCIENCE_RAFT, "R21", ()),
                                                         (JobKind.SCIENCE_RAFT, "R22", ()),
                                                         (JobKind.WAVEFRONT, None, corners)]  # fmt: skip
    wavefront = jobs[-1]
    assert wavefront.moved_rafts == corners and jobs[0].moved_rafts == ("R21",)
    for raft in corners:  # the manifest knows the images the job moves ...
        for kind in ("crosstalk_corrected", "raw"):
            dmcs.manifest.image(visits[0], wavefront.image_ids[0], raft, kind)
    pair = dmcs.raft_jobs[wavefront.job_id][0]
    dmcs._result(JobResult(wavefront.job_id, pair.replicator, True), pair.replicator)
    done = [
        dmcs.manifest.find_image(wavefront.image_ids[0], r, k) for r in corners for k in ("crosstalk_corrected", "raw")
    ]
    assert all(im.replicator_done is not None for im in done)  # ... and its result ends them all


def test_catchup_keeps_at_most_its_configured_jobs_in_flight(tmp_path):
    """The Catch-Up Archiver's max_concurrent_jobs: the oldest images first, the rest at later scans."""
    import time

    from lsstpipe.runtime.messages import JobKind, JobResult

    dmcs, post, (v1, _, _) = _dispatch_night(tmp_path, ("R10_S00",))
    images = []
    for k, snap in enumerate(v1.snaps):
        for kind in ("crosstalk_corrected", "raw"):
            im = dmcs.manifest.image(v1, snap.image_id, "R10", kind)
            im.readout_end, im.replicator_done = time.time() - 20 + k, time.time() - 10
            images.append(im)
    dmcs.catchup_limit = 3
    assert dmcs.catchup_jobs() == 3
    sent = [(a, w) for a, w in post.sent if a.kind is JobKind.CATCHUP]
    assert {a.image_ids[0] for a, _ in sent} >= {v1.snaps[0].image_id}  # the oldest first
    assert dmcs.catchup_jobs() == 0  # three in flight: none more
    first, rank = sent[0]
    dmcs._result(JobResult(first.job_id, rank, True), rank)  # one done (not archived: it may go again)
    assert first.mode == "catchup:crosstalk_corrected" and first.image_ids == (v1.snaps[0].image_id,)
    # its own copy may go again; the raw copy of the same image, still in flight, stays pending
    assert not images[0].catchup_pending and images[1].catchup_pending
    assert dmcs.catchup_jobs() == 1  # room for one
    dmcs.catchup_limit = None
    for im in images:  # past scheduler.catchup_after_s since their (catch-up) replicator job ended
        im.replicator_done -= 10
    waiting = sum(not im.catchup_pending for im in images)
    assert waiting > 0 and dmcs.catchup_jobs() == waiting  # no limit: every image waiting
