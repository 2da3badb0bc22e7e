"""Single-core cost of the simulator per CCD exposure, against numpy anchors measured in the same run.

What is timed (one process, one thread: the thread counts of numba and the BLAS libraries are pinned to 1
before numpy is imported; the kernels are serial anyway):

1. One full-size LSSTCam CCD exposure (a 15 s snap of the first synthetic visit) on an e2v and an ITL
   detector, set up exactly as ``run_simulation`` does it (sky over the whole field, asteroids and their
   ephemerides, a repository in a temporary directory). ``simulate_one`` end to end is the headline; the
   stages come from timing wrappers put around the functions it calls (scene, render and its kernels,
   raw writing, truth). The first exposure of each detector is an untimed warm-up (JIT compilation for the
   first one); the instrument signature (``make_signature``, the cached flat, the instrument truth file) is
   a per-detector one-off, reported on its own.
2. Anchors from the same run: numpy drawing the same image's Poisson noise
   (``default_rng(seed).poisson(lam)`` with ``lam`` the exposure's expected electrons, computed by
   ``compose_exposure(..., noise=False)`` on the very inputs the simulator used), and a numpy copy of a
   4k×4k float32 image (memory bandwidth, counting bytes read + written as STREAM's Copy does). As a
   reference for the write stage, the same segments are also written as plain (uncompressed) FITS. Each
   exposure's CPU time is reported next to its wall time: a gap means I/O waits (``write_raw`` fsyncs).
3. A whole ``mini`` night (``run_simulation`` with calibrations, templates and the CDS buffer) after an
   untimed one-visit warm-up night, per CCD exposure, against numpy Poisson noise on the same number of
   pixels (per-pixel cost measured on a mini-CCD-sized cut of the full-size ``lam``).

Run ``python benchmarks/simulate.py [--repeat N] [--mini-visits K] [--json PATH] [--quick]``.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import ExitStack, contextmanager  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.render  # noqa: E402
import lsstpipe.sim.camera_daq  # noqa: E402
import lsstpipe.sim.exposure as exposure_mod  # noqa: E402
import lsstpipe.sim.simulate as simulate_mod  # noqa: E402
import lsstpipe.sim.templates  # noqa: E402
from benchmarks.timing import median  # noqa: E402
from lsstpipe import __version__  # noqa: E402
from lsstpipe.camera import get_camera  # noqa: E402
from lsstpipe.io.raw import write_raw  # noqa: E402
from lsstpipe.repo import Repository  # noqa: E402
from lsstpipe.sim import sky as skymod  # noqa: E402
from lsstpipe.sim.instrument import FRINGE_BANDS, make_signature  # noqa: E402
from lsstpipe.sim.simulate import (  # noqa: E402
    SimulationRequest,
    default_sky,
    run_simulation,
    science_specs,
    simulate_one,
    visits_for,
)
from lsstpipe.sim.solar_system import Ephemerides, make_ssos  # noqa: E402
from lsstpipe.sim.truth import write_instrument_truth  # noqa: E402
from lsstpipe.sim.wcs import DetectorSkyModel  # noqa: E402

#: Target: one full-size CCD exposure (render + write + truth) in this many seconds on one core.
TARGET_SECONDS = 3.0
FULL_DETECTORS = ("R22_S11", "R01_S00")  # e2v, ITL
QUICK_DETECTORS = ("R11_S11", "R10_S00")  # the mini camera's e2v and ITL centre/corner CCDs
WARMUP_DETECTORS = (*QUICK_DETECTORS, "R00_SW")  # and its wavefront sensor

#: (module, attribute, stage) timed inside ``simulate_one``; nested stages are separated in ``_stages``.
EXPOSURE_PROBES = (
    (simulate_mod, "exposure_scene", "scene"),
    (simulate_mod, "render_exposure", "render"),
    (exposure_mod, "render_sources", "render.sources"),
    (kernels.render, "add_moffat_sources", "render.sources.moffat_kernel"),
    (exposure_mod, "compose_exposure", "render.photon_noise"),
    (exposure_mod, "cosmic_rays", "render.cosmics_bleed"),
    (exposure_mod, "add_tracks", "render.cosmics_bleed"),
    (exposure_mod, "bleed_saturation", "render.cosmics_bleed"),
    (exposure_mod, "disassemble_ccd", "render.disassemble"),
    (exposure_mod, "apply_crosstalk", "render.crosstalk"),
    (exposure_mod, "digitize_segments", "render.digitize"),
    (simulate_mod, "write_raw", "write.fits"),
    (simulate_mod, "sha256_file", "write.sha256"),
    (Repository, "register_raw", "write.register"),
    (simulate_mod, "source_rows", "truth.csv"),
    (simulate_mod, "write_csv", "truth.csv"),
    (DetectorSkyModel, "wcs_header", "truth.wcs_fit"),
    (simulate_mod, "write_json", "truth.json"),
)
NIGHT_PROBES = (
    (simulate_mod, "simulate_one", "exposures"),
    (simulate_mod, "make_signature", "signatures"),
    (simulate_mod, "write_instrument_truth", "signatures"),
    (lsstpipe.sim.templates, "make_templates", "templates"),
    (lsstpipe.sim.camera_daq, "fill_cds", "cds"),
)


class Clock:
    """Seconds spent in each probed function (inclusive), and the arguments of the last probed call."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last_call: dict[str, tuple] = {}

    @contextmanager
    def probing(self, probes):
        with ExitStack() as stack:
            for owner, name, label in probes:
                stack.enter_context(self._probe(owner, name, label))
            yield self

    @contextmanager
    def _probe(self, owner, name, label):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t0
                self.last_call[name] = (args, kwargs)

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, original)


