"""Single-core cost of the whole per-CCD alert-production chain on a full-size two-snap visit, with anchors.

What is timed (one process, one thread: the thread counts of numba, OpenMP and the BLAS libraries are pinned
to 1 before numpy is imported):

1. the chain, :func:`lsstpipe.pipelines.ap.process_ccd`, on one full-size LSSTCam CCD (R22_S11, e2v,
   4004×4096) of a simulated r-band visit of two 15 s snaps, from the raw segments in memory to the DIASource
   table: ISR of both snaps, cosmic rays and snap combination, characterization (background, PSF, WCS, zero
   point), template warp, PSF matching, subtraction and decorrelation, DIASource detection, measurement and
   forced photometry, SDQA. Its per-stage times come from the chain's own ``timings``. Inputs are read from
   the repository before timing (the worker prefetches them while the shutter is open).
2. anchors on the same images: SEP (background + extraction + aperture sums) on the calexp against our
   detection and measurement (:func:`lsstpipe.pipelines.detection.detect_and_measure`); ``scipy.signal.fftconvolve``
   of the warped template with a kernel of the PSF-matching kernel's size; the ISR of one snap written as
   plain numpy expressions (``benchmarks/isr.py``) against ``run_isr`` and a plain numpy copy (bandwidth: ISR's
   minimal bytes — raw int32 segments, bias, dark and flat read; image, variance, mask written — over its
   time, against the copy's read + written bytes; both into new arrays, as the chain's ISR writes, from the
   worker's allocator, and both into arrays already touched); SFFT when it is installed.
3. the peak resident memory of a worker's cycle (with the worker's allocator settings: by default, as
   ``worker.keep_memory: true``, :func:`lsstpipe.runtime.memory.keep_freed_memory`, so that from the second
   CCD on the cycle runs in memory the previous one touched; ``--return-memory`` as ``keep_memory: false``,
   :func:`~lsstpipe.runtime.memory.return_large_frees` and, around the chain,
   :func:`~lsstpipe.runtime.memory.planes_reused`, so that each CCD's pages are new): loading a CCD's inputs (whose readers hold transient
   buffers of their own) and running its chain, each with its own high-water mark (reset before each, Linux
   ``/proc/self/clear_refs``); ``peak_rss_mb`` is the larger over the counted runs. As a
   worker does, each run gets freshly loaded inputs (untimed) and hands their pixels over
   (``process_ccd(..., release_inputs=True)``); ``--hold-inputs`` keeps one set of inputs alive and reuses it,
   as a caller that does not hand them over (the comparison of issue 7).

The visit is simulated first by ``lsstpipe simulate`` in a subprocess (so its memory does not count) into a
temporary repository (~2 GB, removed afterwards unless ``--keep DIR``). The chain runs once untimed (JIT
compilation), then ``--repeat`` times; medians are reported, except for ISR's bandwidth: ISR, the copies
and the numpy ISR are each the fastest of ``max(repeat, 5)`` runs, ISR and the copies in turn (as in
``benchmarks/isr.py``).
``--quick`` uses a mini-camera CCD (512 px) so that the test suite can check the harness.
Run ``python benchmarks/ccd_chain.py [--repeat N] [--json PATH]``.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.detect import run_sep  # noqa: E402
from benchmarks.isr import copy_anchors, numpy_isr  # noqa: E402
from benchmarks.timing import fastest, fastest_interleaved, median_wall_cpu  # noqa: E402
from lsstpipe import __version__  # noqa: E402
from lsstpipe.pipelines.ap import ApConfig, process_ccd  # noqa: E402
from lsstpipe.pipelines.detection import detect_and_measure  # noqa: E402
from lsstpipe.pipelines.inputs import load_ccd_inputs, visit_exposures  # noqa: E402
from lsstpipe.pipelines.isr import run_isr  # noqa: E402
from lsstpipe.repo import Repository  # noqa: E402

FULL = ("lsstcam", "R22_S11")
QUICK = ("mini", "R10_S11")


def simulate(root: Path, camera: str, detector: str, seed: int) -> None:
    cmd = [sys.executable, "-m", "lsstpipe", "simulate", "--repo", str(root), "--camera", camera, "--detectors",
           detector, "--visits", "1", "--bands", "r", "--no-cds", "--quiet", "--seed", str(seed)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"simulation failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def reset_hwm() -> bool:
    """Reset the process's resident high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return None


