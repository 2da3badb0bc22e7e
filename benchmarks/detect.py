"""Single-core cost of background + detection + measurement on a full-size CCD, against SEP in the same run.

What is timed (one process, one thread: the thread counts of numba, OpenMP and the BLAS libraries are pinned
to 1 before numpy is imported):

1. ours: :func:`lsstpipe.pipelines.detection.detect_and_measure` on a full-size (4004×4096) float32 image
   with its variance plane and the PSF FWHM given — mesh background (128 px cells, clipped medians, bicubic
   spline) and its subtraction, the PSF-matched filter normalised by the variance plane, 5σ footprints,
   deblending, and measurement (windowed centroid, PSF flux, exact-overlap aperture flux, moments, flags).
   Per-stage times come from timing wrappers around the kernels the stage calls. The time with the PSF
   FWHM measured from the image is reported on its own (SEP has no such step).
2. SEP, the anchor, on the same image: ``sep.Background`` (its default 64 px mesh) and ``back()``
   subtraction, ``sep.extract`` at 5σ with the variance plane as per-pixel error (its default 3×3 filter and
   deblending), and ``sep.sum_circle`` (exact overlap) at its positions with the same radius.

The image is a deterministic synthetic CCD: sky with a gradient, ~4000 elliptical Moffat stars (β = 3.5,
FWHM 4.35 px like the simulator's 0.87" seeing) from S/N ~3 to saturation-free bright, Poisson-like noise.
Both run once untimed first (JIT compilation excluded); then each is timed ``--repeat`` times, interleaved,
and the median is reported, as wall time and as the process's CPU time (the latter is the steadier number
on a shared machine). Run ``python benchmarks/detect.py [--repeat N] [--json PATH] [--quick]``.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lsstpipe.pipelines.detection as det  # noqa: E402
from lsstpipe import __version__  # noqa: E402

FULL_SHAPE = (4004, 4096)
QUICK_SHAPE = (1000, 1200)
FWHM = 4.35
STAGES = (("estimate_background", "background"), ("matched_filter", "filter"), ("find_footprints", "footprints"),
          ("deblend", "deblend"), ("measure_footprints", "measure"))  # fmt: skip


def synthetic_ccd(shape, seed=1, n_stars=4000, fwhm=FWHM, sky=800.0):
    """A float32 image in electrons and its variance plane (see the module docstring)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    n = int(n_stars * ny * nx / (FULL_SHAPE[0] * FULL_SHAPE[1]))
    Y, X = np.mgrid[0:ny, 0:nx]
    expected = (sky + 0.01 * X - 0.005 * Y).astype(np.float64)
    beta = 3.5
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    r = 25
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    for x0, y0, f in zip(rng.uniform(0, nx, n), rng.uniform(0, ny, n), 10 ** rng.uniform(2.3, 5.3, n)):
        cx, cy = int(x0), int(y0)
        dx, dy = xx - (x0 - cx), yy - (y0 - cy)
        e1, e2 = rng.normal(0, 0.02, 2)
        q = (1 - e1) * dx * dx - 2 * e2 * dx * dy + (1 + e1) * dy * dy
        stamp = (1 + q / alpha**2) ** -beta
        stamp *= f / stamp.sum()
        y0s, y1s, x0s, x1s = max(cy - r, 0), min(cy + r + 1, ny), max(cx - r, 0), min(cx + r + 1, nx)
        expected[y0s:y1s, x0s:x1s] += stamp[y0s - cy + r : y1s - cy + r, x0s - cx + r : x1s - cx + r]
    read_noise = 6.0
    image = expected + rng.standard_normal(shape) * np.sqrt(expected + read_noise**2)
    variance = np.maximum(image, 0) + read_noise**2
    return image.astype(np.float32), variance.astype(np.float32)


@contextmanager
def stage_timers(acc):
    """Wrap the kernels the stage calls so that each call's wall time is added to ``acc[stage]``."""
    saved = {}
    for name, stage in STAGES:
        owner = det.M if name == "measure_footprints" else det
        fn = getattr(owner, name)
        saved[(owner, name)] = fn

        def timed(*a, _fn=fn, _stage=stage, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_stage] = acc.get(_stage, 0.0) + time.perf_counter() - t0

        setattr(owner, name, timed)
    try:
        yield acc
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