def _stages(total: float, s: dict[str, float]) -> dict[str, float]:
    """Exclusive stage times of one ``simulate_one`` call from the inclusive probe times."""
    render_parts = ("photon_noise", "cosmics_bleed", "disassemble", "crosstalk", "digitize")
    out = {"scene": s["scene"], "render": s["render"]}
    out["render.sources.psf_prep"] = s["render.sources"] - s["render.sources.moffat_kernel"]
    out["render.sources.moffat_kernel"] = s["render.sources.moffat_kernel"]
    for part in render_parts:
        out[f"render.{part}"] = s[f"render.{part}"]
    out["render.other"] = s["render"] - s["render.sources"] - sum(s[f"render.{p}"] for p in render_parts)
    out["write"] = s["write.fits"] + s["write.sha256"] + s["write.register"]
    for part in ("fits", "sha256", "register"):
        out[f"write.{part}"] = s[f"write.{part}"]
    out["truth"] = s["truth.csv"] + s["truth.wcs_fit"] + s["truth.json"]
    for part in ("csv", "wcs_fit", "json"):
        out[f"truth.{part}"] = s[f"truth.{part}"]
    out["other"] = total - out["scene"] - out["render"] - out["write"] - out["truth"]
    return out


def _setup(camera_name: str, detectors: tuple[str, ...], seed: int, root: Path) -> dict:
    """Camera, sky, asteroids, ephemerides and repository, as ``run_simulation`` builds them for one visit."""
    request = SimulationRequest(repo=str(root), camera=camera_name, detectors=detectors, n_visits=1, seed=seed,
                                progress=False)  # fmt: skip
    camera = get_camera(camera_name)
    sky_cfg = default_sky(camera)
    visits = visits_for(request)
    repo = Repository(root)
    repo.create({"camera": camera.name, "seed": seed, "software": f"lsstpipe {__version__}",
                 "sky": asdict(sky_cfg), "noise": True})  # fmt: skip
    radius = camera.field_radius_deg + 0.05
    cells = sorted({c for v in visits for c in skymod.cells_around(v.ra, v.dec, radius, sky_cfg)})
    stars = skymod.stars_in_cells(cells, seed, sky_cfg)
    transients = skymod.transients_in_cells(cells, seed, sky_cfg, (visits[0].mjd, visits[-1].mjd))
    ssos = make_ssos(visits, camera, sky_cfg, seed)
    specs = [s for v in visits for s in science_specs(v, seed)]
    ephem = Ephemerides(ssos, [t for s in specs for t in (s.mjd, s.mjd + s.exptime / 86400.0)])
    for spec in specs:
        repo.register_exposure(simulate_mod._exposure_row(spec))
    return dict(request=request, camera=camera, repo=repo, stars=stars, transients=transients, ephem=ephem,
                spec=specs[0], n_stars=len(stars), n_ssos=len(ssos))  # fmt: skip


