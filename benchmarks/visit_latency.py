"""Per-visit alert latency of the night job, and its projection to the full 189-CCD LSSTCam focal plane.

``python benchmarks/visit_latency.py --repo REPO -n K [--visits N] [--out DIR] [--json PATH] [--png PATH]``
plays the first ``N`` visits of ``REPO`` through the night job on ``K`` MPI ranks (``lsstpipe night``), then
reads ``OUT/manifest.json`` and the per-CCD outputs ``OUT/ccds/{visit}/{detector}.json``;
``--from-manifest OUT`` analyses a night already played.

What is measured (wall clock, ``time.time()`` on one machine):

- **per CCD**: from ``readout_end`` (the end of the readout of the visit's last snap) to ``last_alert_time``
  (the CCD's last alert written). A CCD without alerts (none found, or a wavefront sensor) is measured to
  the end of its job instead: the modification time of its output file. The table says how many of each.
  Only processed CCDs count; failed, late and skipped ones are listed by status.
- **per visit**: the largest of its CCDs' latencies (the visit's last alert, or its last alert-less job).
- **fraction of alerts within 60 s** (Rubin: 98 % of a visit's alerts): every alert of a CCD is taken to
  leave at that CCD's last alert time, so the fraction is a lower bound. Per visit and over the night.

The projection is a list schedule of identical CCD jobs on the workers one visit can use (its worker string
plus the spare workers, :mod:`lsstpipe.runtime.layout`): a job costs ``c = prefetch + transfer + chain +
level1 + other``, measured per CCD from its stage timings (``transfer`` is the part of ``fetch`` after the
readout ended; the rest was waiting for the pixels), plus the scheduler's round trip ``g`` between two jobs
of a worker. The first job of each worker is assigned at nextVisit and prefetches while the shutter is open,
so ``N`` jobs on ``W`` workers end ``ceil(N/W)·c + (ceil(N/W) − 1)·g − prefetch`` after the readout. Costs
are means over the science CCDs' jobs (a visit's time is a sum of jobs; the untimed warm-up night keeps
numba's compilation out of them). The chain cost of a full-size CCD is, in order of precedence,
``--per-ccd-seconds``, the ``whole chain … s wall`` (or ``chain_seconds``) of ``--ccd-chain FILE``
(``benchmarks/ccd_chain.py``), or the measured chain of this camera's science CCDs scaled by pixel count to
LSSTCam's mean science CCD (4k×4k; an upper estimate: the chain's per-CCD fixed costs get scaled too). The
fixed per-job overhead (prefetch, transfer, Level 1, outputs) is *not* scaled (a lower bound: loading
calibrations and pixels grows with the CCD's size, Level 1 with its DIASources); the same figure with the
overhead scaled by pixels is printed as an upper bracket. The model assumes one rank per core (no CPU
contention beyond what was measured), no queueing behind the previous visit of the same string (it holds
while the visit latency stays under the number of strings times the cadence), and leaves out the 4 wavefront
sensors. Its checks, per visit of this run against the measured visit latency: the schedule of the visit's
own measured jobs (in the order they started), and the focal-plane formula itself with this camera's job
count and the mean job (run it with ``-n 16`` on a 16-core node; ``--project-ranks`` defaults to ``-n``).
A second projection, the **steady state**, leaves out each worker's first job of the night (its
once-per-process costs: imports, headers and checksums read once per process, compiled code loaded), which a
night of hundreds of jobs per worker pays once but a benchmark night of a few jobs per worker averages in.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

LATENCY_BUDGET_S = 60.0
"""Rubin's alert latency: from the end of readout to the alert sent."""
REQUIRED_FRACTION = 0.98
"""Fraction of a visit's alerts that must leave within :data:`LATENCY_BUDGET_S`."""
FOCAL_PLANE_CCDS = 189

__all__ = [
    "CcdLatency",
    "HarnessError",
    "JobCost",
    "Projection",
    "ccd_latencies",
    "dispatch_gaps",
    "focal_plane_pixels",
    "job_costs",
    "latency_stats",
    "main",
    "model",
    "percentile",
    "project",
    "read_ccd_outputs",
    "read_chain_seconds",
    "read_manifest",
    "report",
    "rescheduled",
    "run_night",
    "schedule_makespan",
    "wait_night",
    "workers_per_visit",
]


class HarnessError(RuntimeError):
    """Bad input to the harness: the message says what is wrong and what to do."""


@dataclass(frozen=True)
class CcdLatency:
    """One processed CCD of one visit."""

    visit: int
    detector: str
    latency_s: float
    """From the end of readout of the visit's last snap to the CCD's last alert (or its job's end)."""
    to_alert: bool
    """True: measured to the last alert; False: to the end of the job (no alert)."""
    alerts: int
    rank: int | None
    catchup: bool


