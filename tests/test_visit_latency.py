"""The per-visit latency harness (``benchmarks/visit_latency.py``): its statistics and its projection on
synthetic manifests with exact expected values, and one end-to-end run on a tiny repository.

Correctness only: no timing is asserted (that would depend on the machine).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import visit_latency as vl  # noqa: E402

KEYS = ("p50_seconds", "p95_seconds", "fraction_within_60s", "projected_focal_plane_seconds")


def _ccd(detector, readout, status="processed", alerts=0, last=None, seconds=1.0, rank=1):
    return {"detector": detector, "status": status, "reason": "", "diasources": alerts, "alerts": alerts,
            "rank": rank, "attempt": 1, "seconds": seconds, "readout_end": readout, "last_alert_time": last,
            "catchup": False}  # fmt: skip


def _manifest():
    """Visit 1 (readout ends at 1000): R10_S00 last alert at 1010 (3 alerts), R10_S01 no alert, its output
    written at 1070, R10_S02 failed, R10_S10 processed without alert or output. Visit 2 (readout at 2000):
    R10_S00 1 alert at 2030, R10_S01 5 alerts, the last at 2065."""
    return {"night": {"camera": "mini", "ranks": 3}, "complete": True, "visits": [
        {"visit": 1, "number": 1, "band": "i", "ccds": [
            _ccd("R10_S00", 1000.0, alerts=3, last=1010.0), _ccd("R10_S01", 1000.0),
            _ccd("R10_S02", 1000.0, status="failed"), _ccd("R10_S10", 1000.0)], "images": []},
        {"visit": 2, "number": 2, "band": "i", "ccds": [
            _ccd("R10_S00", 2000.0, alerts=1, last=2030.0), _ccd("R10_S01", 2000.0, alerts=5, last=2065.0)],
         "images": []}]}  # fmt: skip


def _outputs():
    timings = {"prefetch": 0.5, "fetch": 0.1, "process": 0.3, "total": 0.2}
    return {(1, "R10_S00"): {"written": 1010.5, "timings": timings},
            (1, "R10_S01"): {"written": 1070.0, "timings": timings},
            (2, "R10_S00"): {"written": 2030.5, "timings": timings},
            (2, "R10_S01"): {"written": 2065.5, "timings": timings}}  # fmt: skip


# ---- statistics -------------------------------------------------------------------------------------------
def test_ccd_latencies_measure_to_the_last_alert_or_the_job_end():
    rows, left_out = vl.ccd_latencies(_manifest(), _outputs())
    got = {(r.visit, r.detector): (r.latency_s, r.to_alert, r.alerts) for r in rows}
    assert got == {(1, "R10_S00"): (10.0, True, 3), (1, "R10_S01"): (70.0, False, 0),
                   (2, "R10_S00"): (30.0, True, 1), (2, "R10_S01"): (65.0, True, 5)}  # fmt: skip
    assert left_out == {"failed": 1, "no alert and no output file": 1}


def test_latency_stats_exact_values():
    rows, _ = vl.ccd_latencies(_manifest(), _outputs())
    s = vl.latency_stats(rows)
    # per CCD: 10, 30, 65, 70 → p50 47.5, p95 at rank 2.85: 65 + 0.85·5
    assert s["per_ccd"] == {"p50": 47.5, "p95": pytest.approx(69.25), "max": 70.0, "n": 4}
    # per visit: max of its CCDs: 70 and 65
    assert s["per_visit"] == {"p50": 67.5, "p95": pytest.approx(69.75), "max": 70.0, "n": 2}
    v1, v2 = s["visits"]
    assert (v1["latency_s"], v1["last_alert_s"], v1["alerts"], v1["fraction_within"]) == (70.0, 10.0, 3, 1.0)
    assert (v2["latency_s"], v2["last_alert_s"], v2["alerts"]) == (65.0, 65.0, 6)
    assert v2["fraction_within"] == pytest.approx(1 / 6)
    assert s["alerts"] == 9 and s["fraction_within"] == pytest.approx(4 / 9)
    assert s["ccd_fraction_within"] == 0.5
    assert (s["visits_meeting_requirement"], s["visits_with_alerts"]) == (1, 2)
    assert (s["ccds_to_alert"], s["ccds_to_job_end"]) == (3, 1)


def test_the_budget_is_inclusive_and_a_night_without_alerts_has_no_fraction():
    rows = [vl.CcdLatency(1, "A", 60.0, True, 4, 1, False), vl.CcdLatency(1, "B", 60.5, True, 1, 1, False)]
    assert vl.latency_stats(rows)["fraction_within"] == pytest.approx(0.8)
    assert vl.latency_stats(rows, budget_s=61)["fraction_within"] == 1.0
    quiet = [vl.CcdLatency(1, "A", 3.0, False, 0, 1, False)]
    s = vl.latency_stats(quiet)
    assert s["fraction_within"] is None and s["visits"][0]["fraction_within"] is None
    assert s["visits_with_alerts"] == 0 and s["ccd_fraction_within"] == 1.0


def test_rescheduled_ccds_are_listed_by_reason():
    manifest = _manifest()
    assert vl.rescheduled(manifest) == {}
    again = manifest["visits"][1]["ccds"][0]
    again.update(attempt=2, reason="rank 1 died (no heartbeat for 10 s); rescheduled on a spare")
    manifest["visits"][0]["ccds"][2].update(attempt=2)  # failed: not counted
    assert vl.rescheduled(manifest) == {"rank 1 died (no heartbeat for 10 s); rescheduled on a spare": 1}


def test_no_processed_ccd_is_a_clear_error():
    with pytest.raises(vl.HarnessError, match="no CCD was processed"):
        vl.latency_stats([])


# ---- cost model and projection ----------------------------------------------------------------------------
def test_job_costs_split_waiting_from_transfer():
    manifest = {"visits": [{"visit": 7, "ccds": [
        _ccd("R10_S00", 1000.0, seconds=8.0),   # started at 1002, after the readout
        _ccd("R10_S01", 1000.0, seconds=6.0),   # started at 997: prefetch 1 s, then 2 s waiting for pixels
        _ccd("R00_SW", 1000.0, seconds=1.0, status="failed")]}]}  # fmt: skip
    outputs = {(7, "R10_S00"): {"written": 1010.0, "timings": {"prefetch": 1.0, "fetch": 0.5, "process": 6.0,
                                                               "total": 4.0}},
               (7, "R10_S01"): {"written": 1003.0, "timings": {"prefetch": 1.0, "fetch": 2.5, "process": 2.4,
                                                               "total": 2.0}}}  # fmt: skip
    late, early = vl.job_costs(manifest, outputs, ["R10_S00", "R10_S01"])
    assert late.science and (late.start, late.end) == (1002.0, 1010.0)
    assert (late.head_start, late.wait, late.transfer, late.chain) == (-2.0, 0.0, 0.5, 4.0)
    assert (late.level1, late.other, late.cost, late.overhead) == (2.0, 0.5, 8.0, 4.0)
    assert (early.head_start, early.wait, early.transfer) == (1.0, 2.0, 0.5)
    assert early.level1 == pytest.approx(0.4) and early.other == pytest.approx(0.1)
    assert early.cost == pytest.approx(4.0)


def test_job_costs_need_the_stage_timings():
    manifest = {"visits": [{"visit": 7, "ccds": [_ccd("R10_S00", 1000.0)]}]}
    with pytest.raises(vl.HarnessError, match="lacks the stage timing"):
        vl.job_costs(manifest, {(7, "R10_S00"): {"written": 1001.0, "timings": {"prefetch": 1.0}}}, ["R10_S00"])


def test_dispatch_gaps_pair_consecutive_jobs_of_a_visit_on_a_rank():
    def job(visit, rank, start, end):
        return vl.JobCost(visit, "X", True, 0, 0, 0, start, end, rank, 0, 0, 0, 0)

    costs = [job(1, 1, 2.25, 3.0), job(1, 1, 0.0, 2.0), job(1, 2, 5.0, 6.0), job(2, 1, 10.0, 11.0)]
    assert vl.dispatch_gaps(costs) == [0.25]


def test_schedule_makespan():
    # 5 jobs of 2 s on 2 workers, 0.5 s of prefetch hidden in the first wave, 0.1 s between jobs: 3·2 + 2·0.1 − 0.5
    assert vl.schedule_makespan([2.0] * 5, [0.5] * 5, 2, 0.1) == pytest.approx(5.7)
    assert vl.schedule_makespan([5.0, 1.0, 1.0, 1.0], [0.0] * 4, 2) == 5.0  # the long job bounds it
    assert vl.schedule_makespan([1.0], [-2.0], 4) == 3.0  # started 2 s after the readout's end
    with pytest.raises(vl.HarnessError, match="at least one worker"):
        vl.schedule_makespan([1.0], [0.0], 0)


def test_project_to_the_focal_plane():
    p = vl.project(189, 6, chain_s=3.0, overhead_s=1.0, prefetch_s=0.5, gap_s=0.01)
    assert p.seconds == pytest.approx(32 * 4.0 + 31 * 0.01 - 0.5)  # ceil(189/6) = 32 waves
    assert vl.project(189, 189, 3.0, 1.0, 0.5).seconds == 3.5
    with pytest.raises(vl.HarnessError, match="prefetch"):
        vl.project(189, 6, 3.0, 1.0, 2.0)
    with pytest.raises(vl.HarnessError, match="at least one CCD"):
        vl.project(0, 6, 3.0, 1.0, 0.5)


def test_workers_per_visit_follow_the_layout():
    assert vl.workers_per_visit("mini", 3) == (1, 2)  # two strings of one worker each
    # 16 ranks: two strings of five workers, and the spare that takes a visit's jobs when its string is busy
    assert vl.workers_per_visit("lsstcam", 16) == (6, 2)


def test_read_chain_seconds(tmp_path):
    assert vl.read_chain_seconds(ROOT / "benchmarks" / "results-ccd_chain-2vcpu.txt") > 0
    (tmp_path / "a.txt").write_text("lsstcam R22_S11 4004×4096, 2 snaps: whole chain 3.69 s wall (3.61 s CPU)\n")
    assert vl.read_chain_seconds(tmp_path / "a.txt") == 3.69
    (tmp_path / "b.json").write_text(json.dumps({"chain_seconds": 2.5}))
    assert vl.read_chain_seconds(tmp_path / "b.json") == 2.5
    (tmp_path / "c.txt").write_text("nothing here")
    with pytest.raises(vl.HarnessError, match="per-ccd-seconds"):
        vl.read_chain_seconds(tmp_path / "c.txt")


def _write_night(out: Path) -> None:
    """The synthetic night on disk: manifest and per-CCD outputs with their write times."""
    (out / "ccds").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps(_manifest()))
    for (visit, det), record in _outputs().items():
        path = out / "ccds" / str(visit) / f"{det}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"timings": record["timings"]}))
        os.utime(path, (record["written"], record["written"]))


def test_from_manifest_writes_the_figures(tmp_path, capsys):
    _write_night(tmp_path / "night")
    js, png = tmp_path / "out.json", tmp_path / "plot.png"
    rc = vl.main(["--from-manifest", str(tmp_path / "night"), "--json", str(js), "--png", str(png),
                  "--per-ccd-seconds", "3.0", "--project-ranks", "3"])  # fmt: skip
    assert rc == 0
    data = json.loads(js.read_text())
    assert data["p50_seconds"] == 47.5 and data["p95_seconds"] == pytest.approx(69.25)
    assert data["fraction_within_60s"] == pytest.approx(4 / 9)
    fit = data["model"]
    # each visit's two jobs ran on rank 1: 1009.5–1010.5 then 1069–1070; 2029.5–2030.5 then 2064.5–2065.5
    assert fit["dispatch_gap_s"] == pytest.approx((58.5 + 34.0) / 2)
    assert fit["mean_job"]["chain"] == 0.2 and fit["workers_per_visit"] == 1
    # 189 jobs of 3 s chain + 0.8 s overhead (prefetch 0.5, transfer 0.1, Level 1 0.1, outputs 0.1) on one
    # worker, the first job's prefetch hidden, the gap between two jobs
    assert data["projected_focal_plane_seconds"] == pytest.approx(189 * 3.8 + 188 * 46.25 - 0.5)
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "per CCD" in printed and "per visit" in printed and "189-CCD" in printed


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vl.main(["--repo", "x"])
    assert "--from-manifest" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vl.main(["--repo", str(tmp_path), "-n", "3"])
    assert "not a data repository" in capsys.readouterr().err
    assert vl.main(["--from-manifest", str(tmp_path)]) == 2
    assert "no manifest" in capsys.readouterr().err


def test_a_night_that_does_not_return_is_stopped(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": False, "visits": []}))
    hung = subprocess.Popen(["sleep", "60"], start_new_session=True)
    assert vl.wait_night(hung, tmp_path, timeout_s=0.5, grace_s=60) == 124 and hung.poll() is not None
    (tmp_path / "manifest.json").write_text(json.dumps({"complete": True, "visits": []}))
    left = subprocess.Popen(["sleep", "60"], start_new_session=True)
    assert vl.wait_night(left, tmp_path, timeout_s=60, grace_s=0.2) == 124 and left.poll() is not None
    done = subprocess.Popen(["true"], start_new_session=True)
    assert vl.wait_night(done, tmp_path, timeout_s=60, grace_s=60) == 0


# ---- end to end -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_on_a_tiny_repository(tmp_path):
    repo = tmp_path / "repo"
    sim = subprocess.run(["lsstpipe", "simulate", "--repo", str(repo), "--detectors", "R10_S11,R11_S11,R00_SW",
                          "--visits", "2", "--calibs", "-n", "2"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert sim.returncode == 0, sim.stderr[-4000:]
    js = tmp_path / "lat.json"
    config = tmp_path / "night.yaml"  # no calibration exposures before the visits (their 300 s dark: 30 s here)
    config.write_text("calibration_exposures: 0\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "visit_latency.py"), "--repo", str(repo), "-n", "3", "--visits",
         "2", "--out", str(tmp_path / "night"), "--json", str(js), "--no-warmup", "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(js.read_text())
    for key in KEYS:
        assert key in data
    assert len(data["ccds"]) + sum(data["not_counted"].values()) == 6  # 3 detectors × 2 visits
    assert len(data["ccds"]) >= 1 and {c["detector"] for c in data["ccds"]} <= {"R10_S11", "R11_S11", "R00_SW"}
    assert 0 <= data["p50_seconds"] <= data["p95_seconds"] <= data["max_seconds"]
    assert data["fraction_within_60s"] is None or 0 <= data["fraction_within_60s"] <= 1
    assert math.isfinite(data["projected_focal_plane_seconds"]) and data["projected_focal_plane_seconds"] > 0
    assert data["projected_focal_plane_seconds_overhead_scaled"] >= data["projected_focal_plane_seconds"]
    assert (tmp_path / "night" / "visit_latency.png").stat().st_size > 0
    assert "per CCD" in proc.stdout and "projection to the 189-CCD" in proc.stdout


def test_the_steady_state_leaves_out_each_workers_first_job():
    def job(visit, det, rank, start, prefetch, chain):
        return vl.JobCost(visit, det, True, prefetch, 0.0, 0.0, start, start + 5, rank, 0.5, chain, 0.25, 0.0)

    # rank 1's first job (the cold one) and rank 2's first; rank 1 ran two more, rank 2 one more
    costs = [job(1, "A", 1, 0.0, 3.0, 6.0), job(1, "B", 2, 1.0, 2.0, 5.0), job(1, "C", 1, 10.0, 1.0, 3.0),
             job(2, "A", 1, 20.0, 0.5, 2.0), job(2, "B", 2, 21.0, 1.5, 4.0)]  # fmt: skip
    st = vl.steady_state(costs, costs, 6, 0.01, None, 2.0)
    assert (st["jobs"], st["of_science_jobs"]) == (3, 5)
    assert st["mean_job"]["prefetch"] == pytest.approx(1.0) and st["mean_job"]["chain"] == pytest.approx(3.0)
    assert st["chain_4k_s"] == pytest.approx(6.0)  # the later jobs' chain × the pixel scale
    # overhead = prefetch 1.0 + transfer 0.5 + Level 1 0.25: 32 waves of (6 + 1.75), 31 gaps, prefetch hidden once
    assert st["projection"]["seconds"] == pytest.approx(32 * 7.75 + 31 * 0.01 - 1.0)
    assert vl.steady_state(costs, costs, 6, 0.01, 2.5, 2.0)["chain_4k_s"] == 2.5  # a given full-size chain
    assert vl.steady_state(costs[:2], costs[:2], 6, 0.0, None, 1.0) is None  # only first jobs: nothing to say
