"""Single-core cost of instrument signature removal on a full-size CCD, against anchors measured in the same run.

What is timed (one process, one thread: numba's and the BLAS libraries' thread counts are pinned to 1 before
numpy is imported), on a simulated full-size LSSTCam exposure of an e2v (R22_S11) and an ITL (R10_S11) CCD
rendered in memory with the simulator's instrument signature, master calibrations from its truth:

1. ``run_isr`` (overscan per row, crosstalk, assembly, bias, gain, dark, flat, variance, mask; r band, no
   fringes; default configuration) into new output planes, as the chain calls it (``process_ccd`` makes new
   planes for each snap), from the worker's allocator (by default as ``worker.keep_memory: true``,
   :func:`lsstpipe.runtime.memory.keep_freed_memory`: a new plane is memory an earlier one used and freed;
   ``--return-memory`` as ``keep_memory: false``: each a new mapping, whose pages the kernel zeroes on first
   touch), and into planes already touched by an earlier call; the fused pass alone
   (:func:`kernels.isr.isr_ccd`, which measures the overscan levels where it reads each raw row) and the
   separate overscan pass it saves (:func:`kernels.overscan.overscan_levels`, still used for smoothed levels);
   the fused pass also with exact crosstalk (tolerance 0) and without crosstalk, and the unfused variant
   (``kernels.crosstalk.remove_crosstalk`` on the whole segments first, then the fused pass without
   crosstalk) to show what fusing crosstalk pays;
2. the effective bandwidth of ISR: the minimal bytes it must move — the raw int32 segments, bias, dark and
   flat float32 read; image and variance float32 and mask int32 written — over its time;
3. anchors: a plain numpy copy of a 4k×4k float32 image (``np.copy``, bytes read + written, as STREAM's
   Copy: the issue's "~19 GB/s on one core here"), which like ``run_isr`` writes into a new array from the
   same allocator (with ``--return-memory`` new pages, which the kernel zeroes on first touch: ~1.5–2× the
   time of the same copy into touched memory here);
   the same copy into a destination already touched (``np.copyto``), the anchor for ISR into touched
   planes — the copies and ``run_isr`` run in turn, each the fastest of its runs
   (:func:`benchmarks.timing.fastest_interleaved`: on a shared node a ratio of blocks timed one after the
   other moved by 20 points between two runs); a bare numba
   loop moving ISR's seven planes (one int32 and three float32 read, two float32 and one int32 written, next
   to no arithmetic: what one pass with that traffic can reach on the core, into touched planes and into new
   ones), the same loop with all of ISR's
   per-pixel arithmetic (no crosstalk: what the arithmetic itself costs on top of the traffic), and the same
   ISR written as plain numpy expressions (per-row ``np.median`` overscan, crosstalk by ``tensordot``,
   subtract, multiply, divide, assemble by slicing, variance and mask).

Each measurement is the fastest of ``--repeat`` runs after an untimed warm-up (JIT compilation excluded).
Run ``python benchmarks/isr.py [--repeat N] [--json PATH] [--quick]``.
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
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import fastest, fastest_interleaved  # noqa: E402
from kernels.config import njit  # noqa: E402
from kernels.crosstalk import remove_crosstalk  # noqa: E402
from kernels.isr import isr_ccd  # noqa: E402
from kernels.isr_pass import isr_row_fwd  # noqa: E402
from kernels.overscan import overscan_levels  # noqa: E402
from lsstpipe.camera import get_camera  # noqa: E402
from lsstpipe.pipelines.exposure import MaskBit  # noqa: E402
from lsstpipe.pipelines.isr import IsrCalibs, IsrConfig, amp_layout, bias_from_column_pattern, run_isr  # noqa: E402
from lsstpipe.runtime.memory import worker_allocator  # noqa: E402
from lsstpipe.sim import sky as skymod  # noqa: E402
from lsstpipe.sim.exposure import render_exposure  # noqa: E402
from lsstpipe.sim.instrument import make_signature  # noqa: E402
from lsstpipe.sim.opsim import synthetic_visits  # noqa: E402
from lsstpipe.sim.simulate import science_specs  # noqa: E402

DETECTORS = ("R22_S11", "R10_S11")  # e2v, ITL
BAND = "r"


def copy_anchors():
    """A plain numpy copy of a 4k×4k float32 image into a new array (``np.copy``) and into one already touched
    (``np.copyto``), as callables, and the bytes each moves (read + written)."""
    src = np.ones((4096, 4096), np.float32)
    dst = np.empty_like(src)
    return (lambda: np.copy(src)), (lambda: np.copyto(dst, src)), 2 * src.nbytes


@njit
def _stream7(raw, b, d, f, img, var, msk):
    for y in range(img.shape[0]):
        r = raw[y]
        br, dr, fr, ir, vr, mr = b[y], d[y], f[y], img[y], var[y], msk[y]
        for x in range(ir.shape[0]):
            ir[x] = (np.float32(r[x]) - br[x]) * fr[x]
            vr[x] = dr[x] + fr[x]
            mr[x] = r[x] >> 16


_N7 = 4096


def _seven_planes():
    """ISR's traffic on contiguous 4k×4k planes: raw int32 counts, bias, dark and flat float32 (values as a
    CCD's: counts 1000–60000, flat 0.5–1.5) to read; image and variance float32 and mask int32 to write."""
    n = _N7
    rng = np.random.default_rng(0)
    raw = rng.integers(1000, 60000, (n, n), dtype=np.int32)
    b, d = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    f = 0.5 + rng.random((n, n), np.float32)
    return raw, b, d, f, np.empty((n, n), np.float32), np.empty((n, n), np.float32), np.empty((n, n), np.int32)