def run_ours(image, variance, radius, fwhm=FWHM):
    return det.detect_and_measure(image, variance, psf_fwhm=fwhm, threshold=5.0, aperture_radius=radius)


def run_sep(sep, image, variance, radius):
    bkg = sep.Background(image)
    data = image - bkg.back()
    err = np.sqrt(variance)
    objs = sep.extract(data, 5.0, err=err)
    flux, ferr, flag = sep.sum_circle(data, objs["x"], objs["y"], radius, err=err, subpix=0)
    return objs, flux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each (median reported)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_SHAPE[0]}×{QUICK_SHAPE[1]} image (tests)")
    args = parser.parse_args(argv)
    try:
        import sep
    except ImportError:
        print("benchmarks/detect.py needs SEP, the anchor: pip install sep", file=sys.stderr)
        return 2

    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    image, variance = synthetic_ccd(shape)
    radius = 2.0 * FWHM
    run_ours(image, variance, radius)  # warm-up: JIT compilation
    run_sep(sep, image, variance, radius)
    ours_t, sep_t, ours_cpu, sep_cpu, stages = [], [], [], [], []
    for _ in range(max(args.repeat, 1)):
        acc = {}
        with stage_timers(acc):
            t0, c0 = time.perf_counter(), time.process_time()
            cat = run_ours(image, variance, radius)
            ours_t.append(time.perf_counter() - t0)
            ours_cpu.append(time.process_time() - c0)
        stages.append(acc)
        t0, c0 = time.perf_counter(), time.process_time()
        objs, _ = run_sep(sep, image, variance, radius)
        sep_t.append(time.perf_counter() - t0)
        sep_cpu.append(time.process_time() - c0)
    t0 = time.perf_counter()
    cat_est, summary = det.detect_and_measure(image, variance, psf_fwhm=None, aperture_radius=radius,
                                              return_summary=True)  # fmt: skip
    with_fwhm = time.perf_counter() - t0

    detect_s, sep_s = statistics.median(ours_t), statistics.median(sep_t)
    stage_s = {k: statistics.median(s.get(k, 0.0) for s in stages) for _, k in STAGES}
    stage_s["other"] = max(detect_s - sum(stage_s.values()), 0.0)
    result = {
        "detect_seconds": detect_s,
        "sep_seconds": sep_s,
        "ratio_to_sep": detect_s / sep_s,
        "detect_cpu_seconds": statistics.median(ours_cpu),
        "sep_cpu_seconds": statistics.median(sep_cpu),
        "ratio_to_sep_cpu": statistics.median(ours_cpu) / statistics.median(sep_cpu),
        "stage_seconds": stage_s,
        "detect_with_fwhm_estimate_seconds": with_fwhm,
        "estimated_fwhm": summary.psf_fwhm,
        "n_sources": int(cat.size),
        "n_sources_sep": int(len(objs)),
        "runs_seconds": {"ours": ours_t, "sep": sep_t},
        "config": {
            "shape": list(shape),
            "fwhm": FWHM,
            "aperture_radius": radius,
            "threshold": 5.0,
            "repeat": args.repeat,
            "quick": args.quick,
        },  # fmt: skip
        "versions": {
            "lsstpipe": __version__,
            "numba": numba.__version__,
            "numpy": np.__version__,
            "sep": sep.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
    }
    print(f"image {shape[0]}×{shape[1]}, one core, median of {args.repeat} runs after a warm-up")
    print(f"  ours (background + detection + measurement): {detect_s:.3f} s  ({cat.size} sources)")
    for k, v in stage_s.items():
        print(f"    {k:12s} {v:.3f} s")
    print(f"  SEP  (Background + extract + sum_circle):    {sep_s:.3f} s  ({len(objs)} sources)")
    print(f"  ratio ours / SEP: {detect_s / sep_s:.2f} wall, {result['ratio_to_sep_cpu']:.2f} CPU time  (target <= 1)")
    print(f"  ours with the PSF FWHM measured ({summary.psf_fwhm:.2f} px): {with_fwhm:.3f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