def bench_detector(env: dict, det_name: str, repeat: int) -> dict:
    """Signature one-off, warm-up, then ``repeat`` timed exposures of one detector, and the numpy anchor."""
    camera, spec, repo = env["camera"], env["spec"], env["repo"]
    det = camera[det_name]
    sig_parts = {}
    t0 = time.perf_counter()
    sig = make_signature(camera, det, env["request"].seed)
    sig_parts["make_signature"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sig.flat(spec.band)
    if spec.band in FRINGE_BANDS:
        sig.fringe  # noqa: B018 (the lazily built pattern is part of the one-off)
    sig_parts["flat_cache"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_instrument_truth(repo.instrument_truth_path(det.name), sig, [spec.band])
    sig_parts["instrument_truth_file"] = time.perf_counter() - t0

    args = (repo, camera, sig, spec, env["stars"], env["transients"], env["ephem"], env["request"])
    t0 = time.perf_counter()
    simulate_one(*args)  # warm-up: JIT compilation (first detector), page cache, file system
    warmup = time.perf_counter() - t0

    totals, cpu, stage_runs = [], [], []
    clock = Clock()
    with clock.probing(EXPOSURE_PROBES):
        for _ in range(repeat):
            clock.seconds.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            simulate_one(*args)
            total = time.perf_counter() - t0
            cpu.append(time.process_time() - c0)
            totals.append(total)
            stage_runs.append(_stages(total, clock.seconds))
    n_sources = len(clock.last_call["render_sources"][0][1])
    # Reference: the same segments written as plain (uncompressed) FITS.
    w_args, w_kwargs = clock.last_call["write_raw"]
    plain = {**w_kwargs, "compress": False, "overwrite": True}
    plain_path = Path(w_args[0]).with_name(f"plain_{Path(w_args[0]).name}")
    t_plain = median(lambda: write_raw(plain_path, *w_args[1:], **plain), repeat)

    # Anchor: numpy Poisson noise on the same expected-electron image the simulator drew from.
    c_args, c_kwargs = clock.last_call["compose_exposure"]
    lam = exposure_mod.compose_exposure(*c_args, **{**c_kwargs, "noise": False})
    seed = int(c_kwargs.get("seed", 0))
    t_numpy = median(lambda: np.random.default_rng(seed).poisson(lam), repeat)
    median_total = statistics.median(totals)
    stages = {k: statistics.median(r[k] for r in stage_runs) for k in stage_runs[0]}
    return {
        "detector": det.name, "vendor": det.vendor.name, "shape": list(det.shape), "band": spec.band,
        "n_sources": n_sources, "lam_median_e": float(np.median(lam[:: 8, :: 8])),
        "signature_parts": sig_parts, "signature_seconds": sum(sig_parts.values()), "warmup_seconds": warmup,
        "totals": totals, "total": median_total, "cpu": statistics.median(cpu), "write_plain": t_plain,
        "compress": bool(w_kwargs.get("compress", False)), "stages": stages, "numpy_poisson": t_numpy,
        "lam": lam,
    }  # fmt: skip


def bench_copy(repeat: int) -> tuple[float, float]:
    src = np.random.default_rng(0).random((4096, 4096), dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t = median(lambda: np.copyto(dst, src), max(repeat, 5))
    return t, 2 * src.nbytes / t / 1e9


def bench_mini_night(root: Path, n_visits: int, seed: int, lam: np.ndarray, repeat: int,
                     detectors: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Untimed one-visit warm-up night, then the timed night; anchor: numpy Poisson on as many pixels."""
    base = dict(camera="mini", calibs=True, progress=False, seed=seed)
    # Warm-up: one visit on a CCD of each kind compiles every kernel (donuts, templates, CDS included);
    # calibration frames run the same kernels with the same types, so they are left out of it.
    t0 = time.perf_counter()
    run_simulation(SimulationRequest(repo=str(root / "warmup"), n_visits=1, detectors=WARMUP_DETECTORS,
                                     **{**base, "calibs": False}))  # fmt: skip
    warmup = time.perf_counter() - t0
    clock = Clock()
    with clock.probing(NIGHT_PROBES):
        t0, c0 = time.perf_counter(), time.process_time()
        request = SimulationRequest(repo=str(root / "night"), n_visits=n_visits, detectors=detectors, **base)
        summary = run_simulation(request)
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - c0
    stages = dict(clock.seconds)
    stages["sky_and_setup"] = seconds - sum(stages.values())
    camera = get_camera("mini")
    night_dets = camera.select(list(detectors))
    total_pixels = summary["exposures"] * sum(d.shape[0] * d.shape[1] for d in night_dets)
    ny, nx = max(d.shape for d in night_dets)
    cut = np.ascontiguousarray(lam[:ny, :nx])
    per_pixel = median(lambda: np.random.default_rng(seed).poisson(cut), max(repeat, 5)) / cut.size
    return {
        "seconds": seconds, "cpu_seconds": cpu, "warmup_seconds": warmup, "ccd_exposures": summary["raws"],
        "visits": summary["visits"], "exposures": summary["exposures"], "detectors": summary["detectors"],
        "templates": summary["templates"], "pixels": total_pixels, "stages": stages,
        "numpy_poisson_seconds": per_pixel * total_pixels,
    }  # fmt: skip


def machine() -> dict:
    return {
        "processor": platform.processor() or platform.machine(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
        "numba": numba.__version__, "numba_threads": numba.config.NUMBA_NUM_THREADS,
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    camera_name, detectors = ("mini", QUICK_DETECTORS) if args.quick else ("lsstcam", FULL_DETECTORS)
    with tempfile.TemporaryDirectory(prefix="lsstpipe-bench-", dir=args.tmpdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        env = _setup(camera_name, detectors, args.seed, root / "ccd")
        setup_seconds = time.perf_counter() - t0
        per_det = [bench_detector(env, name, args.repeat) for name in detectors]
        copy_s, copy_gbps = bench_copy(args.repeat)
        night_dets = QUICK_DETECTORS if args.quick else ()  # quick: two CCDs, all of the mini camera otherwise
        night = bench_mini_night(root / "mini", args.mini_visits, args.seed, per_det[0]["lam"], args.repeat,
                                 night_dets)  # fmt: skip
    names = [d["detector"] for d in per_det]
    out = {
        "machine": machine(),
        "config": {"camera": camera_name, "detectors": names, "repeat": args.repeat, "mini_visits": args.mini_visits,
                   "mini_night_detectors": night["detectors"],
                   "seed": args.seed, "quick": args.quick, "obsid": env["spec"].obsid, "band": env["spec"].band,
                   "exptime": env["spec"].exptime, "compress": per_det[0]["compress"]},
        "target_seconds": TARGET_SECONDS,
        "ccd_exposure_seconds": {d["detector"]: d["total"] for d in per_det},
        "ccd_exposure_seconds_runs": {d["detector"]: d["totals"] for d in per_det},
        "ccd_exposure_cpu_seconds": {d["detector"]: d["cpu"] for d in per_det},
        "target_met": {d["detector"]: d["total"] <= TARGET_SECONDS for d in per_det},
        "stage_seconds": {d["detector"]: d["stages"] for d in per_det},
        "stage_fraction": {d["detector"]: {k: v / d["total"] for k, v in d["stages"].items()} for d in per_det},
        "numpy_poisson_seconds": {d["detector"]: d["numpy_poisson"] for d in per_det},
        "ratio_to_numpy_poisson": {d["detector"]: d["total"] / d["numpy_poisson"] for d in per_det},
        "photon_noise_ratio_to_numpy_poisson": {
            d["detector"]: d["stages"]["render.photon_noise"] / d["numpy_poisson"] for d in per_det
        },
        "signature_seconds": {d["detector"]: d["signature_seconds"] for d in per_det},
        "signature_parts_seconds": {d["detector"]: d["signature_parts"] for d in per_det},
        "warmup_seconds": {d["detector"]: d["warmup_seconds"] for d in per_det},
        "n_sources": {d["detector"]: d["n_sources"] for d in per_det},
        "lam_median_e": {d["detector"]: d["lam_median_e"] for d in per_det},
        "sky_setup_seconds": setup_seconds,
        "sky_stars": env["n_stars"],
        "copy_seconds": copy_s,
        "copy_gbps": copy_gbps,
        "write_raw_plain_seconds": {d["detector"]: d["write_plain"] for d in per_det},
        "ratio_to_copy": {d["detector"]: d["total"] / copy_s for d in per_det},
        "mini_night_seconds": night["seconds"],
        "mini_night_warmup_seconds": night["warmup_seconds"],
        "mini_night_cpu_seconds": night["cpu_seconds"],
        "mini_night_ccd_exposures": night["ccd_exposures"],
        "mini_night_seconds_per_ccd_exposure": night["seconds"] / night["ccd_exposures"],
        "mini_night_stage_seconds": night["stages"],
        "mini_night_pixels": night["pixels"],
        "mini_night_numpy_poisson_seconds": night["numpy_poisson_seconds"],
        "mini_night_ratio_to_numpy_poisson": night["seconds"] / night["numpy_poisson_seconds"],
        "mini_night_exposures_ratio_to_numpy_poisson": night["stages"]["exposures"] / night["numpy_poisson_seconds"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }  # fmt: skip
    return out


STAGE_ROWS = (
    ("scene", "scene (sources on the detector)"),
    ("render", "render_exposure"),
    ("render.sources.psf_prep", "  sources: trail/stamp prep"),
    ("render.sources.moffat_kernel", "  sources: add_moffat_sources"),
    ("render.photon_noise", "  compose_exposure (photon noise)"),
    ("render.cosmics_bleed", "  cosmic rays + bleed"),
    ("render.disassemble", "  disassemble_ccd"),
    ("render.crosstalk", "  apply_crosstalk"),
    ("render.digitize", "  digitize_segments"),
    ("render.other", "  other (flat, sky grid, gains)"),
    ("write", "write"),
    ("write.fits", "  write_raw (FITS, checksums, fsync)"),
    ("write.sha256", "  sha256 of the file"),
    ("write.register", "  registry insert"),
    ("truth", "truth"),
    ("truth.csv", "  source rows + CSV"),
    ("truth.wcs_fit", "  TAN-SIP fit"),
    ("truth.json", "  meta JSON"),
    ("other", "other"),
)


def report(r: dict) -> str:
    dets = r["config"]["detectors"]
    m = r["machine"]
    w = 14
    lines = [
        f"lsstpipe simulator benchmark — {r['config']['camera']} {r['config']['obsid']} (band {r['config']['band']}, "
        f"{r['config']['exptime']:g} s snap, {'RICE-compressed' if r['config']['compress'] else 'plain'} raws), "
        f"median of {r['config']['repeat']}, one thread",
        f"machine: {m['processor']}, {m['cpu_count']} CPUs, {m['platform']}; python {m['python']}, "
        f"numpy {m['numpy']}, numba {m['numba']} ({m['numba_threads']} thread)",
        "",
        f"{'per CCD exposure':40s}" + "".join(f"{d:>{w}s}" for d in dets),
    ]
    rows = [
        ("simulate_one (s)", [f"{r['ccd_exposure_seconds'][d]:.3f}" for d in dets]),
        ("  of which CPU time of this process (s)", [f"{r['ccd_exposure_cpu_seconds'][d]:.3f}" for d in dets]),
        (f"target ≤ {r['target_seconds']:g} s", ["PASS" if r["target_met"][d] else "MISS" for d in dets]),
        ("numpy poisson, same lam (s)", [f"{r['numpy_poisson_seconds'][d]:.3f}" for d in dets]),
        ("simulate_one / numpy poisson", [f"{r['ratio_to_numpy_poisson'][d]:.2f}×" for d in dets]),
        ("compose_exposure / numpy poisson", [f"{r['photon_noise_ratio_to_numpy_poisson'][d]:.2f}×" for d in dets]),
        ("simulate_one / 4k² float32 copy", [f"{r['ratio_to_copy'][d]:.0f}×" for d in dets]),
        ("sources on the detector", [str(r["n_sources"][d]) for d in dets]),
        ("median expected e-/pixel", [f"{r['lam_median_e'][d]:.0f}" for d in dets]),
    ]
    for label, vals in rows:
        lines.append(f"{label:40s}" + "".join(f"{v:>{w}s}" for v in vals))
    lines += ["", f"{'stage: fraction of simulate_one (s)':40s}" + "".join(f"{d:>{w}s}" for d in dets)]
    for key, label in STAGE_ROWS:
        vals = [f"{r['stage_fraction'][d][key]:6.1%} ({r['stage_seconds'][d][key]:.3f})" for d in dets]
        lines.append(f"{label:40s}" + "".join(f"{v:>{w + 4}s}" for v in vals))
    lines += ["", "one-offs (not in the per-exposure time)"]
    for d in dets:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["signature_parts_seconds"][d].items())
        lines.append(f"  {d}: signature {r['signature_seconds'][d]:.2f} s ({parts}); "
                     f"first exposure (warm-up, JIT on the first) {r['warmup_seconds'][d]:.2f} s")  # fmt: skip
    lines.append(
        f"  sky, asteroids, ephemerides for the field: {r['sky_setup_seconds']:.2f} s ({r['sky_stars']} stars)"
    )
    lines.append("  write_raw of the same segments as plain FITS: "
                 + ", ".join(f"{d} {r['write_raw_plain_seconds'][d]:.3f} s" for d in dets))  # fmt: skip
    lines.append(
        f"  numpy copy of 4k² float32: {r['copy_seconds'] * 1e3:.1f} ms = {r['copy_gbps']:.1f} GB/s (read+write)"
    )
    n = r["mini_night_ccd_exposures"]
    st = r["mini_night_stage_seconds"]
    lines += [
        "",
        f"mini night: {r['config']['mini_visits']} visits + calibrations, {r['config']['mini_night_detectors']} "
        f"CCDs, {n} CCD exposures, "
        f"{r['mini_night_pixels'] / 1e6:.0f} Mpx: {r['mini_night_seconds']:.2f} s "
        f"(CPU {r['mini_night_cpu_seconds']:.2f} s; warm-up night {r['mini_night_warmup_seconds']:.1f} s, untimed)",
        f"  per CCD exposure {r['mini_night_seconds_per_ccd_exposure'] * 1e3:.1f} ms; "
        f"night / numpy poisson on as many pixels {r['mini_night_ratio_to_numpy_poisson']:.1f}× "
        f"(exposures only {r['mini_night_exposures_ratio_to_numpy_poisson']:.1f}×)",
        "  " + ", ".join(f"{k} {v:.2f} s ({v / r['mini_night_seconds']:.0%})" for k, v in st.items()),
        "",
        f"peak RSS {r['peak_rss_mb']:.0f} MB",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="timed exposures per detector (median reported)")
    p.add_argument("--mini-visits", type=int, default=10, help="visits of the mini night")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the numbers here")
    p.add_argument("--tmpdir", help="where the temporary repositories go (local disk); default: the system's")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: mini camera, 1 repeat, a 2-visit mini night on 2 CCDs"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.mini_visits = 1, 2
    if args.repeat < 1 or args.mini_visits < 1:
        p.error("--repeat and --mini-visits must be ≥ 1")
    result = run(args)
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