def stream7_gbps(planes: tuple, repeat: int) -> tuple[float, float]:
    """The ceiling of a single pass with ISR's traffic on this core: a numba loop reading an int32 and three
    float32 4k×4k planes and writing two float32 and one int32 plane, with next to no arithmetic — into the
    given planes (touched), and into three new planes each run (from the worker's allocator, as ``run_isr``'s
    in the chain: kept memory, or new mappings whose pages the kernel zeroes on first touch). GB/s of each."""
    raw, b, d, f, img = planes[:5]
    nbytes = 7 * 4 * raw.size
    touched = fastest(lambda: _stream7(*planes), max(repeat, 5))
    new = fastest(lambda: _stream7(raw, b, d, f, np.empty(img.shape, np.float32), np.empty(img.shape, np.float32),
                                   np.empty(img.shape, np.int32)), max(repeat, 5))  # fmt: skip
    return nbytes / touched / 1e9, nbytes / new / 1e9


@njit
def _arith7(raw, b, d, f, img, var, msk):
    zero = np.float32(0.0)
    for y in range(img.shape[0]):  # the fused pass's own row kernel, without crosstalk, on whole rows
        r = raw[y]
        isr_row_fwd(r, np.float32(1000.0), None, zero, None, zero, zero, None, zero, zero, None, zero, r, b, d, f, y,
                     0, img[y], var[y], msk[y], np.float32(1.5), np.float32(25.0), np.int32(60000), np.float32(15.0),
                     np.int32(1), np.int32(2))  # fmt: skip


def arith7_gbps(planes: tuple, repeat: int) -> float:
    """The same seven planes in one pass with all of ISR's per-pixel arithmetic — :func:`kernels.isr.isr_ccd`'s
    own row kernel without crosstalk (overscan level, bias, gain, dark, flat division, variance, NaN/inf
    checks, saturation and NO_DATA bits) over contiguous planes: how much of ISR's cost the arithmetic is."""
    t = fastest(lambda: _arith7(*planes), max(repeat, 5))
    return 7 * 4 * _N7 * _N7 / t / 1e9


def numpy_isr(raw, det, calibs, meta):
    """The same ISR as plain numpy expressions (float32 where the fused kernel uses float32)."""
    amps = sorted(det.amps, key=lambda a: a.hdu)
    rows, cols = amps[0].raw_data
    orows, ocols = amps[0].raw_serial_overscan
    level = np.median(raw[:, orows, ocols], axis=2).astype(np.float32)
    s = raw[:, rows, cols].astype(np.float32) - level[:, :, None]
    xt = calibs.crosstalk.astype(np.float32).copy()
    np.fill_diagonal(xt, 0.0)
    s -= np.tensordot(xt, s, axes=(0, 0))
    image = np.empty(det.shape, np.float32)
    for a in amps:
        y0, y1, x0, x1 = a.bbox
        image[y0:y1, x0:x1] = s[a.hdu - 1][:: 1 if a.flip_y else -1, :: -1 if a.flip_x else 1] * np.float32(a.gain)
    image -= calibs.bias * np.float32(np.mean([a.gain for a in amps]))  # (per-amp gain: same cost)
    variance = np.maximum(image, 0) + np.float32(amps[0].read_noise ** 2)
    image -= calibs.dark * np.float32(meta["dark_time"])
    image /= calibs.flat
    variance /= calibs.flat**2
    sat = np.empty(det.shape, np.int32)
    for a in amps:
        y0, y1, x0, x1 = a.bbox
        blk = raw[a.hdu - 1][rows, cols][:: 1 if a.flip_y else -1, :: -1 if a.flip_x else 1]
        sat[y0:y1, x0:x1] = np.where(blk >= a.saturation, int(MaskBit.SAT), 0)
    return image, variance, sat