def run(args: argparse.Namespace) -> dict:
    from lsstpipe.runtime.memory import planes_reused, worker_allocator

    kept = worker_allocator(keep=not args.return_memory)  # as a worker rank does at start-up
    camera, detector = QUICK if args.quick else FULL
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ccd_chain_"))
    try:
        if not (tmp / "repo.yaml").exists():
            simulate(tmp, camera, detector, args.seed)
        repo = Repository(tmp)
        visit = int(visit_exposures(repo, repo.exposures("OBJECT")[0]["visit"])[0]["visit"])
        held = load_ccd_inputs(repo, visit, detector, calibs="truth")
        rss_inputs = peak_rss_mb()
        n_snaps = len(held.raw_snaps)
        config = ApConfig()
        timings: list[dict] = []
        walls: list[float] = []
        cpus: list[float] = []
        chain_peaks: list[float] = []
        load_peaks: list[float] = []
        last: list = [None]
        for run_index in range(max(args.repeat, 1) + 1):  # the first run compiles (JIT) and is not counted
            last[0] = None  # a worker keeps one CCD's result at a time
            # A worker's cycle is loading a CCD's inputs, then its chain: each has its own high-water mark
            # (loading holds transient buffers of its own), and the worker's peak is the larger.
            can_reset = reset_hwm()
            if args.hold_inputs:
                inputs, release = held, False
            else:
                inputs, release, held = held or load_ccd_inputs(repo, visit, detector, calibs="truth"), True, None
            loaded = run_index > 0 and not args.hold_inputs  # run 0's inputs were loaded before the loop
            load_peak = hwm_mb() if can_reset and loaded else None
            can_reset = can_reset and reset_hwm()
            t0, c0 = time.perf_counter(), time.process_time()
            with planes_reused():  # as the worker runs the chain
                last[0] = process_ccd(inputs, config, release_inputs=release)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = hwm_mb() if can_reset else None
            del inputs
            if run_index:
                walls.append(wall)
                cpus.append(cpu)
                timings.append(last[0].timings)
                if peak is not None:
                    chain_peaks.append(peak)
                if load_peak is not None:
                    load_peaks.append(load_peak)
        chain_wall, chain_cpu = statistics.median(walls), statistics.median(cpus)
        # Without the high-water-mark reset (not Linux): the process's peak since it started, compilation included.
        rss_worker = max(chain_peaks + load_peaks) if chain_peaks else peak_rss_mb()
        res = last[0]
        stages = {k: statistics.median(t.get(k, 0.0) for t in timings) for k in res.timings}
        inputs = held or load_ccd_inputs(repo, visit, detector, calibs="truth")  # for the ISR anchor
        del held

        calexp = res.calexp
        fwhm = float(res.sdqa["psf_fwhm_pix"])
        radius = 2.0 * fwhm
        bad = (calexp.mask & 0b111) != 0
        detect_wall, detect_cpu = median_wall_cpu(
            lambda: detect_and_measure(calexp.image, calexp.variance, bad, psf_fwhm=fwhm, aperture_radius=radius),
            args.repeat,
        )
        out = {
            "version": __version__, "camera": camera, "detector": detector, "shape": list(calexp.shape),
            "snaps": n_snaps, "repeat": args.repeat, "chain_seconds": chain_wall, "memory_kept": kept,
            "chain_cpu_seconds": chain_cpu, "stage_seconds": stages, "detect_seconds": detect_wall,
            "flags": list(res.flags), "sdqa": res.sdqa, "n_dia_sources": int(len(res.dia_sources)),
            "peak_rss_mb": rss_worker, "inputs_rss_mb": rss_inputs,
            "chain_peak_rss_mb": max(chain_peaks) if chain_peaks else None, "inputs_released": not args.hold_inputs,
            "load_peak_rss_mb": max(load_peaks) if load_peaks else None,
            "machine": {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        }  # fmt: skip
        try:
            import sep
        except ImportError:
            out["sep_seconds"] = None
            out["notes"] = ["SEP not installed (pip install sep): no detection anchor"]
        else:
            image = np.ascontiguousarray(np.where(bad, 0, calexp.image), np.float32)
            out["sep_seconds"] = median_wall_cpu(lambda: run_sep(sep, image, calexp.variance, radius), args.repeat)[0]
            out["detect_over_sep"] = out["detect_seconds"] / out["sep_seconds"]

        # ISR bandwidth on one snap, against a plain numpy copy and the numpy ISR: both write new arrays, as
        # the chain's ISR does (kept memory: pages the chains before touched; returned: fresh pages); and both
        # into arrays already touched (benchmarks/isr.py). ISR and its anchors
        # by the same statistic as the copies: the fastest of max(repeat, 5) runs, in turn with them.
        raw, meta = inputs.raw_snaps[0], inputs.snap_metadata[0]
        prev = run_isr(raw, inputs.detector, inputs.calibs, meta, config.isr)
        n_isr = max(args.repeat, 5)
        copy_new, copy_touched, copy_bytes = copy_anchors()
        t = fastest_interleaved({  # in turn: the same loads of a shared node on ISR and on its anchors
            "isr": lambda: run_isr(raw, inputs.detector, inputs.calibs, meta, config.isr),
            "copy": copy_new,
            "isr_resident": lambda: run_isr(raw, inputs.detector, inputs.calibs, meta, config.isr, out=prev),
            "copy_resident": copy_touched,
        }, n_isr)  # fmt: skip
        isr_wall, isr_resident = t["isr"], t["isr_resident"]
        npix = calexp.shape[0] * calexp.shape[1]
        minimal = int(raw.nbytes + 3 * 4 * npix + 3 * 4 * npix)
        out["isr_seconds"] = isr_wall
        out["isr_gbps"] = minimal / isr_wall / 1e9
        out["copy_gbps"] = copy_bytes / t["copy"] / 1e9
        out["isr_fraction_of_copy"] = out["isr_gbps"] / out["copy_gbps"]
        out["isr_resident_gbps"] = minimal / isr_resident / 1e9
        out["copy_resident_gbps"] = copy_bytes / t["copy_resident"] / 1e9
        out["isr_resident_fraction_of_copy_resident"] = out["isr_resident_gbps"] / out["copy_resident_gbps"]
        if inputs.calibs.crosstalk is not None and inputs.calibs.bias is not None:
            out["numpy_isr_seconds"] = fastest(lambda: numpy_isr(raw, inputs.detector, inputs.calibs, meta), n_isr)
            out["numpy_isr_over_ours"] = out["numpy_isr_seconds"] / isr_wall

        # Convolution anchor: the template with a kernel of the PSF-matching kernel's size.
        if res.difference is not None:
            from scipy.signal import fftconvolve

            k = int(res.difference.kernel_info.get("kernel_size", 21))
            kernel = np.ones((k, k), np.float32) / k**2
            tmpl = np.ascontiguousarray(np.nan_to_num(res.difference.template), np.float32)
            out["fftconvolve_seconds"] = median_wall_cpu(lambda: fftconvolve(tmpl, kernel, mode="same"), args.repeat)[0]
            out["difference_over_fftconvolve"] = stages.get("difference", np.nan) / out["fftconvolve_seconds"]
        try:
            import sfft  # noqa: F401
        except ImportError:
            out.setdefault("notes", []).append("SFFT not installed: no SFFT anchor")
        return out
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def report(r: dict) -> str:
    s = r["stage_seconds"]
    pages = "the worker's kept memory: pages touched before" if r.get("memory_kept") else "fresh pages"
    lines = [
        f"# python benchmarks/ccd_chain.py ({r['machine']['cores']} cores visible, one thread; median of {r['repeat']}, "
        f"ISR's bandwidth: fastest of {max(r['repeat'], 5)})",
        f"{r['camera']} {r['detector']} {r['shape'][0]}×{r['shape'][1]}, {r['snaps']} snaps, worker memory "
        f"{'kept' if r.get('memory_kept') else 'returned'} between CCDs: whole chain "
        f"{r['chain_seconds']:.2f} s wall ({r['chain_cpu_seconds']:.2f} s CPU; target ≤ 5 s)",
        "  " + ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "total"),
        f"detection+measurement {r['detect_seconds']:.2f} s"
        + (
            f" vs SEP {r['sep_seconds']:.2f} s = {r['detect_over_sep']:.2f}× SEP's time" if r.get("sep_seconds") else ""
        ),
        f"ISR {r['isr_seconds'] * 1e3:.1f} ms per snap into new planes ({pages}): {r['isr_gbps']:.1f} GB/s = "
        f"{100 * r['isr_fraction_of_copy']:.0f}% of a plain numpy copy's {r['copy_gbps']:.1f} GB/s (np.copy, a new array too; "
        f"target ≥ 80 %); into touched planes {r['isr_resident_gbps']:.1f} GB/s = "
        f"{100 * r['isr_resident_fraction_of_copy_resident']:.0f}% of np.copyto's {r['copy_resident_gbps']:.1f} GB/s"
        + (f"; numpy ISR {r['numpy_isr_over_ours']:.1f}× slower" if "numpy_isr_over_ours" in r else ""),
    ]
    if "fftconvolve_seconds" in r:
        lines.append(f"differencing {s.get('difference', float('nan')):.2f} s vs one scipy fftconvolve of the template "
                     f"{r['fftconvolve_seconds']:.2f} s = {r['difference_over_fftconvolve']:.2f}×")  # fmt: skip
    parts = [f"loading a CCD's inputs peaks at {r['load_peak_rss_mb']:.0f} MB"] if r.get("load_peak_rss_mb") else []
    if r.get("chain_peak_rss_mb"):
        parts.append(f"the chain at {r['chain_peak_rss_mb']:.0f} MB")
    parts.append(f"the first load, before any compilation, at {r['inputs_rss_mb']:.0f} MB")
    how = "inputs handed over (release_inputs=True)" if r.get("inputs_released") else "inputs held by the caller"
    lines.append(f"peak RSS {r['peak_rss_mb']:.0f} MB of a worker loading a CCD's inputs and running its chain ({how}; "
                 f"{', '.join(parts)}; target ≤ 1500 MB)")  # fmt: skip
    lines.append(f"flags: {', '.join(r['flags']) or 'none'}; DIASources: {r['n_dia_sources']}")
    lines.extend(f"note: {n}" for n in r.get("notes", []))
    return "\n".join(lines)


def _stopped(signum, _frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    # A stop (``timeout``, the batch system) ends the run as an error does: the simulation's subprocess is
    # killed (``subprocess.run`` kills its child when interrupted) and the temporary repository (~2 GB) removed.
    # Python's default SIGTERM would leave both behind, the simulation running on and slowing what comes next.
    signal.signal(signal.SIGTERM, _stopped)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each (median reported)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="a mini-camera CCD (512 px): checks the harness")
    parser.add_argument("--keep", default=None, help="simulate into (or reuse) this repository and keep it")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--return-memory", action="store_true",
                        help="as a worker with keep_memory: false (each CCD's pages new), not the default keep")  # fmt: skip
    parser.add_argument("--hold-inputs", action="store_true",
                        help="keep one set of inputs alive and reuse it (no release_inputs): the memory comparison")  # fmt: skip
    args = parser.parse_args(argv)
    r = run(args)
    print(report(r))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(r, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