@dataclass(frozen=True)
class JobCost:
    """Where one CCD job's time went (seconds), from its stage timings."""

    visit: int
    detector: str
    science: bool
    prefetch: float
    wait: float
    """Part of ``fetch`` spent waiting for the readout to end (not a cost of the job)."""
    head_start: float
    """Part of ``prefetch`` done before the readout ended (hidden, if the job was in its worker's first wave);
    negative when the job started after the readout's end."""
    start: float
    """``time.time()`` when the job started (its output's write time less its ``seconds``)."""
    end: float
    rank: int | None
    transfer: float
    chain: float
    level1: float
    other: float

    @property
    def cost(self) -> float:
        """The job's time with its pixels already at the Archive."""
        return self.prefetch + self.transfer + self.chain + self.level1 + self.other

    @property
    def overhead(self) -> float:
        """Everything but the chain: prefetch, transfer, Level 1, outputs."""
        return self.cost - self.chain


@dataclass(frozen=True)
class Projection:
    """The projected latency of one visit: ``jobs`` identical jobs on ``workers`` workers."""

    jobs: int
    workers: int
    chain_s: float
    overhead_s: float
    prefetch_s: float
    gap_s: float
    seconds: float


# ---- reading a night -------------------------------------------------------------------------------------
def read_manifest(out: Path) -> dict[str, Any]:
    """``OUT/manifest.json``, checked for the fields the harness reads."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise HarnessError(f"{path}: no manifest; play a night first (lsstpipe night --out {out}) or pass its OUT")
    data = json.loads(path.read_text())
    if not isinstance(data.get("visits"), list):
        raise HarnessError(f"{path} has no 'visits' list: not a night manifest (lsstpipe.runtime.manifest)")
    return data


def read_ccd_outputs(out: Path) -> dict[tuple[int, str], dict[str, Any]]:
    """Every ``OUT/ccds/{visit}/{detector}.json``, with its write time added as ``written``."""
    found: dict[tuple[int, str], dict[str, Any]] = {}
    for path in sorted((Path(out) / "ccds").glob("*/*.json")):
        record = json.loads(path.read_text())
        record["written"] = path.stat().st_mtime
        found[(int(path.parent.name), path.stem)] = record
    return found


def ccd_latencies(
    manifest: Mapping[str, Any], outputs: Mapping[tuple[int, str], Mapping[str, Any]]
) -> tuple[list[CcdLatency], dict[str, int]]:
    """The latency of every processed CCD (module docstring) and a count of the CCDs left out, by reason.

    ``outputs`` maps ``(visit, detector)`` to the CCD's output record with its write time as ``written``
    (:func:`read_ccd_outputs`); it is needed only for CCDs without alerts.
    """
    rows: list[CcdLatency] = []
    left_out: dict[str, int] = {}
    for visit in manifest["visits"]:
        for ccd in visit.get("ccds", []):
            why = None
            end = None
            to_alert = bool(ccd.get("alerts")) and ccd.get("last_alert_time") is not None
            if ccd.get("status") != "processed":
                why = str(ccd.get("status"))
            elif ccd.get("readout_end") is None:
                why = "no readout_end"
            elif to_alert:
                end = float(ccd["last_alert_time"])
            elif (int(visit["visit"]), ccd["detector"]) in outputs:
                end = float(outputs[(int(visit["visit"]), ccd["detector"])]["written"])
            else:
                why = "no alert and no output file"
            if why is not None or end is None:
                left_out[why or "?"] = left_out.get(why or "?", 0) + 1
                continue
            rows.append(CcdLatency(int(visit["visit"]), ccd["detector"], end - float(ccd["readout_end"]), to_alert,
                                   int(ccd.get("alerts") or 0), ccd.get("rank"), bool(ccd.get("catchup"))))  # fmt: skip
    return rows, left_out


def rescheduled(manifest: Mapping[str, Any]) -> dict[str, int]:
    """Processed CCDs that ran more than once (a worker died or was declared dead, data came late), by reason."""
    found: dict[str, int] = {}
    for visit in manifest["visits"]:
        for ccd in visit.get("ccds", []):
            if ccd.get("status") == "processed" and int(ccd.get("attempt") or 1) > 1:
                why = str(ccd.get("reason") or "no reason recorded")
                found[why] = found.get(why, 0) + 1
    return found


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between order statistics (numpy's default)."""
    if len(values) == 0:
        raise HarnessError("no latencies to summarize: no CCD was processed (see the manifest's statuses)")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def _summary(values: Sequence[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": float(max(values)),
            "n": len(values)}  # fmt: skip


def latency_stats(rows: Sequence[CcdLatency], budget_s: float = LATENCY_BUDGET_S) -> dict[str, Any]:
    """p50/p95/max per CCD and per visit, and the fraction of alerts within ``budget_s`` (module docstring).

    The fractions are ``None`` where there were no alerts to count.
    """
    per_ccd = _summary([r.latency_s for r in rows])
    visits: dict[int, list[CcdLatency]] = {}
    for r in rows:
        visits.setdefault(r.visit, []).append(r)
    per_visit_rows = []
    for vid, vrows in sorted(visits.items()):
        alerts = sum(r.alerts for r in vrows)
        within = sum(r.alerts for r in vrows if r.latency_s <= budget_s)
        alert_rows = [r.latency_s for r in vrows if r.to_alert]
        per_visit_rows.append({"visit": vid, "ccds": len(vrows), "latency_s": max(r.latency_s for r in vrows),
                               "last_alert_s": max(alert_rows) if alert_rows else None, "alerts": alerts,
                               "fraction_within": within / alerts if alerts else None})  # fmt: skip
    alerts = sum(r.alerts for r in rows)
    within = sum(r.alerts for r in rows if r.latency_s <= budget_s)
    fractions = [v["fraction_within"] for v in per_visit_rows if v["fraction_within"] is not None]
    return {
        "per_ccd": per_ccd,
        "per_visit": _summary([v["latency_s"] for v in per_visit_rows]),
        "visits": per_visit_rows,
        "ccds_to_alert": sum(r.to_alert for r in rows),
        "ccds_to_job_end": sum(not r.to_alert for r in rows),
        "alerts": alerts,
        "fraction_within": within / alerts if alerts else None,
        "ccd_fraction_within": sum(r.latency_s <= budget_s for r in rows) / len(rows),
        "visits_meeting_requirement": sum(f >= REQUIRED_FRACTION for f in fractions),
        "visits_with_alerts": len(fractions),
    }


# ---- the cost model --------------------------------------------------------------------------------------
def job_costs(
    manifest: Mapping[str, Any], outputs: Mapping[tuple[int, str], Mapping[str, Any]], science: Sequence[str]
) -> list[JobCost]:
    """Per processed CCD, where its job's time went (``science``: the camera's science detector names).

    A job's start is its output's write time less its ``seconds``; the part of its ``fetch`` before the
    readout's end (``readout_end − start − prefetch``, clipped to ``[0, fetch]``) was waiting, the rest
    transfer; the part of its prefetch before the readout's end is its head start (negative: it started
    after the readout's end). ``level1`` is ``process − total`` (the chain's own total), ``other`` what ``seconds`` has
    beyond prefetch, fetch and process (outputs, telemetry).
    """
    costs = []
    science_set = set(science)
    for visit in manifest["visits"]:
        for ccd in visit.get("ccds", []):
            key = (int(visit["visit"]), ccd["detector"])
            if ccd.get("status") != "processed" or key not in outputs or ccd.get("seconds") is None:
                continue
            t = outputs[key].get("timings") or {}
            missing = [k for k in ("prefetch", "fetch", "process", "total") if t.get(k) is None]
            if missing:
                raise HarnessError(f"OUT/ccds/{key[0]}/{key[1]}.json lacks the stage timing(s) {', '.join(missing)}: "
                                   "written by an older night job; play the night again")  # fmt: skip
            seconds = float(ccd["seconds"])
            prefetch, fetch, process, chain = (float(t[k]) for k in ("prefetch", "fetch", "process", "total"))
            start = float(outputs[key]["written"]) - seconds
            readout = ccd.get("readout_end")
            ahead = float(readout) - start if readout is not None else 0.0
            wait = min(max(ahead - prefetch, 0.0), fetch)
            costs.append(JobCost(key[0], key[1], ccd["detector"] in science_set, prefetch, wait,
                                 min(ahead, prefetch), start, start + seconds, ccd.get("rank"), fetch - wait, chain,
                                 max(process - chain, 0.0), max(seconds - prefetch - fetch - process, 0.0)))  # fmt: skip
    return costs


def dispatch_gaps(costs: Sequence[JobCost]) -> list[float]:
    """Idle seconds between two consecutive jobs of one visit on one rank (the scheduler's round trip)."""
    runs: dict[tuple[int, int | None], list[JobCost]] = {}
    for c in costs:
        runs.setdefault((c.visit, c.rank), []).append(c)
    gaps = []
    for jobs in runs.values():
        jobs.sort(key=lambda c: c.start)
        gaps += [max(b.start - a.end, 0.0) for a, b in zip(jobs, jobs[1:], strict=False)]
    return gaps


def schedule_makespan(costs: Sequence[float], head_start: Sequence[float], workers: int, gap: float = 0.0) -> float:
    """When the last of the jobs ends, from the end of readout, on ``workers`` workers taking them in order.

    Job ``i`` costs ``costs[i]``; the first job of each worker started ``head_start[i]`` before the readout
    ended (prefetching), so it ends ``costs[i] − head_start[i]`` after it; later jobs start ``gap`` after a
    worker is free.
    """
    if workers < 1:
        raise HarnessError(f"a visit needs at least one worker, not {workers}")
    if len(costs) != len(head_start):
        raise HarnessError("costs and head starts must be given per job")
    free: list[float] = []
    end = 0.0
    for k, (c, p) in enumerate(zip(costs, head_start, strict=True)):
        if k < workers:
            done = max(c - p, 0.0)
        else:
            done = heapq.heappop(free) + gap + c
        heapq.heappush(free, done)
        end = max(end, done)
    return end


def project(
    jobs: int, workers: int, chain_s: float, overhead_s: float, prefetch_s: float, gap_s: float = 0.0
) -> Projection:
    """``jobs`` identical jobs (chain + overhead, of which ``prefetch_s`` hidden in the first wave), ``gap_s``
    between two jobs of a worker."""
    if jobs < 1:
        raise HarnessError(f"a projection needs at least one CCD job, not {jobs}")
    if min(chain_s, overhead_s, prefetch_s, gap_s) < 0 or prefetch_s > overhead_s:
        raise HarnessError(f"job costs must be ≥ 0 with the prefetch part of the overhead (chain {chain_s}, "
                           f"overhead {overhead_s}, prefetch {prefetch_s})")  # fmt: skip
    cost = chain_s + overhead_s
    seconds = schedule_makespan([cost] * jobs, [prefetch_s] * jobs, workers, gap_s)
    return Projection(jobs, workers, chain_s, overhead_s, prefetch_s, gap_s, seconds)


def workers_per_visit(camera: str, ranks: int) -> tuple[int, int]:
    """Workers one visit's jobs can run on (its largest string plus the spares), and the number of strings."""
    from lsstpipe.runtime.layout import layout_for_world

    layout = layout_for_world(camera, ranks)
    return max(len(s) for s in layout.strings) + len(layout.spare_workers), len(layout.strings)


def read_chain_seconds(path: Path) -> float:
    """The whole-chain seconds of one full-size CCD from ``benchmarks/ccd_chain.py``'s printout or JSON."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("chain_seconds"), int | float):
        return float(data["chain_seconds"])
    match = re.search(r"whole chain ([0-9.]+) s wall", text)
    if match is None:
        raise HarnessError(f"{path}: neither a 'whole chain … s wall' line nor a JSON 'chain_seconds'; give "
                           "the output of benchmarks/ccd_chain.py or --per-ccd-seconds")  # fmt: skip
    return float(match.group(1))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _pixels(camera: str, names: Sequence[str]) -> float:
    from lsstpipe.camera import get_camera

    cam = get_camera(camera)
    return float(np.median([cam[n].shape[0] * cam[n].shape[1] for n in names]))


def focal_plane_pixels() -> float:
    """The mean pixel count of LSSTCam's 189 science CCDs (4004×4096 e2v and 4000×4072 ITL)."""
    from lsstpipe.camera import get_camera
    from lsstpipe.camera.geometry import DetectorType

    shapes = [d.shape for d in get_camera("lsstcam") if d.type is DetectorType.SCIENCE]
    return float(np.mean([h * w for h, w in shapes]))


def model(
    manifest: Mapping[str, Any],
    outputs: Mapping[tuple[int, str], Mapping[str, Any]],
    camera: str,
    ranks: int,
    project_ranks: int,
    chain_4k_s: float | None,
    chain_source: str,
) -> dict[str, Any]:
    """The check of the model on this run and the focal-plane projection (module docstring)."""
    from lsstpipe.camera import get_camera
    from lsstpipe.camera.geometry import DetectorType

    cam = get_camera(camera)
    science = [d.name for d in cam if d.type is DetectorType.SCIENCE]
    costs = job_costs(manifest, outputs, science)
    sci = [c for c in costs if c.science]
    if not sci:
        raise HarnessError("no processed science CCD with its outputs: nothing to project from")
    workers, strings = workers_per_visit(camera, ranks)
    gap = _mean(dispatch_gaps(costs))
    check = []
    for visit in sorted({c.visit for c in costs}):
        vc = sorted((c for c in costs if c.visit == visit), key=lambda c: c.start)  # in the order dispatched
        seconds = schedule_makespan([c.cost for c in vc], [c.head_start for c in vc], workers, gap)
        check.append({"visit": visit, "jobs": len(vc), "model_s": seconds})
    chain, overhead, prefetch = _mean_costs(sci)
    for row in check:  # the focal plane's formula on this camera: identical mean jobs
        row["mean_job_model_s"] = project(row["jobs"], workers, chain, overhead, prefetch, gap).seconds
    measured_px, full_px = _pixels(camera, [c.detector for c in sci]), focal_plane_pixels()
    scale = full_px / measured_px
    fp_workers, fp_strings = workers_per_visit("lsstcam", project_ranks)
    steady = steady_state(costs, sci, fp_workers, gap, chain_4k_s, scale)  # before chain_4k_s defaults to these jobs'
    if chain_4k_s is None:
        chain_4k_s, chain_source = chain * scale, f"measured {chain:.3f} s × {scale:.1f} (pixels)"
    fp = project(FOCAL_PLANE_CCDS, fp_workers, chain_4k_s, overhead, prefetch, gap)
    fp_scaled = project(FOCAL_PLANE_CCDS, fp_workers, chain_4k_s, overhead * scale, prefetch * scale, gap)
    return {
        "workers_per_visit": workers, "strings": strings, "check": check, "dispatch_gap_s": gap,
        "mean_job": _mean_job(sci), "measured_ccd_pixels": measured_px, "focal_plane_ccd_pixels": full_px, "pixel_scale": scale,
        "chain_4k_s": chain_4k_s, "chain_source": chain_source, "project_ranks": project_ranks,
        "focal_plane_workers": fp_workers, "focal_plane_strings": fp_strings,
        "projection": asdict(fp), "projection_overhead_scaled": asdict(fp_scaled), "steady": steady,
    }  # fmt: skip


def _mean_costs(jobs: Sequence[JobCost]) -> tuple[float, float, float]:
    """The mean job's chain, overhead and prefetch (the prefetch being part of the overhead)."""
    overhead = _mean([c.overhead for c in jobs])
    return _mean([c.chain for c in jobs]), overhead, min(_mean([c.prefetch for c in jobs]), overhead)


def _mean_job(jobs: Sequence[JobCost]) -> dict[str, float]:
    return {
        k: _mean([getattr(c, k) for c in jobs]) for k in ("prefetch", "wait", "transfer", "chain", "level1", "other")
    }


def steady_state(costs: Sequence[JobCost], sci: Sequence[JobCost], workers: int, gap: float,
                 chain_4k_s: float | None, scale: float) -> dict[str, Any] | None:  # fmt: skip
    """The projection from the science jobs that were not their worker's first job of the night, or None.

    A worker's first job carries once-per-night costs — imports, the template patches' headers and the
    masters' checksums read once per process, compiled code loaded, first touches of its memory — that a
    night of hundreds of jobs per worker pays once; in a short benchmark night they weigh on every mean.
    ``chain_4k_s``: the full-size chain when given (``--per-ccd-seconds``, ``--ccd-chain``), else these jobs'
    chain × ``scale``.
    """
    first: dict[int | None, JobCost] = {}
    for c in sorted(costs, key=lambda c: c.start):
        first.setdefault(c.rank, c)
    later = [c for c in sci if c.rank is not None and first[c.rank] is not c]
    if not later:
        return None
    chain, overhead, prefetch = _mean_costs(later)
    chain_4k = chain * scale if chain_4k_s is None else chain_4k_s
    return {
        "jobs": len(later), "of_science_jobs": len(sci), "mean_job": _mean_job(later), "chain_4k_s": chain_4k, "projection": asdict(project(FOCAL_PLANE_CCDS, workers, chain_4k, overhead,
                                                             prefetch, gap)),
    }  # fmt: skip


# ---- running, printing, plotting -------------------------------------------------------------------------
def run_night(
    repo: Path,
    ranks: int,
    out: Path,
    visits: int | None,
    config: Path | None,
    timeout_s: float,
    grace_s: float = 60.0,
    quiet: bool = True,
) -> int:
    """Play the night with ``lsstpipe night``: its exit status, or 124 if it was stopped.

    It is stopped (its whole process group) when it runs past ``timeout_s``, or when its manifest has said
    the night is complete for ``grace_s`` and it has not returned (a rank left running); a night whose
    manifest says complete is analysed all the same.
    """
    cmd = [sys.executable, "-m", "lsstpipe", "night", "-n", str(ranks), "--repo", str(repo), "--out", str(out)]
    if visits:
        cmd += ["--max-visits", str(visits)]
    if config:
        cmd += ["--config", str(config)]
    if quiet:
        cmd.append("--quiet")
    return wait_night(subprocess.Popen(cmd, start_new_session=True), out, timeout_s, grace_s)


def wait_night(proc: subprocess.Popen, out: Path, timeout_s: float, grace_s: float) -> int:
    """Wait for the night ``proc`` (started in its own session) as :func:`run_night` says; 124 if stopped
    (:func:`lsstpipe.night_cli.wait_night` on its manifest)."""
    from lsstpipe.night_cli import wait_night as wait

    return wait(proc, Path(out) / "manifest.json", grace_s=grace_s, timeout_s=timeout_s)


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return "- (no alerts)" if x is None else f"{100 * x:.1f} %"


def report(
    stats: Mapping[str, Any],
    fit: Mapping[str, Any],
    left_out: Mapping[str, int],
    budget_s: float,
    again: Mapping[str, int] | None = None,
) -> str:
    """The printed table (``again``: :func:`rescheduled`)."""
    lines = []
    c, v = stats["per_ccd"], stats["per_visit"]
    lines.append(f"latency from the end of readout of the last snap (s): {stats['ccds_to_alert']} CCD(s) to their "
                 f"last alert, {stats['ccds_to_job_end']} without alerts to the end of their job")  # fmt: skip
    if left_out:
        lines.append("  not counted: " + ", ".join(f"{n} {why}" for why, n in sorted(left_out.items())))
    for why, n in sorted((again or {}).items()):
        lines.append(f"  rescheduled and counted (the model's check does not hold for their visits): {n} CCD(s): {why}")
    lines.append(f"  {'':<10}{'n':>5}{'p50':>9}{'p95':>9}{'max':>9}")
    lines.append(f"  {'per CCD':<10}{c['n']:>5}{c['p50']:>9.2f}{c['p95']:>9.2f}{c['max']:>9.2f}")
    lines.append(f"  {'per visit':<10}{v['n']:>5}{v['p50']:>9.2f}{v['p95']:>9.2f}{v['max']:>9.2f}")
    lines.append(f"  {'visit':<15}{'CCDs':>5}{'alerts':>8}{'last alert':>12}{'all done':>10}{'≤ ' + format(budget_s, 'g') + ' s':>10}")  # fmt: skip
    for row in stats["visits"]:
        lines.append(f"  {row['visit']:<15}{row['ccds']:>5}{row['alerts']:>8}{_f(row['last_alert_s']):>12}"
                     f"{row['latency_s']:>10.2f}{_pct(row['fraction_within']):>10}")  # fmt: skip
    lines.append(f"alerts within {budget_s:g} s: {_pct(stats['fraction_within'])} of {stats['alerts']} (lower bound: "
                 f"each CCD's alerts counted at its last alert); visits with ≥ {100 * REQUIRED_FRACTION:g} %: "
                 f"{stats['visits_meeting_requirement']}/{stats['visits_with_alerts']}; CCDs done within: "
                 f"{_pct(stats['ccd_fraction_within'])}")  # fmt: skip
    m = fit["mean_job"]
    lines.append(f"mean science-CCD job (s): prefetch {m['prefetch']:.3f}, transfer {m['transfer']:.3f} (+ waiting "
                 f"for the readout {m['wait']:.3f}), chain {m['chain']:.3f}, Level 1 {m['level1']:.3f}, outputs "
                 f"{m['other']:.3f}")  # fmt: skip
    lines.append(f"model check on this run ({fit['workers_per_visit']} worker(s) per visit, {fit['strings']} "
                 f"string(s); each visit's measured per-job costs, {fit['dispatch_gap_s']:.3f} s between jobs):")  # fmt: skip
    measured = {row["visit"]: row["latency_s"] for row in stats["visits"]}
    for row in fit["check"]:
        got = measured.get(row["visit"])
        ratio = f"measured/model {got / row['model_s']:.2f}" if got and row["model_s"] > 0 else ""
        lines.append(f"  visit {row['visit']}: {row['jobs']} jobs, model {row['model_s']:.2f} s (identical mean "
                     f"jobs: {row['mean_job_model_s']:.2f} s), measured {_f(got)} s  {ratio}")  # fmt: skip
    p, ps = fit["projection"], fit["projection_overhead_scaled"]
    lines.append(f"projection to the {FOCAL_PLANE_CCDS}-CCD LSSTCam focal plane on {fit['project_ranks']} ranks "
                 f"({p['workers']} worker(s) per visit, {fit['focal_plane_strings']} string(s)):")  # fmt: skip
    lines.append(f"  chain per CCD {fit['chain_4k_s']:.2f} s ({fit['chain_source']}); fixed overhead per job "
                 f"{p['overhead_s']:.3f} s (of which prefetch {p['prefetch_s']:.3f} s hidden in the first wave), "
                 f"{p['gap_s']:.3f} s between two jobs")  # fmt: skip
    waves = -(-p["jobs"] // p["workers"])
    lines.append(f"  visit latency = {waves}·({p['chain_s']:.2f} + {p['overhead_s']:.3f}) + {waves - 1}·{p['gap_s']:.3f} − "
                 f"{p['prefetch_s']:.3f} = {p['seconds']:.1f} s; with the overhead scaled by pixels "
                 f"(×{fit['pixel_scale']:.1f}): {ps['seconds']:.1f} s")  # fmt: skip
    st = fit.get("steady")
    if st:
        q, sm = st["projection"], st["mean_job"]
        lines.append(f"  steady state, each worker's first job of the night left out (its once-per-process costs; "
                     f"{st['jobs']} of {st['of_science_jobs']} science jobs): prefetch {sm['prefetch']:.3f}, transfer "
                     f"{sm['transfer']:.3f}, chain {sm['chain']:.3f}, Level 1 {sm['level1']:.3f} → chain per CCD "
                     f"{st['chain_4k_s']:.2f} s, overhead {q['overhead_s']:.3f} s: {waves}·({q['chain_s']:.2f} + "
                     f"{q['overhead_s']:.3f}) + {waves - 1}·{q['gap_s']:.3f} − {q['prefetch_s']:.3f} = "
                     f"{q['seconds']:.1f} s")  # fmt: skip
    lines.append(f"  assumes one rank per core, no queueing behind the string's previous visit (needs the latency "
                 f"≤ {fit['focal_plane_strings']} × the visit cadence), the 4 wavefront sensors left out")  # fmt: skip
    return "\n".join(lines)


def plot(rows: Sequence[CcdLatency], stats: Mapping[str, Any], path: Path, budget_s: float, title: str) -> None:
    """Histogram of the per-CCD latencies (to an alert / to the job's end) and the visits' latencies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    values = [r.latency_s for r in rows]
    bins = np.linspace(min(0.0, min(values)), max(max(values), budget_s) * 1.05, 40)
    ax.hist([[r.latency_s for r in rows if r.to_alert], [r.latency_s for r in rows if not r.to_alert]], bins=bins,
            stacked=True, label=["to the last alert", "to the job's end (no alert)"])  # fmt: skip
    ax.axvline(budget_s, color="k", ls="--", label=f"{budget_s:g} s")
    ax.set_xlabel("seconds after the end of readout")
    ax.set_ylabel("CCDs")
    ax.set_title("per CCD")
    ax.legend(fontsize=8)
    visits = stats["visits"]
    bx.bar(range(len(visits)), [v["latency_s"] for v in visits], color="C2")
    bx.axhline(budget_s, color="k", ls="--")
    bx.set_xticks(range(len(visits)), [str(v["visit"]) for v in visits], rotation=45, fontsize=7)
    bx.set_ylabel("seconds after the end of readout")
    bx.set_title("per visit (last alert or job)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--repo", help="repository made by 'lsstpipe simulate … --calibs' (not with --from-manifest)")
    ap.add_argument("-n", "--ranks", type=int, help="MPI ranks of the night (at least 2)")
    ap.add_argument("--visits", type=int, help="play only the first N visits (default: all)")
    ap.add_argument("--out", type=Path, help="the night's output folder (default: a new one under /tmp)")
    ap.add_argument("--config", type=Path, help="night configuration YAML passed to lsstpipe night")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed one-visit night that fills numba's cache first (under OUT/warmup)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=1800.0, help="stop a night still running after this (s)")
    ap.add_argument("--from-manifest", type=Path, metavar="OUT", help="analyse the night already played in OUT")
    ap.add_argument("--project-ranks", type=int, help="ranks of the focal-plane projection (default: -n)")
    ap.add_argument("--per-ccd-seconds", type=float, help="chain seconds of one full-size CCD for the projection")
    ap.add_argument("--ccd-chain", type=Path, metavar="FILE",
                    help="take the full-size chain seconds from benchmarks/ccd_chain.py's printout or JSON")  # fmt: skip
    ap.add_argument("--budget", type=float, default=LATENCY_BUDGET_S, help="latency budget in s (default 60)")
    ap.add_argument("--json", type=Path, help="write the figures as JSON")
    ap.add_argument("--png", type=Path, help="write the plot (default: OUT/visit_latency.png)")
    args = ap.parse_args(argv)
    if args.from_manifest is None and (args.repo is None or args.ranks is None):
        ap.error("give --repo and -n to play a night, or --from-manifest OUT to analyse one")
    if args.from_manifest is None and not (Path(args.repo) / "repo.yaml").is_file():
        ap.error(f"--repo {args.repo} is not a data repository; make one with 'lsstpipe simulate --repo "
                 f"{args.repo} --calibs'")  # fmt: skip
    if args.ranks is not None and args.ranks < 2:
        ap.error(f"-n must be at least 2 (rank 0 runs the DMCS, the others process CCDs), not {args.ranks}")
    for name in ("visits", "project_ranks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.per_ccd_seconds is not None and not args.per_ccd_seconds > 0:
        ap.error("--per-ccd-seconds must be positive")
    if not args.timeout > 0:
        ap.error("--timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "lsstpipe" / "numba"))
    os.environ.setdefault("LSSTPIPE_NUMBA_CACHE", "1")
    rc = 0
    if args.from_manifest is not None:
        out = args.from_manifest
    else:
        out = args.out or Path(f"/tmp/visit_latency-{os.getpid()}-{int(time.time())}")
        if (out / "manifest.json").is_file():
            print(f"error: {out} already holds a night (a second run would skip its CCDs); give a new --out or "
                  f"analyse it with --from-manifest {out}", file=sys.stderr)  # fmt: skip
            return 2
        if not args.no_warmup:
            run_night(Path(args.repo), args.ranks, out / "warmup", 1, args.config, args.timeout)
        t0 = time.time()
        rc = run_night(Path(args.repo), args.ranks, out, args.visits, args.config, args.timeout)
        print(f"night of {args.visits or 'all'} visit(s) on {args.ranks} ranks: exit {rc}, {time.time() - t0:.1f} s "
              f"→ {out}")  # fmt: skip
    try:
        manifest = read_manifest(out)
        if not manifest.get("complete"):
            print(f"warning: {out}/manifest.json says the night did not complete; the figures cover what it "
                  "processed", file=sys.stderr)  # fmt: skip
        night = manifest.get("night") or {}
        ranks = int(night.get("ranks") or args.ranks or 0)
        camera = str(night.get("camera") or "")
        if not ranks or not camera:
            raise HarnessError(f"{out}/manifest.json does not say its camera and ranks (night.camera, night.ranks)")
        outputs = read_ccd_outputs(out)
        rows, left_out = ccd_latencies(manifest, outputs)
        stats = latency_stats(rows, args.budget)
        chain_source = "--per-ccd-seconds"
        chain_4k = args.per_ccd_seconds
        if chain_4k is None and args.ccd_chain is not None:
            chain_4k, chain_source = read_chain_seconds(args.ccd_chain), f"{args.ccd_chain}"
        fit = model(manifest, outputs, camera, ranks, args.project_ranks or ranks, chain_4k, chain_source)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# python benchmarks/visit_latency.py ({platform.machine()}, {os.cpu_count()} CPUs visible; {camera}, "
          f"{ranks} ranks, {len(stats['visits'])} visit(s); {out})")  # fmt: skip
    again = rescheduled(manifest)
    print(report(stats, fit, left_out, args.budget, again))
    png = args.png or out / "visit_latency.png"
    try:
        plot(rows, stats, png, args.budget, f"{camera}, {ranks} ranks, {len(stats['visits'])} visits ({out})")
        print(f"plot: {png}")
    except ImportError:  # the figures above and the JSON below do not need it
        print("plot: not drawn (matplotlib is not installed: pip install matplotlib, or pip install -e '.[test]')")
    if args.json:
        figures = {
            "p50_seconds": stats["per_ccd"]["p50"], "p95_seconds": stats["per_ccd"]["p95"],
            "max_seconds": stats["per_ccd"]["max"], "visit_p50_seconds": stats["per_visit"]["p50"],
            "visit_p95_seconds": stats["per_visit"]["p95"], "visit_max_seconds": stats["per_visit"]["max"],
            "fraction_within_60s": stats["fraction_within"], "budget_seconds": args.budget,
            "projected_focal_plane_seconds": fit["projection"]["seconds"],
            "projected_focal_plane_seconds_overhead_scaled": fit["projection_overhead_scaled"]["seconds"],
            "projected_focal_plane_seconds_steady": fit["steady"]["projection"]["seconds"] if fit["steady"] else None,
            "camera": camera, "ranks": ranks, "out": str(out), "night_exit": rc, "not_counted": left_out,
            "rescheduled": again, "stats": stats, "model": fit, "ccds": [asdict(r) for r in rows],
        }  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1))
    return 1 if rc else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