def one_detector(name: str, repeat: int) -> dict:
    camera = get_camera("lsstcam")
    det = camera[name]
    sig = make_signature(camera, det, 1)
    spec = science_specs(synthetic_visits(1, seed=1, bands=BAND)[0], 1)[0]
    rate = skymod.sky_electrons_per_pixel(spec.sky_mag, spec.band, camera.pixel_scale_arcsec)
    raw = render_exposure(camera, sig, spec, None, rate, 1).segments
    raw.flags.writeable = False
    calibs = IsrCalibs(bias=bias_from_column_pattern(sig.col_pattern, det), dark=sig.dark_rate, flat=sig.flat(BAND),
                       crosstalk=sig.crosstalk)  # fmt: skip
    meta = {"exptime": spec.exptime, "dark_time": spec.dark_time, "band": spec.band}
    amps = sorted(det.amps, key=lambda a: a.hdu)
    layout = amp_layout(det)
    orows, ocols = amps[0].raw_serial_overscan
    levels = overscan_levels(raw, orows, ocols)
    gains, rn, sat = ([a.gain for a in amps], [a.read_noise for a in amps], [a.saturation for a in amps])
    out = (np.empty(det.shape, np.float32), np.empty(det.shape, np.float32), np.empty(det.shape, np.int32))

    default_tol = IsrConfig().crosstalk_tolerance

    def fused(xt=calibs.crosstalk, segs=raw, tol=default_tol):  # the overscan levels measured in the pass
        return isr_ccd(segs, layout, ocols, gains, rn, sat, bias=calibs.bias, dark=calibs.dark, flat=calibs.flat,
                       crosstalk=xt, crosstalk_tolerance=tol, dark_time=spec.dark_time, out=out)  # fmt: skip

    def unfused():
        xt = remove_crosstalk(raw, calibs.crosstalk, pedestal=levels.mean(axis=1))
        return isr_ccd(np.rint(xt).astype(np.int32), layout, levels, gains, rn, sat, bias=calibs.bias,
                       dark=calibs.dark, flat=calibs.flat, dark_time=spec.dark_time, out=out)  # fmt: skip

    r = {"detector": name, "vendor": det.vendor.name, "shape": list(det.shape)}
    reuse = run_isr(raw, det, calibs, meta)
    copy_new, copy_touched, copy_bytes = copy_anchors()
    t = fastest_interleaved({  # ISR and its anchors in turn: the same loads of a shared node on both
        "isr": lambda: run_isr(raw, det, calibs, meta),  # new planes, as in the chain
        "copy": copy_new,
        "isr_resident": lambda: run_isr(raw, det, calibs, meta, out=reuse),
        "copy_resident": copy_touched,
    }, max(repeat, 5))  # fmt: skip
    r["run_isr_seconds"], r["run_isr_resident_seconds"] = t["isr"], t["isr_resident"]
    r["copy_gbps"] = copy_bytes / t["copy"] / 1e9
    r["copy_resident_gbps"] = copy_bytes / t["copy_resident"] / 1e9
    r["overscan_seconds"] = fastest(lambda: overscan_levels(raw, orows, ocols), repeat)
    r["fused_seconds"] = fastest(fused, repeat)
    r["fused_exact_crosstalk_seconds"] = fastest(lambda: fused(tol=0.0), repeat)
    r["fused_no_crosstalk_seconds"] = fastest(lambda: fused(None), repeat)
    r["unfused_crosstalk_seconds"] = fastest(unfused, repeat)
    r["numpy_isr_seconds"] = fastest(lambda: numpy_isr(raw, det, calibs, meta), repeat)
    npix = det.shape[0] * det.shape[1]
    r["minimal_bytes"] = int(raw.nbytes + 3 * 4 * npix + (4 + 4 + 4) * npix)
    r["isr_gbps"] = r["minimal_bytes"] / r["run_isr_seconds"] / 1e9
    r["isr_resident_gbps"] = r["minimal_bytes"] / r["run_isr_resident_seconds"] / 1e9
    r["fused_gbps"] = r["minimal_bytes"] / r["fused_seconds"] / 1e9
    return r


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="one detector, 2 repeats (for the test suite)")
    ap.add_argument("--return-memory", action="store_true",
                    help="as a worker with keep_memory: false (every new plane fresh pages), not the default keep")  # fmt: skip
    args = ap.parse_args(argv)
    repeat = 2 if args.quick else args.repeat
    dets = DETECTORS[:1] if args.quick else DETECTORS
    kept = worker_allocator(keep=not args.return_memory)  # the worker's allocator settings
    pages = "the worker's kept memory: pages touched before" if kept else "fresh pages"
    planes = _seven_planes()  # rendered once for the three loops
    stream, stream_new = stream7_gbps(planes, repeat)
    arith = arith7_gbps(planes, repeat)
    del planes
    per = [one_detector(d, repeat) for d in dets]
    isr_s = statistics.mean(p["run_isr_seconds"] for p in per)
    np_s = statistics.mean(p["numpy_isr_seconds"] for p in per)
    gbps = statistics.mean(p["isr_gbps"] for p in per)
    gbps_resident = statistics.mean(p["isr_resident_gbps"] for p in per)
    copy = statistics.mean(p["copy_gbps"] for p in per)
    resident = statistics.mean(p["copy_resident_gbps"] for p in per)
    fraction = statistics.mean(p["isr_gbps"] / p["copy_gbps"] for p in per)  # each against the copy run beside it
    fraction_resident = statistics.mean(p["isr_resident_gbps"] / p["copy_resident_gbps"] for p in per)
    result = {
        "isr_seconds": isr_s, "isr_gbps": gbps, "copy_gbps": copy, "numpy_isr_seconds": np_s,
        "isr_fraction_of_copy_bandwidth": fraction, "numpy_over_isr": np_s / isr_s, "detectors": per,
        "isr_resident_gbps": gbps_resident, "copy_resident_gbps": resident,
        "isr_resident_fraction_of_copy_resident_bandwidth": fraction_resident,
        "stream7_gbps": stream, "stream7_fraction_of_copy_resident_bandwidth": stream / resident,
        "stream7_new_gbps": stream_new, "stream7_new_fraction_of_copy_bandwidth": stream_new / copy,
        "arith7_gbps": arith, "arith7_fraction_of_stream7": arith / stream,
        "memory_kept": kept, "numba": numba.__version__, "numpy": np.__version__, "machine": platform.machine(),
        "processor": platform.processor(), "threads": numba.get_num_threads(),
    }  # fmt: skip
    print(f"numpy copy of 4k×4k float32 (read + write): {copy:.1f} GB/s into a new array (np.copy), {resident:.1f} GB/s "
          f"into touched memory (np.copyto); a bare one-pass loop with ISR's seven planes into touched memory: "
          f"{stream:.1f} GB/s = {stream / resident:.0%} of that copy (the ceiling of a fused ISR on this core), into "
          f"new planes ({pages}) {stream_new:.1f} GB/s = {stream_new / copy:.0%} of np.copy (the ceiling there); the same "
          f"pass with all of ISR's per-pixel arithmetic (no crosstalk, contiguous planes): {arith:.1f} GB/s = "
          f"{arith / stream:.0%} of the bare loop (what ISR pays beyond it is its layout — 16 segments read, the CCD "
          f"assembled — crosstalk and the overscan levels)")  # fmt: skip
    for p in per:
        print(
            f"{p['detector']} ({p['vendor']}, {p['shape'][0]}×{p['shape'][1]}): run_isr {p['run_isr_seconds'] * 1e3:.1f} ms "
            f"into new planes ({pages}; {p['run_isr_resident_seconds'] * 1e3:.1f} into touched ones); fused pass "
            f"{p['fused_seconds'] * 1e3:.1f} ms with the overscan levels measured in it (a separate overscan pass: "
            f"{p['overscan_seconds'] * 1e3:.1f} ms) "
            f"(exact crosstalk {p['fused_exact_crosstalk_seconds'] * 1e3:.1f}; none "
            f"{p['fused_no_crosstalk_seconds'] * 1e3:.1f}; crosstalk unfused "
            f"{p['unfused_crosstalk_seconds'] * 1e3:.1f}; into touched planes); {p['minimal_bytes'] / 1e6:.0f} MB minimal "
            f"traffic → {p['isr_gbps']:.1f} GB/s = {p['isr_gbps'] / p['copy_gbps']:.0%} of np.copy's {p['copy_gbps']:.1f} "
            f"(into touched planes {p['isr_resident_gbps']:.1f} GB/s = "
            f"{p['isr_resident_gbps'] / p['copy_resident_gbps']:.0%} of np.copyto's {p['copy_resident_gbps']:.1f}; "
            f"fused pass alone {p['fused_gbps'] / p['copy_resident_gbps']:.0%}); numpy ISR "
            f"{p['numpy_isr_seconds'] * 1e3:.0f} ms = {p['numpy_isr_seconds'] / p['run_isr_seconds']:.1f}× ours"
        )
    print(f"ISR {isr_s * 1e3:.1f} ms per CCD: {fraction:.0%} of a plain numpy copy's bandwidth (both into new arrays, "
          f"{pages}, timed in turn; target ≥ 80 %), {fraction_resident:.0%} with both into touched memory; {np_s / isr_s:.1f}× faster "
          f"than numpy")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
